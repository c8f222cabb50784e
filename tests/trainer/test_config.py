"""Configs: every YAML in configs/ loads, overrides apply, and bad configs fail with a message that says the fix."""

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from trainer.config import RunConfig, load_config

CONFIG_FILES = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIG_FILES) >= 20


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_validates(path):
    cfg = load_config(path)
    assert path.stem == cfg.method or path.stem.startswith(f"{cfg.method}_")  # variants: ssd_views, ...


def test_method_sets_stage_defaults_and_overrides_win():
    cfg = load_config(None, ["method=ldam_drw", "stage1.optim.epochs=20", "stage1.optim.warmup_epochs=2"])
    assert (cfg.stage1.loss.name, cfg.stage1.loss.drw_start, cfg.pipeline) == ("ldam", 0.8, "joint")
    assert cfg.stage1.optim.epochs == 20
    assert load_config(None, ["method=ncm"]).stage2.method == "ncm"
    assert RunConfig().pipeline == "ssd"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=focal", "stage1.loss.name=ce"], "drop that key"),
        (["stage1.optim.epochs=3"], "lower warmup_epochs"),
        (["stage1.optim.lrr=0.1"], "Extra inputs"),
        (["method=dino"], "method"),
        (["data.imbalance_factor=0.5"], "greater than or equal"),
        (["stage1.optim.milestones=[160, 180]"], "fractions"),
        (["stage1"], "key.path=value"),
        (["method=lws", "stage1.loss.name=ldam"], "cosine head"),
        (["compile=reduce-overhead", "distributed.num_workers=2"], "compile=none"),
        (["compile=max-speed"], "reduce-overhead"),
        (["cuda_graph=true", "compile=reduce-overhead"], "set compile=default"),
        (["cuda_graph=true", "distributed.num_workers=2"], "num_workers=1"),
        (["cuda_graph=true", "method=bbn"], "cuda_graph=false"),
    ],
)
def test_bad_configs_say_what_to_fix(overrides, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        load_config(None, overrides)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


@pytest.mark.parametrize(
    "device, overrides, shard, graphed",
    [
        ("cuda", [], None, True),  # 'auto', the default: SSD on one GPU replays its steps from CUDA graphs
        ("cuda", ["method=ce"], None, True),
        ("cuda", ["method=lws"], None, True),
        ("cpu", [], None, False),
        ("cuda", ["method=bbn"], None, False),  # expert steps were never checked against eager on a GPU
        ("cuda", ["compile=reduce-overhead"], None, False),  # torch.compile brings its own graphs
        ("cuda", ["compile=default"], None, False),  # Inductor's kernels in our graph: only when asked for
        ("cuda", ["compile=default", "cuda_graph=true"], None, True),
        ("cuda", [], (0, 2), False),  # a data-parallel rank: DDP's hooks run outside any graph
        ("cuda", ["cuda_graph=false"], None, False),
        ("cpu", ["cuda_graph=true"], None, True),  # asked for: engine.fit warns and trains eagerly (test_engine)
    ],
)
def test_cuda_graph_auto_is_on_where_the_graphed_step_was_checked(tiny_lt, tmp_path, device, overrides, shard, graphed):
    import torch

    from trainer.context import RunContext

    ctx = RunContext(load_config(None, overrides), tiny_lt, torch.device(device), tmp_path, shard)
    assert ctx.cuda_graph is graphed


def test_cuda_graph_auto_leaves_list_file_datasets_eager(tiny_lt, tmp_path):
    """A list-file split (paths, decoded by DataLoader workers) has not trained graphed on a GPU: 'auto' stays off."""
    import dataclasses

    import torch

    from trainer.datasets import ImageSet
    from trainer.context import RunContext

    listed = ImageSet(labels=tiny_lt.train.labels, paths=tuple(f"{i}.jpg" for i in range(len(tiny_lt.train))),
                      root=tmp_path)
    data = dataclasses.replace(tiny_lt, train=listed)
    assert not RunContext(load_config(None, []), data, torch.device("cuda"), tmp_path).cuda_graph
    assert RunContext(load_config(None, ["cuda_graph=true"]), data, torch.device("cuda"), tmp_path).cuda_graph


def test_stage1_recipe_is_what_stage1_trains_on_and_nothing_else():
    """CE, the decoupled methods and SSD without its MoCo branch train the same stage I; SSD with MoCo, another loss,
    seed or schedule do not. MoCo settings only count while MoCo is on."""

    def recipe(*overrides):
        return load_config(None, list(overrides)).stage1_recipe()

    ce = recipe("method=ce")
    for same in (["method=lws"], ["method=crt"], ["method=ncm"], ["method=tau_norm", "stage2.tau=1"],
                 ["method=lws", "stage2.optim.epochs=3"],
                 ["method=ssd", "stage1.moco.weight=0", "stage1.moco.momentum=0.99"]):
        assert recipe(*same) == ce, same
    ssd = recipe("method=ssd")
    for other in (["method=ssd"], ["method=focal"], ["method=ce", "seed=1"], ["method=ce", "stage1.optim.epochs=100"],
                  ["method=ce", "data.imbalance_factor=50"], ["method=ce", "stage1.sampler=class"]):
        assert recipe(*other) != ce, other
    assert recipe("method=ssd", "stage1.moco.momentum=0.99") != ssd
    assert recipe("method=ssd", "stage3.soft_labels=views", "stage4.enabled=false") == ssd


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(has_bf16, monkeypatch, caplog, tmp_path):
    """Emulated bf16 was 15x slower than fp32 on such a CPU: the run says so before it starts."""
    import trainer.context as context

    monkeypatch.setattr(context, "cpu_has_bf16", lambda: has_bf16)
    cfg = load_config(None, ["data.name=synthetic", "data.max_per_class=20", "precision=bf16", "device=cpu",
                             f"out_dir={tmp_path}"])
    with caplog.at_level(logging.WARNING, logger="trainer.context"):
        context.prepare(cfg)
    assert ("without bf16 instructions" in caplog.text) == (not has_bf16)
