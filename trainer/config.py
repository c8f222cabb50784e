"""Typed run configs: defaults live here, YAML files in configs/ hold only the diff, `a.b=value` overrides win."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

JOINT_METHODS = {  # method -> the stage-I loss it trains with
    "ce": "ce",
    "focal": "focal",
    "cb": "cb",
    "ldam_drw": "ldam",
    "balanced_softmax": "balanced_softmax",
    "logit_adjust": "logit_adjust",
    "eql": "eql",
}
DECOUPLED_METHODS = ("crt", "lws", "tau_norm", "ncm")
EXPERT_METHODS = {  # method -> the stage-I loss its experts (or branches) train with; see trainer/expert_stages.py
    "bbn": "ce",
    "ride": "ldam",
    "lfme": "ce",
    "experts_ta": "balanced_softmax",
}
METHODS = (*JOINT_METHODS, *DECOUPLED_METHODS, "ssd", *EXPERT_METHODS)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(Frozen):
    name: Literal[
        "embedded", "fashion_mnist", "synthetic", "cifar10", "cifar10_npz", "cifar100", "list", "folder"
    ] = Field(
        "embedded", description="Dataset reader; 'embedded' is Fashion-MNIST when installed, else synthetic images; "
        "'folder' is torchvision's ImageFolder layout, data.root/train/<class>/<image> and data.root/val/ (or test/), "
        "class index = position of the folder name in sorted order, unreadable files skipped (trainer/folder.py)"
    )
    root: Path | None = Field(None, description="Folder or file the reader opens (None: the reader's default)")
    imbalance_factor: float = Field(
        100.0, ge=1.0, description="n_max / n_min of the long-tailed split (1 = keep all). name=folder defaults to 1: "
        "the folder's own split as it is; set it (or max_per_class) to sub-sample the folder LDAM's way"
    )
    lt_seed: int = Field(0, description="Seed of the legacy NumPy shuffle that picks each class's kept images")
    max_per_class: int | None = Field(None, ge=1, description="Cap n_max (head-class size) to shrink runs on CPU")
    val_per_class: int = Field(
        0, ge=0, description="Balanced validation images per class, from training images outside the LT split "
        "(a head class with too few lends its last LT images)"
    )
    test_per_class: int | None = Field(None, ge=1, description="Cap test images per class (None: full test set)")
    jpeg_quality: int | None = Field(
        None, ge=1, le=100, description="Round-trip every in-memory image (train, val and test) through JPEG at this "
        "quality, as our CIFAR-10 copy was (~75): measures what a lossy copy costs (None: pixels as read)"
    )
    train_list: Path | None = Field(None, description="List file 'relative/path.jpg label' (name='list')")
    test_list: Path | None = Field(None, description="Test list file (name='list')")
    image_size: int = Field(224, description="Crop size for list-file and folder datasets")
    num_workers: int = Field(4, ge=0, description="DataLoader workers for list-file and folder datasets")
    cache_size: int | None = Field(
        None, ge=8, description="Decode each list-file or folder image once, shorter side resized to this many pixels "
        "and centre-cropped square, into a memory-mapped uint8 cache that later epochs, labels and evaluation read; "
        "crops and flips are then drawn on the training device (trainer/image_cache.py). 256 for image_size=224 "
        "(ImageNet's eval resize, 3 x 256^2 = 192 KiB per image), 73 for 64. None: decode every epoch"
    )
    cache_dir: Path | None = Field(
        None, description="Local folder of the decoded-image caches (None: $LTD_CACHE/images or ~/.cache/ltd/images)"
    )

    @model_validator(mode="before")
    @classmethod
    def _folder_keeps_its_split(cls, data: Any) -> Any:
        """A folder of the user's own images is used as it is unless asked: its default imbalance factor is 1, and
        the resolved value is what run folders and workers receive (a dumped config reloads to the same split)."""
        if isinstance(data, dict) and data.get("name") == "folder" and data.get("imbalance_factor") is None:
            return {**data, "imbalance_factor": 1.0}
        return data

    @model_validator(mode="after")
    def _cache_fits_the_crop(self) -> DataConfig:
        if self.cache_size is None:
            return self
        if self.name not in ("folder", "list"):
            raise ValueError(f"data.cache_size caches decoded image files; data.name={self.name!r} is already held in "
                             "memory: remove data.cache_size")
        if self.cache_size < self.image_size:
            raise ValueError(f"data.cache_size={self.cache_size} is below the crop data.image_size={self.image_size}; "
                             f"set data.cache_size >= {self.image_size}, e.g. {int(self.image_size * 256 / 224)} "
                             "(the eval resize)")
        return self


class ModelConfig(Frozen):
    arch: Literal["resnet8", "resnet20", "resnet32", "resnet10", "resnet50", "resnext50"] = Field(
        "resnet32", description="Backbone: CIFAR ResNets (option-A shortcuts) or torchvision ImageNet ResNets"
    )


SamplerKind = Literal["instance", "class", "sqrt", "reversed", "progressive"]
SAMPLER_HELP = ("p_j ∝ n_j^q with q=1 (instance) / 0 (class) / 0.5 (sqrt) / -1 (reversed, BBN), "
                "or instance→class linearly over epochs")


class LossConfig(Frozen):
    name: Literal["ce", "focal", "cb", "ldam", "balanced_softmax", "logit_adjust", "eql"] = "ce"
    focal_gamma: float = Field(1.0, ge=0, description="Focal loss focusing parameter γ")
    cb_beta: float = Field(0.9999, gt=0, lt=1, description="Effective-number β for class-balanced weights")
    ldam_max_margin: float = Field(0.5, gt=0, description="LDAM margin of the smallest class")
    ldam_scale: float = Field(30.0, gt=0, description="LDAM logit scale s")
    drw_start: float | None = Field(
        None, ge=0, le=1, description="Fraction of epochs after which class-balanced (DRW) weights switch on"
    )
    logit_adjust_tau: float = Field(1.0, ge=0, description="τ of logit adjustment (1 = balanced softmax)")
    eql_variant: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="EQL form: softmax (SEQL, for classification) or per-class sigmoid (the detection form)"
    )
    eql_lambda: float = Field(
        5e-3, ge=0, le=1, description="λ: classes with frequency n_j/N below it are 'tail' (their negatives dropped)"
    )
    eql_gamma: float = Field(
        0.9, ge=0, le=1, description="γ: SEQL drops a tail class's negative logit with this probability (β ~ B(γ))"
    )


class OptimConfig(Frozen):
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1, description="Images per step per worker (global batch: x distributed.num_workers)")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(2e-4, ge=0)
    warmup_epochs: int = Field(5, ge=0, description="Linear warm-up epochs")
    schedule: Literal["step", "cosine"] = "step"
    milestones: tuple[float, ...] = Field((0.8, 0.9), description="Step decay points as fractions of the epochs")
    gamma: float = Field(0.01, gt=0, description="LR factor at each milestone (LDAM-DRW: x0.01 then x0.0001)")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}; "
                f"lower warmup_epochs (e.g. warmup_epochs={self.epochs // 10})"
            )
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError("milestones are fractions of the run in (0, 1), e.g. [0.8, 0.9]")
        return self


class HeadOptimConfig(OptimConfig):
    """The short schedule of classifier re-balancing (stages II and IV): its own defaults survive partial overrides."""

    epochs: int = Field(10, ge=1)
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up epochs")
    schedule: Literal["step", "cosine"] = "cosine"
    weight_decay: float = Field(5e-4, ge=0)


class MocoConfig(Frozen):
    weight: float = Field(1.0, ge=0, description="Weight of the contrastive loss next to CE (0 turns MoCo off)")
    dim: int = Field(128, ge=8, description="Projection dimension")
    momentum: float = Field(0.999, ge=0, lt=1, description="Key-encoder EMA momentum")
    temperature: float = Field(0.2, gt=0)
    queue_size: int = Field(8192, ge=1, description="Negatives kept; clipped to a multiple of the batch ≤ train size")
    label_aware: bool = Field(True, description="Mask keys of the query's own class out of the denominator")


class AugmentConfig(Frozen):
    crop_padding: int = Field(4, ge=0, description="Random-crop padding in pixels (0 turns the crop off)")
    flip: bool = True


class Stage1Config(Frozen):
    optim: OptimConfig = OptimConfig()
    sampler: SamplerKind = Field("instance", description=SAMPLER_HELP)
    loss: LossConfig = LossConfig()
    moco: MocoConfig = MocoConfig()


class Stage2Config(Frozen):
    method: Literal["crt", "lws", "tau_norm", "ncm"] = "lws"
    optim: HeadOptimConfig = HeadOptimConfig()
    sampler: SamplerKind = Field("class", description=SAMPLER_HELP)
    tau: float | None = Field(None, ge=0, description="tau-norm τ; None searches 0..2 on the validation split")
    ncm_metric: Literal["euclidean", "cosine"] = "euclidean"


class Stage3Config(Frozen):
    optim: OptimConfig = OptimConfig()
    sampler: SamplerKind = Field("instance", description=SAMPLER_HELP)
    temperature: float = Field(2.0, gt=0, description="KD temperature T of the stored soft labels")
    hard_weight: float = Field(1.0, ge=0, description="α: weight of CE on the hard head")
    soft_weight: float = Field(1.0, ge=0, description="λ: weight of the T²-scaled KD loss on the soft head")
    soft_labels: Literal["clean", "views", "online", "official"] = Field(
        "clean", description="Teacher on the clean image (stored), on K stored views replayed, or on the live batch "
        "in eval mode ('online'); 'official' is online with the teacher's BatchNorm in train mode on a copy, as the "
        "reference code's stage III runs it"
    )
    views_per_image: int = Field(8, ge=1, description="K augmented views stored per image in 'views' mode")


class LabelsConfig(Frozen):
    """How a labelset made from this run's teacher is stored (`ltd labels generate`, labels jobs)."""

    top_k: int | None = Field(None, ge=1, description="Store the k most probable classes per image (and view), their "
                              "fp16 probabilities and the fp16 mass of the rest (None: no top-k form)")
    dense: bool = Field(True, description="Also store logits and dense soft labels; false keeps only the top-k form "
                        "(needs top_k; such a labelset cannot be re-tempered)")

    @model_validator(mode="after")
    def _topk_when_sparse(self) -> LabelsConfig:
        if not self.dense and self.top_k is None:
            raise ValueError("labels.dense=false keeps only the top-k form: set labels.top_k (e.g. 10)")
        return self


