"""One frozen config dataclass per stage. Defaults live here and only here.

``params.yaml`` has one section per stage (same name as the ``dvc.yaml`` stage and the
``cifd`` subcommand) plus ``paths``; :func:`load_stage` reads ``paths`` and one section.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from schemas.base import ConfigError, StrictConfig, require

C = TypeVar("C", bound=StrictConfig)

DEVICE_RULE = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"


def _check_device(section: str, value: str) -> None:
    ok = value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    require(ok, section, "device", value, DEVICE_RULE)


@dataclasses.dataclass(frozen=True)
class Paths(StrictConfig):
    """Every artifact path of the pipeline, relative to the project root."""

    shards: str = "data/shards"
    teacher: str = "models/teacher.safetensors"
    cache: str = "cache/teacher.zarr"
    rdm_models: str = "models/rdm.safetensors"
    rdm_cache: str = "cache/rdm.zarr"
    students: str = "models/students"
    checkpoints: str = "checkpoints"  # per-epoch training checkpoints, kept outside DVC outputs
    tune: str = "tune"  # cifd tune: its SQLite studies, results and best-params files
    metrics: str = "metrics"
    plots: str = "plots"


@dataclasses.dataclass(frozen=True)
class ViewPolicyConfig(StrictConfig):
    """How augmented views are drawn. View 0 is always the clean, uncropped image.

    ``rrc``: random-resized crop (area fraction in ``scale``, aspect ratio in ``ratio``);
    ``pad_crop``: the CIFAR crop, a full-size box shifted by up to ``pad`` pixels (zero
    padding); ``none``: every view is the clean view (only flips, if enabled).
    """

    kind: Literal["rrc", "pad_crop", "none"] = "rrc"
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    pad: int = 4
    flip: bool = True

    def check(self, section: str) -> None:
        lo, hi = self.scale
        require(0.0 < lo <= hi <= 1.0, section, "scale", self.scale, "expected 0 < min <= max <= 1")
        lo, hi = self.ratio
        require(0.0 < lo <= hi, section, "ratio", self.ratio, "expected 0 < min <= max")
        require(self.pad >= 0, section, "pad", self.pad, "expected >= 0")


@dataclasses.dataclass(frozen=True)
class MixupConfig(StrictConfig):
    """Mixed views (Beyer et al.'s mixup "function matching"), cached and replayed exactly.

    The last ``views`` of the V views of every train image are mixed: ``λ · view +
    (1 − λ) · partner view`` in pixels, the partner another image of the same shard, ``λ ~
    Beta(alpha, alpha)``; the teacher's outputs are those of the mixed image. ``views: 0``
    (the default) mixes nothing. The val split is never mixed.

    ``cutmix``: of those mixed views, the last ``cutmix`` are CutMix views instead (Yun et
    al.): a box of the partner's view, its side ``floor(S · sqrt(1 − λ₀))`` with ``λ₀ ~
    Beta(alpha, alpha)``, pasted at a uniform centre; λ is the own pixels' fraction left.
    """

    views: int = 0
    alpha: float = 1.0
    cutmix: int = 0

    def check(self, section: str) -> None:
        require(self.views >= 0, section, "views", self.views, "expected >= 0 (0: no mixed views)")
        require(self.alpha > 0, section, "alpha", self.alpha, "expected > 0 (Beta(alpha, alpha))")
        require(0 <= self.cutmix <= self.views, section, "cutmix", self.cutmix,
                f"expected 0 <= cutmix <= {section}.views ({self.views}): CutMix views are some of the mixed views")


@dataclasses.dataclass(frozen=True)
class PrepareConfig(StrictConfig):
    """Source → WebDataset shards (``cifd prepare``).

    ``shuffle``: rows are put in a seeded random order before sharding (an ImageFolder lists
    images class by class, and a stream that reads a few shards at a time would otherwise see
    one or two classes per batch). The manifest records the rule and the seed.

    Images keep their own size and bytes. ``mode``: the colour mode every image is decoded
    to, ``RGB`` (alpha dropped, grey and palette images converted) or ``L`` (grey); null:
    ``L`` for digits, ``RGB`` otherwise. ``max_side``: images whose longer side is over it
    are shrunk to it and re-encoded (the manifest lists them); null keeps every image as is.
    """

    def colour_mode(self) -> str:
        """The colour mode images are decoded to (``mode``, or the source's natural one)."""
        return self.mode or ("L" if self.source == "digits" else "RGB")

    source: Literal["digits", "imagefolder", "webdataset"] = "digits"
    train: str | None = None
    val: str | None = None
    val_fraction: float = 0.2
    limit_train: int | None = None
    limit_val: int | None = None
    classes: tuple[str, ...] | None = None
    samples_per_shard: int = 256
    mode: Literal["RGB", "L"] | None = None
    max_side: int | None = None
    on_corrupt: Literal["error", "skip"] = "error"
    max_corrupt_fraction: float = 0.01
    shuffle: bool = True
    seed: int = 0

    def check(self, section: str) -> None:
        if self.source == "digits":
            require(self.train is None, section, "train", self.train, "must be null for source 'digits'")
        else:
            require(self.train is not None, section, "train", self.train,
                    f"source '{self.source}' needs a path (directory, tar, or shard glob)")
        require(0.0 < self.val_fraction < 1.0, section, "val_fraction", self.val_fraction,
                "expected 0 < val_fraction < 1 (used when 'val' is null)")
        for name in ("limit_train", "limit_val"):
            value = getattr(self, name)
            require(value is None or value > 0, section, name, value, "expected null or > 0")
        require(self.samples_per_shard > 0, section, "samples_per_shard", self.samples_per_shard,
                "expected > 0")
        require(self.max_side is None or self.max_side >= 8, section, "max_side", self.max_side,
                "expected null (keep every image) or >= 8 pixels")
        require(0.0 <= self.max_corrupt_fraction <= 1.0, section, "max_corrupt_fraction",
                self.max_corrupt_fraction, "expected 0 <= x <= 1")


# What a model without a timm pretrained config (a ``module:function`` entrypoint) gets for
# the preprocessing fields its params leave out; image_size, mean and std have no fallback.
FALLBACK_PREPROCESS = {"crop_pct": 1.0, "interpolation": "bilinear"}


@dataclasses.dataclass(frozen=True)
class PreprocessConfig(StrictConfig):
    """A model's input (``teacher.preprocess``, ``distill.preprocess``).

    ``image_size``: the square input side S. ``crop_pct``: the clean evaluation view is the
    image's shorter side resized to ``floor(S / crop_pct)`` then a centre crop of S (timm's
    and torchvision's eval transform). ``interpolation``: the resampling filter of every view
    (antialiased when shrinking). ``mean`` / ``std``: per-channel normalisation.

    A field left null comes from the model's timm pretrained config
    (``timm.data.resolve_model_data_config``); a model without one gets
    :data:`FALLBACK_PREPROCESS` and must be given image_size, mean and std. The frozen teacher
    file and the cache record what was used and where each value came from.
    """

    image_size: int | None = None
    crop_pct: float | None = None
    interpolation: Literal["bilinear", "bicubic"] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def check(self, section: str) -> None:
        require(self.image_size is None or self.image_size > 0, section, "image_size", self.image_size,
                "expected null or > 0")
        require(self.crop_pct is None or 0.0 < self.crop_pct <= 1.0, section, "crop_pct", self.crop_pct,
                "expected null or 0 < crop_pct <= 1")
        require(self.mean is None or self.std is None or len(self.mean) == len(self.std), section, "std", self.std,
                f"expected as many values as mean ({len(self.mean or ())})")
        require(self.std is None or all(s > 0 for s in self.std), section, "std", self.std, "expected all > 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig(StrictConfig):
    """Optimizer and one-cycle learning-rate schedule: ``teacher.optim`` and ``distill.optim``.

    ``name``: ``sgd`` (Nesterov, the CIFAR recipe) or ``adamw``. ``momentum`` is SGD's
    momentum or AdamW's β1. The schedule is one-cycle: warm-up over ``pct_start`` of the
    steps to ``lr``, then cosine annealing. ``cycle_momentum`` lets the schedule also cycle
    the momentum between 0.85 and 0.95 (torch's ``OneCycleLR`` default, which would ignore
    ``momentum``); off by default, so the configured momentum is the one used.
    ``grad_clip``: max global gradient norm per step; null = no clipping.
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    pct_start: float = 0.15
    cycle_momentum: bool = False
    grad_clip: float | None = None

    def check(self, section: str) -> None:
        require(self.lr > 0 and math.isfinite(self.lr), section, "lr", self.lr, "expected a finite value > 0")
        require(self.weight_decay >= 0, section, "weight_decay", self.weight_decay, "expected >= 0")
        require(0.0 <= self.momentum < 1.0, section, "momentum", self.momentum, "expected 0 <= momentum < 1")
        require(0.0 < self.pct_start < 1.0, section, "pct_start", self.pct_start, "expected 0 < pct_start < 1")
        require(self.grad_clip is None or self.grad_clip > 0, section, "grad_clip", self.grad_clip,
                "expected null (no clipping) or > 0")


@dataclasses.dataclass(frozen=True)
class TeacherConfig(StrictConfig):
    """The frozen teacher (``cifd teacher``): build, optionally fine-tune, evaluate, freeze.

    ``model`` is a timm model name or ``package.module:function`` (see README, "Your own
    teacher"). ``epochs: 0`` freezes the given weights without training.

    ``data`` (fine-tune only): ``memory`` decodes both splits once and holds them (a device
    batch when every image has one size); ``stream`` reads the train split's shards each
    epoch through ``loader_workers`` processes and a ``shuffle_buffer``, and the val split one
    shard at a time, so memory does not grow with the dataset. Both draw the same augmented
    boxes per epoch; only the order of the rows differs.
    """

    model: str = "resnet10t"
    weights: str | None = None
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    in_chans: int = 1
    preprocess: PreprocessConfig = PreprocessConfig()
    epochs: int = 12
    batch_size: int = 128
    optim: OptimConfig = OptimConfig()
    eval_batch_size: int = 512
    label_smoothing: float = 0.0
    augment: ViewPolicyConfig = ViewPolicyConfig(kind="pad_crop", pad=2, flip=False)
    data: Literal["memory", "stream"] = "memory"
    loader_workers: int = 0
    shuffle_buffer: int = 1000
    device: str = "auto"
    seed: int = 0

    def check(self, section: str) -> None:
        require(bool(self.model), section, "model", self.model, "expected a timm name or module:function")
        require(self.loader_workers >= 0, section, "loader_workers", self.loader_workers, "expected >= 0")
        require(self.shuffle_buffer >= 1, section, "shuffle_buffer", self.shuffle_buffer, "expected >= 1")
        require(self.in_chans in (1, 3) or self.in_chans > 0, section, "in_chans", self.in_chans, "expected > 0")
        for name in ("mean", "std"):
            value = getattr(self.preprocess, name)
            require(value is None or len(value) == self.in_chans, f"{section}.preprocess", name, value,
                    f"expected {self.in_chans} values (one per input channel, teacher.in_chans)")
        require(self.epochs >= 0, section, "epochs", self.epochs, "expected >= 0 (0 = no fine-tune)")
        require(self.batch_size > 0, section, "batch_size", self.batch_size, "expected > 0")
        require(self.eval_batch_size > 0, section, "eval_batch_size", self.eval_batch_size, "expected > 0")
        require(0 <= self.label_smoothing < 1, section, "label_smoothing", self.label_smoothing,
                "expected 0 <= x < 1")
        _check_device(section, self.device)


@dataclasses.dataclass(frozen=True)
class EmbedConfig(StrictConfig):
    """Stage one (``cifd embed``): teacher outputs for V views per image into Zarr.

    ``scheduler``: ``local`` starts a dask LocalCluster of ``workers`` processes;
    ``synchronous`` runs in this process (debugging); anything else is the address of an
    existing dask scheduler (``tcp://host:8786``).

    ``logits``: ``stored`` writes the teacher's logits; ``from_head`` writes none and stores
    the teacher's linear classifier head (weight, bias) in the cache instead: readers
    recompute the logits from the cached (float16) embeddings, on their device (allowed only
    when classifier(embedding) reproduces the teacher's logits, checked at embed).
    ``logits_dtype``: how stored logits are kept (bfloat16 as its 16 bits, see
    ``schemas.layout``). ``logits_topk``: keep only the k largest logits of each view, their
    class ids and the tail mass (for large C; the student's KL runs over the kept classes).
    """

    views: int = 4
    policy: ViewPolicyConfig = ViewPolicyConfig()
    mixup: MixupConfig = MixupConfig()
    batch_size: int = 256
    logits: Literal["stored", "from_head"] = "stored"
    logits_dtype: Literal["float16", "bfloat16", "float32"] = "float32"
    logits_topk: int | None = None
    chunk_rows: int = 64
    scheduler: str = "local"
    workers: int = 1
    threads_per_worker: int = 2
    device: str = "auto"
    seed: int = 0

    def check(self, section: str) -> None:
        require(self.views >= 1, section, "views", self.views, "expected >= 1 (view 0 is the clean view)")
        require(self.mixup.views < self.views, f"{section}.mixup", "views", self.mixup.views,
                f"expected < embed.views ({self.views}): view 0 stays the clean view")
        require(self.batch_size > 0, section, "batch_size", self.batch_size, "expected > 0")
        require(self.logits_topk is None or self.logits_topk >= 1, section, "logits_topk", self.logits_topk,
                "expected null (all classes) or an int >= 1")
        require(self.logits_topk is None or self.logits == "stored", section, "logits_topk", self.logits_topk,
                "top-k keeps part of stored logits; with logits: from_head no logits are stored: set one of them")
        require(self.chunk_rows > 0, section, "chunk_rows", self.chunk_rows, "expected > 0")
        require(self.workers >= 1, section, "workers", self.workers, "expected >= 1")
        require(self.threads_per_worker >= 1, section, "threads_per_worker", self.threads_per_worker,
                "expected >= 1")
        require(bool(self.scheduler), section, "scheduler", self.scheduler,
                "expected 'local', 'synchronous' or a scheduler address")
        _check_device(section, self.device)


@dataclasses.dataclass(frozen=True)
class RdmConfig(StrictConfig):
    """Stage two (``cifd rdm``): M Rate-Distortion Modules trained on the cache alone.

    One RDM per entry of ``rate_weights`` (R). The loss weighs R × (squared error summed
    over the D embedding dims) against the rate in bits; with ``scale_embeddings`` the
    embeddings are first divided by their train RMS, so R means the same for any teacher
    (see README, "Choosing R"): per-dim distortion ≈ 1 / (2 ln2 · R) where the embedding
    carries that much signal. Larger R → more bits, less distortion, a stronger assistant.

    ``data: stream`` reads the teacher cache a few Zarr shards at a time each epoch (blocks
    in a seeded random order, the (row, view) pairs of ``shuffle_blocks`` blocks shuffled
    together; memory does not grow with the cache); ``memory`` holds every pair on the
    device (small caches, fastest on a GPU). Blocks mix classes when ``prepare.shuffle``
    was on (the default).
    """

    rate_weights: tuple[float, ...] = (16.0, 4.0, 1.0)
    hidden: int = 512
    scale_embeddings: bool = True
    init_scale: float = 1.0
    epochs: int = 30
    batch_size: int = 512
    eval_batch_size: int = 2048
    lr: float = 1e-3
    pct_start: float = 0.1
    density_lr_factor: float = 10.0
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    temperature: float = 2.0
    distortion: Literal["mse", "smooth_l1"] = "mse"
    data: Literal["memory", "stream"] = "stream"
    shuffle_blocks: int = 2
    device: str = "auto"
    threads: int = 1
    seed: int = 0

    def check(self, section: str) -> None:
        require(self.shuffle_blocks >= 1, section, "shuffle_blocks", self.shuffle_blocks, "expected >= 1")
        require(len(self.rate_weights) >= 1 and all(r > 0 for r in self.rate_weights), section,
                "rate_weights", self.rate_weights, "expected one or more values > 0 (one RDM each)")
        require(self.hidden > 0, section, "hidden", self.hidden, "expected > 0")
        require(self.init_scale > 0, section, "init_scale", self.init_scale, "expected > 0")
        require(self.density_lr_factor > 0, section, "density_lr_factor", self.density_lr_factor, "expected > 0")
        require(self.epochs >= 1, section, "epochs", self.epochs, "expected >= 1")
        require(self.batch_size > 0, section, "batch_size", self.batch_size, "expected > 0")
        require(self.eval_batch_size > 0, section, "eval_batch_size", self.eval_batch_size, "expected > 0")
        require(self.lr > 0 and math.isfinite(self.lr), section, "lr", self.lr, "expected a finite value > 0")
        require(0.0 < self.pct_start < 1.0, section, "pct_start", self.pct_start, "expected 0 < pct_start < 1")
        for name in ("ce_weight", "kl_weight"):
            require(getattr(self, name) >= 0, section, name, getattr(self, name), "expected >= 0")
        require(self.temperature > 0, section, "temperature", self.temperature, "expected > 0")
        require(self.threads >= 1, section, "threads", self.threads, "expected >= 1")
        _check_device(section, self.device)


METHODS = ("ce", "kd", "dgkd", "cifd")


# Keys every method shares: ``per_method`` cannot set them.
_SHARED_DISTILL_KEYS = ("methods", "per_method", "student", "student_kwargs")


@dataclasses.dataclass(frozen=True)
class DistillConfig(StrictConfig):
    """Stage three (``cifd distill --method M``): a student from images + cached targets.

    Methods: ``ce`` (labels only), ``kd`` (Hinton: (1-α)·CE + α·τ²·KL), ``dgkd`` (KD to the
    teacher and every RDM, KD dropout, no IBM), ``cifd`` (KD to teacher and RDMs, feature
    losses through a projection, IBM rate, KD dropout). ``ckd_weight`` > 0 adds the
    comparative pair term to any method. Defaults are the paper's (DESIGN §2).

    ``preprocess``: the student's input. null: the teacher's (the cached pixels exactly). A
    mapping: its fields, the rest from the student's timm pretrained config, else from the
    teacher's. Either way the student sees the same crop box as the teacher, rendered at its
    own size and normalisation.

    ``views``: the cached views the student draws from (indices into the cache's V; null:
    all). ``rows_fraction``: train on a seeded subset (``rows_seed``) of that fraction of the
    train rows (memory mode). Together they set the teacher forwards behind the student's
    targets, rows × views (the metrics report it): the naive one-output cache is ``views:
    [0]``, a single random view ``views: [1]``.

    ``per_method``: each method's own settings, merged over the section for that method only
    (nested like the section: ``per_method: {kd: {temperature: 4.0, optim: {lr: 0.02}}}``), so
    every method can run with the settings validated for it (``cifd tune`` writes them in this
    form). The stage for method M uses :meth:`for_method` (M).
    """

    methods: tuple[str, ...] = METHODS
    student: str = "resnet10t"
    student_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    preprocess: PreprocessConfig | None = None
    epochs: int = 15
    batch_size: int = 128
    eval_batch_size: int = 512
    optim: OptimConfig = OptimConfig()
    temperature: float = 2.0
    kd_alpha: float = 0.9
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    rdm_weights: tuple[float, ...] | None = None
    feature_weight: float = 100.0
    rate_weight: float = 0.005
    kd_dropout: float = 0.25
    ibm: bool = True
    ibm_init_scale: float = 10.0
    ibm_noise_scale: float | None = None
    feature_warmup: float = 0.0
    feature_norm: Literal["global", "sample"] = "global"
    distortion: Literal["mse", "smooth_l1"] = "mse"
    ckd_weight: float = 0.0
    views: tuple[int, ...] | None = None
    rows_fraction: float = 1.0
    rows_seed: int = 0
    data: Literal["memory", "stream"] = "memory"
    loader_workers: int = 0
    shuffle_buffer: int = 1000
    channels_last: bool = True
    amp: bool = True
    device: str = "auto"
    threads: int = 2
    seed: int = 0
    per_method: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def for_method(self, method: str) -> DistillConfig:
        """The settings method ``method`` trains with: ``per_method[method]`` merged over the
        section (nested mappings merged key by key), checked, with ``per_method`` cleared."""
        data = self.to_dict()
        own = data.pop("per_method").get(method, {})

        def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
            out = dict(base)
            for key, value in over.items():
                out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) \
                    else value
            return out

        return DistillConfig.from_mapping(merge(data, own), section=f"distill.per_method.{method}")

    def check(self, section: str) -> None:
        require(len(self.methods) >= 1 and all(m in METHODS for m in self.methods), section, "methods",
                self.methods, f"expected a non-empty list of {list(METHODS)}")
        require(bool(self.student), section, "student", self.student, "expected a timm name or module:function")
        require(self.epochs >= 1, section, "epochs", self.epochs, "expected >= 1")
        require(self.batch_size > 0, section, "batch_size", self.batch_size, "expected > 0")
        require(self.eval_batch_size > 0, section, "eval_batch_size", self.eval_batch_size, "expected > 0")
        require(self.ibm_init_scale > 0, section, "ibm_init_scale", self.ibm_init_scale, "expected > 0")
        require(self.ibm_noise_scale is None or self.ibm_noise_scale > 0, section, "ibm_noise_scale",
                self.ibm_noise_scale, "expected null (unit noise, the paper's) or > 0 (relative to the embedding RMS)")
        require(0.0 <= self.feature_warmup <= 1.0, section, "feature_warmup", self.feature_warmup,
                "expected a fraction of the run's steps in [0, 1]")
        require(self.shuffle_buffer >= 1, section, "shuffle_buffer", self.shuffle_buffer, "expected >= 1")
        require(self.temperature > 0, section, "temperature", self.temperature, "expected > 0")
        require(0.0 <= self.kd_alpha <= 1.0, section, "kd_alpha", self.kd_alpha, "expected 0 <= α <= 1")
        require(0.0 <= self.kd_dropout < 1.0, section, "kd_dropout", self.kd_dropout, "expected 0 <= p < 1")
        for name in ("ce_weight", "kl_weight", "feature_weight", "rate_weight", "ckd_weight"):
            require(getattr(self, name) >= 0, section, name, getattr(self, name), "expected >= 0")
        require(self.rdm_weights is None or all(w >= 0 for w in self.rdm_weights), section, "rdm_weights",
                self.rdm_weights, "expected null (all 1) or one weight >= 0 per RDM")
        require(self.views is None or (len(self.views) >= 1 and len(set(self.views)) == len(self.views)
                                       and all(isinstance(v, int) and v >= 0 for v in self.views)),
                section, "views", self.views, "expected null (every cached view) or a list of distinct view indices >= 0")
        require(0.0 < self.rows_fraction <= 1.0, section, "rows_fraction", self.rows_fraction,
                "expected 0 < fraction <= 1 (1: every train row)")
        require(self.rows_fraction == 1.0 or self.data == "memory", section, "rows_fraction", self.rows_fraction,
                "a subset of the train rows needs distill.data: memory (the stream reads whole shards)")
        require(self.loader_workers >= 0, section, "loader_workers", self.loader_workers, "expected >= 0")
        require(self.threads >= 1, section, "threads", self.threads, "expected >= 1")
        _check_device(section, self.device)
        # Last: a bad value of the section itself is reported as distill.<key>, not per method.
        for method, own in self.per_method.items():
            require(method in METHODS, section, "per_method", method, f"expected keys among {list(METHODS)}")
            require(isinstance(own, Mapping) and not set(_SHARED_DISTILL_KEYS) & set(own), section,
                    f"per_method.{method}", own, "expected a mapping of distill settings other than "
                    f"{', '.join(_SHARED_DISTILL_KEYS)} (every method distills the same student)")
            self.for_method(method)  # a bad key or value in it is reported now, as distill.per_method.<method>


@dataclasses.dataclass(frozen=True)
class ParamSpec(StrictConfig):
    """One dimension of a ``tune.space``: a float or int range (``log``: sampled on a log
    scale) or a list of ``choices``. ``size``: for a list-valued setting (``rdm_weights``),
    draw that many values from the same range."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None
    size: int | None = None

    def check(self, section: str) -> None:
        if self.choices is not None:
            require(len(self.choices) >= 1 and self.low is None and self.high is None, section, "choices",
                    self.choices, "expected a non-empty list, and no low/high with it")
            return
        require(self.low is not None and self.high is not None and self.low < self.high, section, "low",
                (self.low, self.high), "expected low < high (or a list of choices)")
        require(not self.log or (self.low is not None and self.low > 0), section, "log", self.log,
                "a log range needs low > 0")
        require(self.size is None or self.size >= 1, section, "size", self.size, "expected null or >= 1")


# What ``cifd tune`` searches when params give no space for a method: every method gets its
# optimizer's lr; the KD methods their temperature (and KD's α, the multi-target methods'
# KD dropout); CIFD its feature and rate weights, the β warm-up, the IBM noise scale and the
# gradient clip. Keys are ``distill`` keys (``optim.lr``).
DEFAULT_SPACE: dict[str, dict[str, dict[str, Any]]] = {
    "ce": {"optim.lr": {"low": 3e-4, "high": 3e-2, "log": True}},
    "kd": {"optim.lr": {"low": 3e-4, "high": 3e-2, "log": True},
           "temperature": {"low": 1.0, "high": 8.0},
           "kd_alpha": {"low": 0.3, "high": 1.0}},
    "dgkd": {"optim.lr": {"low": 3e-4, "high": 3e-2, "log": True},
             "temperature": {"low": 1.0, "high": 8.0},
             "kd_dropout": {"low": 0.0, "high": 0.5}},
    "cifd": {"optim.lr": {"low": 3e-4, "high": 3e-2, "log": True},
             "temperature": {"low": 1.0, "high": 8.0},
             "kd_dropout": {"low": 0.0, "high": 0.5},
             "feature_weight": {"low": 0.1, "high": 300.0, "log": True},
             "rate_weight": {"low": 1e-4, "high": 0.05, "log": True},
             "feature_warmup": {"low": 0.0, "high": 0.5},
             "ibm_noise_scale": {"low": 0.01, "high": 1.0, "log": True},
             "optim.grad_clip": {"low": 0.5, "high": 20.0, "log": True}},
}


@dataclasses.dataclass(frozen=True)
class TuneConfig(StrictConfig):
    """``cifd tune --method M``: an Optuna study of ``distill`` settings for one method.

    Each trial trains one student on the cached targets of train minus a held-out
    ``holdout_fraction`` (drawn with ``holdout_seed``) and is scored by its top-1 on the
    held-out rows' clean views after every epoch: the reported val split is never read.
    ``epochs``: per trial (null: ``distill.epochs``). Sampler: TPE seeded with ``seed``.
    ``pruner``: ``median`` (stop a trial whose epoch score is below the median of earlier
    trials at that epoch, after ``startup_trials`` trials), ``halving`` (successive halving,
    reduction factor 3) or ``none``; neither stops a trial before epoch ``prune_after`` (a
    one-cycle warm-up keeps every trial near chance for its first epochs). ``n_jobs``: trials
    run side by side (null: CPU cores // ``distill.threads`` on CPU, 2 on a GPU). ``trials``:
    the study's total of finished (complete or pruned) trials; a rerun resumes the SQLite
    study in ``paths.tune`` and runs only the missing ones. ``space``: per method, a mapping
    of ``distill`` keys (``feature_weight``, ``optim.lr``, ...) to a :class:`ParamSpec`; a
    method absent from it searches ``DEFAULT_SPACE``. ``enqueue``: settings (mappings of
    space keys to values) tried first, in order, when the study is new, e.g. the current
    defaults, so the study always scores them. ``objective``: ``top1`` (the holdout top-1), or
    ``top1_kl`` (the top-1, ties broken by the lower KL(teacher ‖ student) on the holdout:
    ``top1 + 1e-6 · exp(-KL)``; an easy holdout that many settings saturate still ranks them).
    """

    trials: int = 30
    objective: Literal["top1", "top1_kl"] = "top1_kl"
    epochs: int | None = None
    holdout_fraction: float = 0.2
    holdout_seed: int = 0
    seed: int = 0
    pruner: Literal["median", "halving", "none"] = "median"
    startup_trials: int = 5
    prune_after: int = 1
    n_jobs: int | None = None
    space: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    enqueue: tuple[Mapping[str, Any], ...] = ()

    def check(self, section: str) -> None:
        require(self.trials >= 1, section, "trials", self.trials, "expected >= 1")
        require(self.epochs is None or self.epochs >= 1, section, "epochs", self.epochs, "expected null or >= 1")
        require(0.0 < self.holdout_fraction < 1.0, section, "holdout_fraction", self.holdout_fraction,
                "expected 0 < fraction < 1")
        require(self.startup_trials >= 0, section, "startup_trials", self.startup_trials, "expected >= 0")
        require(self.prune_after >= 1, section, "prune_after", self.prune_after, "expected an epoch >= 1")
        require(self.n_jobs is None or self.n_jobs >= 1, section, "n_jobs", self.n_jobs, "expected null or >= 1")
        for method, entries in self.space.items():
            require(method in METHODS, f"{section}.space", method, method, f"expected a method of {list(METHODS)}")
            require(isinstance(entries, Mapping) and len(entries) >= 1, f"{section}.space", method, entries,
                    "expected a mapping of distill keys to {low, high[, log]} or {choices}")
            self.specs(method, section=section)

    def specs(self, method: str, *, section: str = "tune") -> tuple[tuple[str, ParamSpec], ...]:
        """The checked search space of ``method``: ``(distill key, spec)`` pairs."""
        entries = self.space.get(method, DEFAULT_SPACE[method])
        out = []
        for key, raw in entries.items():
            where = f"{section}.space.{method}"
            head, _, rest = str(key).partition(".")
            ok = (head in {f.name for f in dataclasses.fields(DistillConfig)} and head not in _UNTUNABLE
                  and (not rest if head != "optim" else rest in {f.name for f in dataclasses.fields(OptimConfig)}))
            require(ok, where, key, raw, "expected a distill key such as feature_weight or optim.lr")
            require(isinstance(raw, Mapping), where, key, raw, "expected {low, high[, log]} or {choices: [...]}")
            out.append((str(key), ParamSpec.from_mapping(raw, section=f"{where}.{key}")))
        return tuple(out)


_UNTUNABLE = frozenset({"methods", "student", "student_kwargs", "preprocess", "data", "device", "threads",
                        "loader_workers", "seed"})


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(StrictConfig):
    """``cifd evaluate``: every distilled student against the teacher on the val split."""

    methods: tuple[str, ...] = METHODS
    batch_size: int = 512
    device: str = "auto"

    def check(self, section: str) -> None:
        require(all(m in METHODS for m in self.methods), section, "methods", self.methods,
                f"expected a list of {list(METHODS)}")
        require(self.batch_size > 0, section, "batch_size", self.batch_size, "expected > 0")
        _check_device(section, self.device)


STAGES: dict[str, type[StrictConfig]] = {
    "prepare": PrepareConfig,
    "teacher": TeacherConfig,
    "embed": EmbedConfig,
    "rdm": RdmConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "tune": TuneConfig,
}


def read_params(path: str | Path) -> dict[str, Any]:
    """Read a params file; a missing or malformed file is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}. Run from the project root or pass --params.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"params file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_stage(path: str | Path, stage: str, cls: type[C]) -> tuple[Paths, C]:
    """Return ``(paths, config)`` for one stage from a params file."""
    data = read_params(path)
    paths = Paths.from_mapping(data.get("paths"), section="paths")
    return paths, cls.from_mapping(data.get(stage), section=stage)


def trusted_teacher_entrypoint(path: str | Path) -> str:
    """The user's own ``teacher.model``: the one ``module:function`` a teacher file may name
    beyond timm and ``pipeline.models`` (a file from elsewhere cannot choose code to import)."""
    return load_stage(path, "teacher", TeacherConfig)[1].model
