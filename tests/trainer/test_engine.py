"""The one training loop: LR schedule values, and an interrupted run resumes to the same weights as an unbroken one."""

import itertools
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.batches import DeviceBatches
from trainer.checkpoint import CheckpointMismatchError
from trainer.config import AugmentConfig, OptimConfig
from trainer.engine import fit, learning_rate


def test_step_schedule_matches_ldam_drw():
    cfg = OptimConfig()  # 200 epochs, lr 0.1, 5 warm-up epochs, x0.01 at 160 and again at 180
    assert learning_rate(cfg, 0) == pytest.approx(0.02)
    assert learning_rate(cfg, 4) == pytest.approx(0.1)
    assert learning_rate(cfg, 159) == pytest.approx(0.1)
    assert learning_rate(cfg, 160) == pytest.approx(1e-3)
    assert learning_rate(cfg, 180) == pytest.approx(1e-5)


def test_cosine_schedule_endpoints():
    cfg = OptimConfig(epochs=10, warmup_epochs=0, schedule="cosine")
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 5) == pytest.approx(0.05)
    assert learning_rate(cfg, 9) < 0.01


class Crash(RuntimeError):
    pass


def run(tmp_path, tiny_lt, crash_at_step=None, meta=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    batches = DeviceBatches(tiny_lt.train, tiny_lt.mean, tiny_lt.std, torch.device("cpu"), 64, AugmentConfig(),
                            sampler="class")
    steps = {"n": 0}

    def loss_fn(batch, progress):
        steps["n"] += 1
        if crash_at_step is not None and steps["n"] == crash_at_step:
            raise Crash("worker died")
        return F.cross_entropy(model(batch.images), batch.labels), {}

    fit(stage="t", model=model, loss_fn=loss_fn, batches=batches, optim=OptimConfig(epochs=4, warmup_epochs=1),
        generator=torch.Generator().manual_seed(0), checkpoint=tmp_path / "ckpt.pt", meta=meta or {"fingerprint": "a"})
    return model.state_dict(), steps["n"]


def test_resume_after_crash_equals_unbroken_run(tmp_path, tiny_lt):
    unbroken, total_steps = run(tmp_path / "a", tiny_lt)
    with pytest.raises(Crash):
        run(tmp_path / "b", tiny_lt, crash_at_step=total_steps * 3 // 4 + 2)  # dies inside the last epoch
    resumed, resumed_steps = run(tmp_path / "b", tiny_lt)
    assert resumed_steps == total_steps // 4  # only the unfinished epoch ran again
    for key in unbroken:
        torch.testing.assert_close(resumed[key], unbroken[key])


def test_checkpoint_of_another_dataset_is_refused(tmp_path, tiny_lt):
    run(tmp_path, tiny_lt)
    with pytest.raises(CheckpointMismatchError, match="fingerprint"):
        run(tmp_path, tiny_lt, meta={"fingerprint": "b"})


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_stage_objectives_train_like_eager(tiny_lt, tmp_path):
    """compile=default runs the same stage I (MoCo) and III steps as eager: same losses, same weights after 3 steps."""

    def train(mode, stage):
        history, model = _train_ssd_stage(tiny_lt, tmp_path, tmp_path / f"{mode}{stage}.pt", stage, steps=3,
                                          compile=mode)
        return history[0]["loss"], model.state_dict()

    from torch._dynamo.utils import counters

    for stage in ("I", "III"):
        graphs = counters["stats"]["unique_graphs"]
        (eager_loss, eager_state), (compiled_loss, compiled_state) = train("none", stage), train("default", stage)
        assert counters["stats"]["unique_graphs"] > graphs  # the compiled run did go through torch.compile
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
        assert eager_state.keys() == compiled_state.keys()  # compiling leaves checkpoints loadable either way
        for key, value in eager_state.items():
            torch.testing.assert_close(compiled_state[key], value, rtol=1e-3, atol=1e-4)


def _train_ssd_stage(tiny_lt, tmp_path, checkpoint, stage="I", device="cpu", epochs=1, warmup_epochs=0, steps=None,
                     conv_hook=None, wrap=None, **cfg):
    """SSD stage I (MoCo with its key view) or III (two heads on fixed random soft labels) of a ResNet-8 on tiny_lt at
    batch 32, through ctx.fit (the stages' path, so RunConfig's precision / layout / graph settings apply): `steps`
    batches per epoch, or whole epochs with their short last batch. `conv_hook(out)` sees every convolution's output;
    `wrap(batches)` replaces the batch source. Returns the epoch records and the model."""
    from trainer.config import RunConfig
    from trainer.soft_targets import InMemorySoftLabels, TableTargets
    from trainer.context import RunContext
    from trainer.stages import distill_objective, stage1_objective

    device = torch.device(device)
    ctx = RunContext(RunConfig(method="ssd", model={"arch": "resnet8"}, stage1={"moco": {"queue_size": 64}}, **cfg),
                     tiny_lt, device, tmp_path)
    if stage == "I":
        model, loss_fn = stage1_objective(ctx)
    else:
        logits = torch.randn(len(tiny_lt.train), tiny_lt.num_classes, generator=torch.Generator().manual_seed(0))
        targets = TableTargets(InMemorySoftLabels(logits, 2.0), len(tiny_lt.train), device)
        model, loss_fn = distill_objective(ctx, targets)
    if conv_hook is not None:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(lambda m, args, out: conv_hook(out))
    batches = DeviceBatches(tiny_lt.train, tiny_lt.mean, tiny_lt.std, device, 32, AugmentConfig(),
                            key_view=stage == "I")
    batches = Window(batches, steps) if steps else batches
    history = ctx.fit(stage=stage, model=model, loss_fn=loss_fn, batches=wrap(batches) if wrap else batches,
                      optim=OptimConfig(epochs=epochs, warmup_epochs=warmup_epochs),
                      generator=torch.Generator().manual_seed(0), checkpoint=checkpoint, meta={})
    return history, model


def test_bf16_runs_the_forward_in_bfloat16_and_keeps_fp32_weights(tiny_lt, tmp_path):
    """precision=bf16: stage I's convolutions (query and MoCo key path) compute in bf16, while weights, BatchNorm
    statistics, the MoCo queue and the recorded loss stay fp32 and near the fp32 run's."""

    def train(precision):
        dtypes = set()
        history, model = _train_ssd_stage(tiny_lt, tmp_path, tmp_path / f"{precision}.pt", steps=2,
                                          conv_hook=lambda out: dtypes.add(out.dtype), precision=precision)
        return history[0]["loss"], dtypes, model.state_dict()

    loss32, dtypes32, _ = train("fp32")
    loss16, dtypes16, state16 = train("bf16")
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}
    assert {v.dtype for v in state16.values() if v.is_floating_point()} == {torch.float32}
    assert loss16 == pytest.approx(loss32, rel=0.05) and loss16 != loss32


def test_channels_last_trains_like_nchw_and_resumes_across_layouts(tiny_lt, tmp_path):
    """channels_last: stage I (MoCo) convolutions run and keep their weights in NHWC, with NCHW's losses and weights
    to float rounding; a run checkpointed in NCHW resumes in NHWC to the weights of an unbroken NCHW run."""

    def train(channels_last, epochs, checkpoint):
        layouts = set()
        history, model = _train_ssd_stage(
            tiny_lt, tmp_path, checkpoint, epochs=epochs, steps=2, channels_last=channels_last,
            conv_hook=lambda out: layouts.add(out.is_contiguous(memory_format=torch.channels_last)))
        convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        return history, layouts, convs, model.state_dict()

    nchw, nchw_layouts, nchw_convs, nchw_state = train(False, 2, tmp_path / "nchw.pt")
    nhwc, nhwc_layouts, nhwc_convs, nhwc_state = train(True, 2, tmp_path / "nhwc.pt")
    assert nchw_layouts == {False} and nhwc_layouts == {True}  # conv outputs (query and key encoders) are NHWC
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in nhwc_convs)
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in nchw_convs)
    assert [h["loss"] for h in nhwc] == pytest.approx([h["loss"] for h in nchw], rel=1e-4)
    for key, value in nchw_state.items():
        torch.testing.assert_close(nhwc_state[key], value, rtol=1e-2, atol=1e-3)  # 4 SGD steps at lr 0.1 amplify

    train(False, 1, tmp_path / "switch.pt")  # one epoch in NCHW, then the same run resumed in NHWC
    resumed, _, _, resumed_state = train(True, 2, tmp_path / "switch.pt")
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in nchw], rel=1e-4)
    for key, value in nchw_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=1e-2, atol=1e-3)