class Stage4Config(Frozen):
    enabled: bool = Field(True, description="Re-balance a student head with LWS after distillation")
    head: Literal["hard", "soft"] = Field(
        "hard", description="Which head LWS re-balances on the distilled backbone; the other is dropped. 'hard': what "
        "the official stage-IV loader does (it maps the hard head into the LWS fc); 'soft': the paper's wording")
    optim: HeadOptimConfig = HeadOptimConfig()
    sampler: SamplerKind = Field("class", description=SAMPLER_HELP)


class DistributedConfig(Frozen):
    """Data-parallel training on Ray Train: 1 worker (default) trains in one process exactly as without Ray Train."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks); each takes batch_size per step")
    use_gpu: bool | Literal["auto"] = Field("auto", description="One GPU per worker; 'auto': when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (also its torch threads)")
    placement: Literal["PACK", "SPREAD"] = Field("PACK", description="Workers on as few nodes as fit, or spread out")
    max_failures: int = Field(2, ge=-1, description="Restarts from the last checkpoint after a worker dies (-1: no cap)")
    sync_batchnorm: bool = Field(False, description="SyncBatchNorm over the global batch (CUDA only) instead of "
                                                    "per-worker BatchNorm statistics")
    storage_path: Path | None = Field(None, description="Ray Train checkpoint storage, shared by every node "
                                                        "(None: out_dir/ray_train)")


class ExpertsConfig(Frozen):
    """Multi-expert methods (bbn, ride, lfme, experts_ta); experts train with stage1's optim/loss/sampler."""

    n_experts: int = Field(3, ge=2, description="Experts (RIDE, independent experts) or frequency groups (LFME)")
    share: Literal["none", "stem", "first_stage", "all_but_last_block"] | None = Field(
        None, description="Backbone part shared by the experts (None: the method's own: BBN all_but_last_block, "
        "RIDE first_stage, independent experts and LFME none)"
    )
    diversity_weight: float = Field(-0.2, description="RIDE: weight of the KL(expert ‖ mean) term; negative pushes "
                                                      "experts apart (official: -0.2, CIFAR-100 config -0.45)")
    diversity_temperature: float = Field(1.0, gt=0, description="RIDE: base temperature of the diversity KL")
    diversity_reweight_factor: float = Field(0.05, ge=0, le=1, description="RIDE: after DRW starts, per-class "
                                             "temperatures T·(C·r·π_j + 1 − r)/max (r = this factor)")
    router: bool = Field(True, description="RIDE: train the expert-assignment router after the experts")
    router_optim: HeadOptimConfig = HeadOptimConfig()
    router_top_k: int = Field(5, ge=1, description="RIDE router input: top-k of the running mean logits (≤ C)")
    router_hidden: int = Field(16, ge=1, description="RIDE router: hidden units on the expert's feature")
    router_pos_weight: float = Field(20.0, gt=0, description="RIDE router BCE pos_weight (official default)")
    router_threshold: float = Field(0.5, gt=0, lt=1, description="RIDE router: consult the next expert above this")
    lfme_split: Literal["shots", "equal"] = Field(
        "shots", description="LFME groups: many/medium/few by train counts (>100 / 20-100 / <20; empty groups "
        "dropped, a one-class group merged into its neighbour) or n_experts groups of equal class count by frequency"
    )
    lfme_selection_beta: float = Field(0.6, ge=0, lt=1, description="LFME: an expert's KD weight is 1 until the "
                                       "student's group accuracy reaches β·expert's, then falls linearly to 0 at 1·")
    lfme_curriculum_start: float = Field(0.5, gt=0, le=1, description="LFME: fraction of each group's easiest "
                                         "instances weighted in at the first epoch")
    lfme_curriculum_end: float = Field(0.5, gt=0, le=1, description="LFME: fraction of the run after which every "
                                       "instance is weighted in (linear from curriculum_start)")


