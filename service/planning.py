"""Job requests -> what a worker runs: config defaults filled in, ids turned into paths, every path kept in its root."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from service.errors import JobConfigError
from service.inference import ModelRegistry
from service.settings import Settings


def apply_overrides(cfg, overrides: list[str]):
    """`a.b=value` overrides (as `ltd train` takes them) on top of a config, validated again."""
    from trainer.config import RunConfig, merge, parse_override

    raw = cfg.model_dump(mode="json")
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ValueError as err:
            raise JobConfigError(str(err)) from err
        patch = value
        for key in reversed(keys):
            patch = {key: patch}
        raw = merge(raw, patch)
    return RunConfig.model_validate(raw)  # a ValidationError here is the client's: app.py makes it a 422


def confine_data_paths(cfg, data_root: Path | None):
    """Dataset paths resolved under `data_root` (relative ones are taken relative to it); any other path is refused."""
    updates = {}
    for name in ("root", "train_list", "test_list"):
        path = getattr(cfg.data, name)
        if path is None:
            continue
        if data_root is None:
            raise JobConfigError(f"data.{name}={str(path)!r}: this service takes no dataset paths "
                                 "(set LTD_DATA_ROOT to allow paths under one folder)")
        root = data_root.resolve()
        full = (root / path).resolve()
        if not full.is_relative_to(root):
            raise JobConfigError(f"data.{name}={str(path)!r} is outside the data root; use a path under it")
        updates[name] = full
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=updates)}) if updates else cfg


def plan_job(request, job_id: str, settings: Settings, models: ModelRegistry) -> dict:
    """The payload of a new job; raises typed errors (404 / 409 / 422) before anything is queued."""
    from store import describe, validate_labelset_id
    from store.errors import LabelsetExistsError
    from store.layout import published_path
    from trainer.config import RunConfig, load_config

    run_dir = (settings.runs_root / job_id).resolve()
    store_root = settings.store_root.resolve()
    payload: dict = {"run_dir": str(run_dir), "store_root": str(store_root)}
    base = request.config
    if request.kind == "labels":
        teacher = models.resolve(request.teacher)
        validate_labelset_id(request.labelset_id)
        if (published_path(store_root, request.labelset_id) / "zarr.json").is_file():
            raise LabelsetExistsError(f"labelset {request.labelset_id!r} is already published; pick a new id")
        if base is None:  # default: the teacher's own run config, so the data (and fingerprint) match
            config_file = teacher.parent / "config.yaml"
            if not config_file.is_file():
                raise JobConfigError(f"no config.yaml beside {request.teacher!r}: pass the teacher's run config")
            base = load_config(config_file)
        payload.update(teacher_path=str(teacher), labelset_id=request.labelset_id,
                       temperature=request.temperature, mode=request.mode, views=request.views, top_k=request.top_k)
    elif request.kind == "distill":
        prov = describe(store_root, request.labelset_id)  # 404 for an unknown labelset
        if base is None:  # default: the config the labelset was generated with (same data), as SSD
            try:
                base = RunConfig.model_validate({**prov.config, "method": "ssd"})
            except ValidationError as err:
                raise JobConfigError(f"labelset {request.labelset_id!r} holds no usable run config; pass one") from err
        payload["labelset_id"] = request.labelset_id
    cfg = apply_overrides(base or RunConfig(), request.overrides)
    if request.kind == "distill" and cfg.method != "ssd":
        raise JobConfigError(f"distill jobs run SSD stages III-IV: method must be 'ssd', got {cfg.method!r}")
    cfg = confine_data_paths(cfg, settings.data_root)
    # outputs go to the job's own run folder and shared stage Is to the service's folder, whatever paths the request
    # carried
    cache = (settings.runs_root / "stage1_cache").resolve() if settings.share_stage1 else None
    payload["config"] = cfg.model_copy(update={"out_dir": run_dir, "stage1_cache": cache}).model_dump(mode="json")
    return payload