def test_cudnn_autotuning_is_on_while_a_run_trains_and_restored_after(tiny_lt, tmp_path):
    """RunConfig.cudnn_benchmark (on by default) reaches every training step through ctx.fit, and fit puts the
    caller's setting back afterwards, also when a step fails; off, the steps train with it off."""
    seen = []
    torch.backends.cudnn.benchmark = False
    _train_ssd_stage(tiny_lt, tmp_path, tmp_path / "on.pt", "III", steps=2,
                     conv_hook=lambda out: seen.append(torch.backends.cudnn.benchmark))
    assert seen and all(seen) and torch.backends.cudnn.benchmark is False
    seen.clear()
    _train_ssd_stage(tiny_lt, tmp_path, tmp_path / "off.pt", "III", steps=2, cudnn_benchmark=False,
                     conv_hook=lambda out: seen.append(torch.backends.cudnn.benchmark))
    assert seen and not any(seen)

    def fail(out):
        raise Crash("step failed")

    with pytest.raises(Crash):
        _train_ssd_stage(tiny_lt, tmp_path, tmp_path / "crash.pt", "III", steps=2, conv_hook=fail)
    assert torch.backends.cudnn.benchmark is False


def _graph_run(tiny_lt, tmp_path, device, stage, cuda_graph, compile="none"):
    """2 whole epochs (a short last batch each), the learning rate rising over the first, with or without graphs."""
    history, model = _train_ssd_stage(tiny_lt, tmp_path, tmp_path / f"{stage}{cuda_graph}{compile}.pt", stage, device,
                                      epochs=2, warmup_epochs=1, cuda_graph=cuda_graph, compile=compile)
    return history, {k: v.cpu() for k, v in model.state_dict().items()}