class RunConfig(Frozen):
    method: Literal[METHODS] = Field("ssd", description="What to train: a joint loss, a decoupled re-balancing, or SSD")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    stage3: Stage3Config = Stage3Config()
    stage4: Stage4Config = Stage4Config()
    labels: LabelsConfig = LabelsConfig()
    experts: ExpertsConfig = ExpertsConfig()
    distributed: DistributedConfig = DistributedConfig()
    seed: int = Field(0, description="Seed of model init, sampling and augmentation")
    device: str = Field("auto", description="'auto' picks CUDA when present, else CPU")
    compile: Literal["none", "default", "reduce-overhead"] = Field(
        "none", description="torch.compile the stage I and III networks; 'reduce-overhead' adds CUDA graphs on a GPU, "
        "where a small net's step is bound by kernel launches (bench/README.md)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: training forward passes under bfloat16 autocast (weights, optimizer state, BatchNorm "
        "statistics and losses stay fp32; evaluation and soft labels run in fp32), for GPUs where the step is "
        "compute-bound")
    channels_last: bool = Field(
        True, description="Train with convolution weights, and so activations, in NHWC layout: oneDNN on CPU and cuDNN "
        "on GPU run it faster than NCHW (bench/README.md); results agree to float rounding, and saved weights load "
        "into either layout")
    cuda_graph: bool | Literal["auto"] = Field(
        "auto", description="Replay each training step whole (forward, backward, SGD update) from one CUDA graph, "
        "captured anew every epoch: one launch instead of about a thousand for a small net (trainer/graphs.py); 2.3x "
        "faster SSD runs on an H200, same results (bench/README.md). 'auto': on for one CUDA device with compile=none, "
        "a joint, decoupled or SSD method and an in-memory dataset (what was checked on a GPU); true: ask for it (a "
        "CPU warns and trains eagerly), also with compile=default, whose Inductor kernels then replay inside the graph")
    cudnn_benchmark: bool = Field(
        True, description="cuDNN autotuning while training: each convolution shape times cuDNN's algorithms once and "
        "keeps the fastest, which pays off for the fixed batch shapes of a training run (PyTorch's performance tuning "
        "guide). Ignored on a CPU")
    stage1_cache: Path | None = Field(
        None, description="Folder of finished stage-I checkpoints, each named by what stage I depends on (data, "
        "model, augmentation, seed, stage1 settings, MoCo on or off): a run whose stage I is already there starts from "
        "it instead of training it again. CE, cRT, LWS, tau-norm and NCM then share one stage I, and so do SSD's "
        "soft-label modes. `ltd reproduce` keeps one beside its runs; None: every run trains its own")
    eval_every: int = Field(0, ge=0, description="Evaluate every N epochs during training (0: only at the end)")
    out_dir: Path = Field(Path("runs/default"), description="Run folder: config, checkpoints, metrics, plots")

    @model_validator(mode="before")
    @classmethod
    def _method_picks_stage_defaults(cls, data: Any) -> Any:
        """Joint methods set stage I's loss and decoupled ones stage II's method, unless told otherwise."""
        if not isinstance(data, dict):
            return data
        method = data.get("method", "ssd")
        if method in JOINT_METHODS:
            _fill(data, ("stage1", "loss", "name"), JOINT_METHODS[method], method)
            if method == "ldam_drw":
                _fill(data, ("stage1", "loss", "drw_start"), 0.8, method)
        if method in DECOUPLED_METHODS:
            _fill(data, ("stage2", "method"), method, method)
        if method in EXPERT_METHODS:  # defaults only: experts may train with any stage-I loss
            name = _default(data, ("stage1", "loss", "name"), EXPERT_METHODS[method])
            if method == "ride" and name == "ldam":
                _default(data, ("stage1", "loss", "drw_start"), 0.8)
        return data

    @model_validator(mode="after")
    def _heads_fit(self) -> RunConfig:
        if self.pipeline in ("decoupled", "ssd") and self.stage1.loss.name == "ldam" and self.stage2.method in ("lws", "tau_norm"):
            raise ValueError(
                f"stage2.method={self.stage2.method} re-scales a linear head, but stage1.loss.name=ldam trains a "
                "cosine head: use stage2.method=crt or ncm, or another stage-I loss"
            )
        if self.compile != "none" and self.distributed.num_workers > 1:
            raise ValueError("compile with distributed.num_workers > 1 is not supported yet: set compile=none")
        if self.cuda_graph is True and self.compile == "reduce-overhead":
            raise ValueError("cuda_graph captures the whole step itself, and compile=reduce-overhead brings CUDA "
                             "graphs of its own: set compile=default (Inductor's kernels inside our graph) or "
                             "compile=none, or cuda_graph=false")
        if self.cuda_graph is True and self.distributed.num_workers > 1:
            raise ValueError("cuda_graph captures the step on one device: set distributed.num_workers=1 or "
                             "cuda_graph=false")
        if self.cuda_graph is True and self.pipeline == "experts":
            raise ValueError(f"cuda_graph is checked on the joint, decoupled and SSD steps, not on {self.method}'s "
                             "expert steps: set cuda_graph=false")
        if self.method == "experts_ta" and self.experts.share not in (None, "none"):
            raise ValueError(f"experts_ta trains its experts one after another, so they cannot share layers "
                             f"(experts.share={self.experts.share}): drop experts.share or set it to none")
        return self

    def stage1_recipe(self) -> dict:
        """Everything stage I's training depends on, and nothing else: runs with equal recipes on the same data train
        the same stage I. The method counts only through the stage-I loss and whether SSD's MoCo branch is on."""
        moco = self.pipeline == "ssd" and self.stage1.moco.weight > 0
        return {"data": self.data.model_dump(mode="json"), "model": self.model.model_dump(mode="json"),
                "augment": self.augment.model_dump(mode="json"), "seed": self.seed, "moco": moco,
                "stage1": self.stage1.model_dump(mode="json", exclude=None if moco else {"moco"})}

    def stage1_share_key(self) -> str | None:
        """What runs that share a stage I through `stage1_cache` have in common (that cache and the recipe), or None
        for a run that shares none: no cache, or an expert method (those train no shared stage I)."""
        if self.stage1_cache is None or self.pipeline == "experts":
            return None
        return json.dumps([str(self.stage1_cache), self.stage1_recipe()], sort_keys=True)

    @property
    def pipeline(self) -> Literal["joint", "decoupled", "ssd", "experts"]:
        if self.method in JOINT_METHODS:
            return "joint"
        if self.method in EXPERT_METHODS:
            return "experts"
        return "decoupled" if self.method in DECOUPLED_METHODS else "ssd"