def _assert_graphed_like_eager(tiny_lt, eager, eager_state, graphed, graphed_state):
    """Every full batch after 3 warm-up steps replayed (the short last batch ran eagerly), and the run ended with the
    eager run's losses and weights."""
    full = len(tiny_lt.train) // 32
    assert len(tiny_lt.train) % 32 and [h["graph_replays"] for h in graphed] == [full - 3, full]
    assert [h["loss"] for h in graphed] == pytest.approx([h["loss"] for h in eager], rel=1e-4)
    for key, value in eager_state.items():
        torch.testing.assert_close(graphed_state[key], value, rtol=1e-3, atol=1e-4)


def test_cuda_graph_on_a_cpu_trains_eagerly_with_a_warning(tiny_lt, tmp_path, caplog):
    eager, eager_state = _graph_run(tiny_lt, tmp_path, "cpu", "I", False)
    graphed, graphed_state = _graph_run(tiny_lt, tmp_path, "cpu", "I", True)
    assert "cuda_graph needs one CUDA device, training eagerly on cpu" in caplog.text
    assert [h["loss"] for h in graphed] == [h["loss"] for h in eager] and "graph_replays" not in graphed[0]
    for key, value in eager_state.items():
        assert torch.equal(graphed_state[key], value), key


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["I", "III"])
def test_cuda_graph_replays_full_batches_and_trains_like_eager(tiny_lt, tmp_path, stage):
    """cuda_graph on a GPU: every full batch after 3 warm-up steps replays the captured step, the short last batch
    runs eagerly, the step is captured again when the learning rate changes (epoch 2), and the run ends with the
    eager run's losses and weights."""
    eager, eager_state = _graph_run(tiny_lt, tmp_path, "cuda", stage, False)
    graphed, graphed_state = _graph_run(tiny_lt, tmp_path, "cuda", stage, True)
    _assert_graphed_like_eager(tiny_lt, eager, eager_state, graphed, graphed_state)


@pytest.mark.gpu
def test_compiled_kernels_replay_inside_the_whole_step_graph(tiny_lt, tmp_path):
    """compile=default with cuda_graph=true: stage I's backbone and MoCo key path compile while the first steps warm
    up eagerly, and Inductor's kernels then replay inside the whole-step graph, training like the eager run."""
    eager, eager_state = _graph_run(tiny_lt, tmp_path, "cuda", "I", False)
    graphed, graphed_state = _graph_run(tiny_lt, tmp_path, "cuda", "I", True, compile="default")
    _assert_graphed_like_eager(tiny_lt, eager, eager_state, graphed, graphed_state)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("stage", ["I", "III"])
def test_training_steps_never_wait_for_the_gpu(tiny_lt, tmp_path, stage, cuda_graph):
    """Once warm, drawing, realizing and training a full batch never syncs the host with the GPU, eager or graphed,
    so the host queues the next step while the GPU runs this one. (A per-batch list -> CUDA tensor did: a pageable
    copy waits for the GPU to drain.) torch's CUDA sync debug mode turns any sync there into an error."""
    history, _ = _train_ssd_stage(tiny_lt, tmp_path, tmp_path / f"{stage}{cuda_graph}.pt", stage, "cuda",
                                  cuda_graph=cuda_graph, wrap=lambda batches: SyncChecked(batches, after=5))
    assert history[0]["loss"] > 0 and ("graph_replays" in history[0]) == cuda_graph


class SyncChecked:
    """`batches`' draws with CUDA's sync debug mode raising from full batch `after` on (past cuDNN's autotuning and
    the graph's warm-up and capture) until the epoch's short last batch (a new shape, autotuned once) and its record."""

    def __init__(self, batches, after):
        self.batches, self.after = batches, after

    def draws(self, progress=0.0, generator=None):
        full = None
        try:
            for i, draw in enumerate(self.batches.draws(progress, generator)):
                full = full or len(draw.ids)
                torch.cuda.set_sync_debug_mode("error" if i >= self.after and len(draw.ids) == full else 0)
                yield draw
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def realize(self, draw):
        return self.batches.realize(draw)


class Window:
    """The first `steps` batches of one epoch of `batches`, drawn and realized as DeviceBatches does for fit."""

    def __init__(self, batches, steps):
        self.batches, self.steps = batches, steps

    def draws(self, progress=0.0, generator=None):
        return itertools.islice(self.batches.draws(progress, generator), self.steps)

    def realize(self, draw):
        return self.batches.realize(draw)

def test_progress_off_a_terminal_is_plain_lines(monkeypatch, capsys):
    """Logs, CI and job logs get one line per update, no carriage returns; LTD_PROGRESS overrides the choice."""
    from trainer.engine import LineProgress, progress_bar, progress_mode
    from trainer.workers import worker_progress

    monkeypatch.delenv("LTD_PROGRESS", raising=False)
    assert progress_mode() == "lines" and worker_progress() == "lines"  # pytest's stderr is not a terminal
    bar = progress_bar("stage I", 3, 1, "ep")
    assert isinstance(bar, LineProgress)
    bar.set_description("stage I loss 0.512 900 img/s")
    bar.update(1)
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == ["stage I loss 0.512 900 img/s [2/3 ep]",
                                                    "stage I loss 0.512 900 img/s [3/3 ep]"]
    monkeypatch.setenv("LTD_PROGRESS", "bar")
    assert progress_mode() == "bar" and worker_progress() == "ray"