def _fill(data: dict, path: tuple[str, ...], value: Any, method: str) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if isinstance(node, BaseModel):
            return  # an already-built sub-config is taken as given
    current = node.get(path[-1])
    if current is None:
        node[path[-1]] = value
    elif current != value and path[-1] != "drw_start":
        raise ValueError(
            f"method={method!r} needs {'.'.join(path)}={value!r} but got {current!r}; "
            f"drop that key or change the method"
        )


def _default(data: dict, path: tuple[str, ...], value: Any) -> Any:
    """Set a nested key unless given; returns the value in effect (None inside an already-built sub-config)."""
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if isinstance(node, BaseModel):
            return getattr(node, path[-1], None) if key == path[-2] else None
    if node.get(path[-1]) is None:
        node[path[-1]] = value
    return node[path[-1]]


def parse_override(text: str) -> tuple[list[str], Any]:
    """'stage1.optim.epochs=5' -> (['stage1', 'optim', 'epochs'], 5); the value is read as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base`."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (optional) + dotted overrides, validated once."""
    raw: dict = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config file must hold a mapping, got {type(raw).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        patch: dict = value
        for key in reversed(keys):
            patch = {key: patch}
        raw = merge(raw, patch)
    return RunConfig.model_validate(raw)


def dump_config(cfg: RunConfig, path: Path) -> None:
    """Write the fully resolved config next to a run's outputs."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
