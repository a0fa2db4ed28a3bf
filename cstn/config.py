"""Typed configuration: nested dataclasses, YAML files and dotted overrides.

Precedence, lowest first: dataclass defaults < ``configs/base.yaml`` <
experiment YAML < command-line ``section.key=value`` overrides.

Every field carries a docstring (the string literal right below it), read by
``describe()`` and printed by ``python -m cstn.config --describe``.
Parsing has no side effects: nothing is created, downloaded or logged.

Errors (unknown key, wrong type, bad value) raise :class:`ConfigError`, whose
message names the key, where it came from (file or command line) and the
closest valid key; the CLI turns it into exit status 2.

About 620 lines, most of them the fields and their docstrings: the dataclasses are the
reference of every setting, so they stay in one file a reader can search.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

__all__ = [
    "Config", "DataConfig", "ModelConfig", "LossConfig", "OptimConfig", "TrainConfig",
    "EvalConfig", "LogConfig", "DistConfig", "ConfigError", "load_config", "save_config", "LEGACY_MODEL_VALUES",
    "config_hash", "to_dict", "flatten", "describe", "choices",
]


class ConfigError(ValueError):
    """A configuration problem; the message names key, source and a suggestion."""


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------

@dataclass
class DataConfig:
    root: str = "data/synthetic/shards"
    """Directory (or URL: ``s3://``, ``gs://``, ``http(s)://``) holding one sub-directory per split, each with ``manifest.json`` and shards."""
    cache_dir: str = ""
    """Node-local cache of a remote ``data.root`` (empty: ``$TMPDIR/cstn-shard-cache``): each shard fetched once per node, checked against the manifest's sha256."""
    cache_max_gb: float = 0.0
    """Bound of that cache in GiB (0: unbounded); least recently used shards go first, never one being read."""
    train_split: str = "train"
    """Split name used for training."""
    eval_split: str = "test"
    """Split name used for evaluation (ILSVRC: ``val``; CUB and synthetic: ``test``)."""
    backend: Literal["auto", "dali", "torch"] = "auto"
    """Input backend: ``auto`` (DALI+GPU decode with a GPU, else the faster CPU path), ``dali`` or ``torch``."""
    image_size: int = 320
    """Square network input size in pixels (the paper uses 320)."""
    batch_size: int = 16
    """Training micro-batch per rank (global batch = batch_size x grad_accum x world size)."""
    eval_batch_size: int = 32
    """Evaluation batch per rank."""
    num_workers: int = 2
    """Decode worker processes per rank (torch backend) or DALI CPU threads."""
    random_flip: bool = True
    """Random horizontal flip in training (probability 0.5)."""
    random_resized_crop: bool = False
    """Use a random-resized crop instead of a plain resize in training."""
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    """Area fraction range of the random-resized crop."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel mean (RGB, in [0, 1]) the model subtracts from its uint8 input / 255."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel standard deviation (RGB, in [0, 1])."""
    on_corrupt: Literal["fail", "skip"] = "fail"
    """What a corrupt sample inside a shard does: ``fail`` (error naming the shard) or ``skip`` (counted)."""
    shuffle_buffer: int = 1000
    """Samples held for in-reader shuffling in training (shards are also pre-shuffled at conversion)."""
    verify_shards: Literal["off", "cheap", "full"] = "cheap"
    """Shard identity check at open: ``cheap`` (sizes, counts, the index's sha256, the first/last sample's global index against the manifest), ``full`` (also every tar's sha256, once per file version, cached) or ``off``."""


@dataclass
class ModelConfig:
    arch: Literal["cstn", "cam", "has", "acol", "spg", "adl", "cutmix"] = "cstn"
    """Model family: ``cstn`` (FPN + per-level head, joint p(c, l, s)), ``cam`` (GAP classifier baseline) or a comparison method on CAM: ``has``, ``acol``, ``spg``, ``adl``, ``cutmix``."""
    head: Literal["cstn", "conv"] = "cstn"
    """Per-level head of the ``cstn`` family: ``cstn`` (transform learned) or ``conv`` (plain k x k conv, Table II)."""
    head_impl: Literal["fast", "reference", "im2col", "deform", "project"] = "fast"
    """CSTN head sampling: ``fast`` (= ``im2col``), ``reference`` (grid_sample + conv), ``im2col`` (grid_sample columns + GEMM), ``deform`` (torchvision deform_conv2d) or ``project`` (channels projected before sampling)."""
    backbone: Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    """torchvision ResNet depth: ``resnet10``, ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``."""
    width: float = 1.0
    """Channel-width multiplier of the backbone (only for resnet10: 0.5 gives the CPU demo model)."""
    backbone_weights: Optional[str] = None
    """Local file with backbone weights (a torchvision state dict); nothing is ever downloaded."""
    num_classes: int = 1000
    """Number of classes C."""
    fpn_channels: int = 256
    """Channels P of every FPN level."""
    levels: list[int] = field(default_factory=lambda: [4, 5])
    """FPN levels used: 4 (stride 16) and/or 5 (stride 32)."""
    kernel_sizes: list[int] = field(default_factory=lambda: [13, 7])
    """Window size k (cells) per level, in the order of ``levels`` (authors: 13 on P4, 7 on P5)."""
    paddings: list[int] = field(default_factory=lambda: [0, 0])
    """Zero padding (cells) per level; 0 (the authors') leaves window centres in the middle only."""
    loc_hidden: int = 128
    """Hidden channels of the theta-predicting localisation net."""
    head_channels: int = 256
    """Channels of the k x k filter bank before the 1x1 class conv."""
    cam_last_stride: int = 2
    """Stride of the last ResNet stage for CAM and the comparison methods (1 as in Choe et al. gives finer maps)."""
    has_grid: int = 4
    """Hide-and-Seek (``arch: has``): cells per side of the hiding grid (Choe et al.'s default 4; 56 px cells at 224)."""
    has_hide_prob: float = 0.5
    """Hide-and-Seek: probability that a cell is hidden (Singh & Lee: 0.5)."""
    acol_threshold: float = 0.7
    """ACoL (``arch: acol``): erase where classifier A's normalised map is >= this (Choe et al.'s default 0.7)."""
    spg_thresholds: list[float] = field(default_factory=lambda: [0.7, 0.01, 0.5, 0.05, 0.7, 0.1])
    """SPG (``arch: spg``): (high, low) pairs of the B2, B1 and C guidance masks (Choe et al.'s defaults)."""
    adl_drop_rate: float = 0.75
    """ADL (``arch: adl``): probability of applying the drop mask instead of the importance map (Choe & Shim: 0.75)."""
    adl_gamma: float = 0.9
    """ADL: drop where attention >= gamma x its maximum (Choe et al.'s default 0.9)."""
    cutmix_beta: float = 1.0
    """CutMix (``arch: cutmix``): Beta(beta, beta) law of the kept area (Yun et al.: 1.0)."""
    cutmix_prob: float = 1.0
    """CutMix: probability that a batch is mixed (Choe et al.'s WSOL setting: 1.0)."""
    fpn_upsample: Literal["aligned", "nearest", "bilinear"] = "aligned"
    """FPN top-down upsampling: ``aligned`` (P4 cell i reads P5 at exactly i/2, where the ResNet centres it), ``nearest`` (torchvision's FPN; checkpoints before this option) or ``bilinear`` (the authors', align_corners=False); the last two centre P4's top-down path 8 px up-left of its lateral path."""
    extra_relu: bool = True
    """ReLU after the extra conv-BN pair before the FPN (the authors feed the BN output on: false)."""
    p5_smooth: bool = True
    """3x3 output conv of the FPN on P5, as torchvision's FPN (the authors use the 1x1 inner conv's output: false)."""
    shared_classifier: bool = False
    """One 1x1 class conv shared by every level (the authors'), instead of one per level with its own class biases."""
    loc_net: Literal["kxk_1x1", "authors"] = "kxk_1x1"
    """Theta net: ``kxk_1x1`` (k x k conv, ReLU, 1x1 conv with bias: theta reads the k x k window) or ``authors`` (k x k same-padded conv, ReLU, k x k conv without bias: theta reads 2k-1 cells; odd k only)."""
    window_span: Literal["cells", "taps"] = "cells"
    """What theta's square [-1, 1]^2 spans: ``cells`` (the window's k cells: translation unit and box half side k/2 cells) or ``taps`` (the k tap centres, the authors' align_corners=True grid: (k-1)/2 cells)."""
    level_prior: Literal["none", "balanced"] = "none"
    """``balanced`` offsets each level's logits by -log(H' W') so every level holds equal prior mass in the joint softmax; ``none`` is the paper's."""
    input_method: Literal["none", "has", "cutmix"] = "none"
    """Training inputs of the ``cstn`` arch: ``none``, ``has`` (Hide-and-Seek, model.has_grid / has_hide_prob) or ``cutmix`` (model.cutmix_beta / cutmix_prob; the loss mixes labels)."""


LEGACY_MODEL_VALUES = {"fpn_upsample": "nearest"}
"""ModelConfig fields added with a default that changes the network: the value that reproduces
checkpoints written before the field existed (a missing field in a checkpoint means this value)."""


@dataclass
class LossConfig:
    theta_lambda: float = 1e-4
    """Weight lambda of L_theta (paper eq. 2; Table III)."""
    theta_reduction: Literal["sum", "mean"] = "sum"
    """``sum`` over levels and locations (the paper's) or ``mean`` per location (resolution independent)."""
    scale_alpha: float = 0.0
    """Weight alpha of the level hinge L_scale (paper eq. 3; authors: 5 on CUB)."""
    reg_batch_reduction: Literal["mean", "sum"] = "mean"
    """How L_theta and L_scale combine over the batch: ``mean`` (as L_cls) or ``sum`` (the authors': at batch B their lambda and alpha weigh B times more)."""
    scale_class: Literal["label", "predicted"] = "label"
    """Class c* of the level hinge in training: ``label`` (the true class) or ``predicted`` (argmax p(c), the authors')."""


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    """Optimizer: ``sgd`` (momentum, the authors') or ``adamw``."""
    lr: float = 1e-3
    """Base learning rate of the new layers, for the global batch."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """Weight decay (not applied to norms and biases)."""
    backbone_lr_mult: float = 1.0
    """Learning-rate multiplier of the pretrained backbone."""
    theta_lr_mult: float = 0.05
    """Learning-rate multiplier of the theta-predicting layers (DESIGN §7: full rate blows boxes up)."""
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    """Learning-rate schedule after warmup: ``cosine``, ``step`` or ``constant``."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    step_epochs: list[int] = field(default_factory=lambda: [])
    """Epochs at which ``step`` multiplies the rate by ``gamma``."""
    gamma: float = 0.1
    """Decay factor of the ``step`` schedule."""
    grad_clip: float = 0.0
    """Gradient norm clip (0 = off)."""
    frozen: list[str] = field(default_factory=lambda: [])
    """Parameter-name prefixes left untrained (e.g. ``backbone.layer1.``); each must match a parameter. The authors train neither the stem and layer1 nor the FPN convs and the class conv."""
    no_decay: list[str] = field(default_factory=lambda: [])
    """Parameter-name prefixes without weight decay (the authors: ``heads.``, their STN modules)."""
    decay_norm_bias: bool = False
    """Weight decay on biases and normalisation weights too (the authors' plain SGD groups: true)."""


@dataclass
class TrainConfig:
    epochs: int = 20
    """Training epochs."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16`` (GPU only, loss scaling)."""
    zero_stage: Literal[0, 1, 2] = 0
    """DeepSpeed ZeRO stage (0, 1 or 2)."""
    seed: int = 0
    """Global seed (each rank derives its own from it)."""
    deterministic: bool = False
    """Deterministic algorithms (needed for bit-exact resume tests)."""
    out_dir: str = "runs/default"
    """Run directory: checkpoints, resolved config, metrics, the local MLflow store."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N steps (0 = at epoch end only)."""
    keep_last: int = 2
    """Checkpoints kept besides the best."""
    eval_every_epochs: int = 1
    """Evaluate every E epochs (0 = only at the end)."""
    best_metric: str = "gt_known_loc"
    """Metric that picks the best checkpoint (higher is better)."""
    log_every_steps: int = 20
    """Progress line every N steps (rank 0)."""
    halt_after_steps: int = 0
    """Checkpoint and exit after this many steps without changing the schedule (preemption drills; 0 = off)."""
    deepspeed_json: str = ""
    """Optional JSON of engine-only DeepSpeed knobs merged into the derived config (configs/deepspeed/)."""


@dataclass
class EvalConfig:
    use_transform: bool = True
    """Use transformed boxes; ``false`` swaps in the reference box of the same location (Table I)."""
    level_choice: Literal["joint", "level_first"] = "joint"
    """How the top-1 box picks its location: ``joint`` (the paper's MAP over all levels' locations) or ``level_first`` (the level of largest mass ``sum_l p(c, l, s)`` first, then the MAP location in it). Top-k boxes keep the joint order."""
    iou_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    """IoU thresholds every Loc figure is reported at."""
    topk: int = 5
    """Number of top classes / top boxes for Top-5 metrics."""
    cam_thresholds: int = 100
    """Number of CAM thresholds in [0, 1) for MaxBoxAcc (Choe et al.: 100 in eval)."""
    cam_fixed_threshold: float = 0.2
    """Fixed CAM threshold for the classic protocol (Zhou et al.)."""
    hist_bins: int = 10
    """Equal-width bins of ground-truth box area for the per-size histogram."""
    viz_samples: int = 16
    """Images drawn in the box picture grid."""
    box_decoding: Literal["map", "expected_iou", "scoremap", "logitmap"] = "map"
    """CSTN top-1 / GT-known box: ``map`` (the paper: the box of the most probable location), ``expected_iou`` (the box maximising sum_j p(c, j) IoU(b, b_j) over all levels' boxes), ``scoremap`` (threshold, at eval.cam_fixed_threshold, the map sum_j p(c, j) [x in box_j], min-max normalised, as CAM's) or ``logitmap`` (threshold the class's joint scores read as a map on eval.logitmap_levels, CAM-style); both map decodings add MaxBoxAcc/V2."""
    logitmap_levels: list[int] = field(default_factory=lambda: [])
    """Levels read by ``box_decoding=logitmap`` (empty: every level of the model)."""
    scoremap_temperature: float = 1.0
    """Temperature T of the window score map (``box_decoding=scoremap``): windows weigh p(c, j)^(1/T); 1 is the plain probability, larger flattens a peaked distribution."""
    cam_upsample: Literal["resize", "aligned"] = "resize"
    """How CAM-family maps reach the input size: ``resize`` (cv2.resize, Choe et al.'s protocol: cell c centred at t (c + 0.5)) or ``aligned`` (cell c centred where the ResNet looks, t c + 0.5; a measurement of the protocol's half-cell bias)."""


@dataclass
class LogConfig:
    mlflow: bool = True
    """Log to MLflow from rank 0."""
    tracking_uri: str = ""
    """Tracking URI; empty = ``MLFLOW_TRACKING_URI`` if set, else a store inside the run directory."""
    experiment: str = "cstn-wsol"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name (empty = the run directory's name)."""
    system_metrics: bool = True
    """MLflow's system metrics (CPU, memory, disk, network; GPU with NVML) on rank 0 during training."""
    system_metrics_interval_s: float = 10.0
    """Seconds between two system-metrics samples."""
    log_model: bool = True
    """At the end of training log the model (and the best checkpoint's) as MLflow models: weights, config, input example."""
    register_model: str = ""
    """Register the logged model (the best checkpoint's when there is one) under this name in the MLflow model registry (empty: not registered)."""


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend: ``auto`` (nccl with CUDA, gloo otherwise), ``nccl`` or ``gloo``."""
    timeout_s: int = 600
    """Collective timeout in seconds (a dead rank fails the job after this)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Data and input pipeline."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop and checkpoints."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    log: LogConfig = field(default_factory=LogConfig)
    """Experiment tracking."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed settings."""


# ---------------------------------------------------------------------------
# Validation of values (beyond types)
# ---------------------------------------------------------------------------

def choices(cls=None, prefix: str = "") -> dict[str, tuple]:
    """Every dotted key whose field is annotated ``Literal[...]`` -> its allowed values, read from the
    annotations themselves (the one place they are written)."""
    cls = cls or Config
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(choices(tp, prefix + f.name + "."))
        elif typing.get_origin(tp) is Literal:
            out[prefix + f.name] = typing.get_args(tp)
    return out


def _validate(cfg: Config) -> None:
    for key, allowed in choices().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    m = cfg.model
    if not m.levels or any(level not in (4, 5) for level in m.levels) or len(set(m.levels)) != len(m.levels):
        raise ConfigError(f"model.levels={m.levels} must be a non-empty subset of [4, 5]")
    if len(m.kernel_sizes) != len(m.levels) or len(m.paddings) != len(m.levels):
        raise ConfigError(
            f"model.kernel_sizes ({len(m.kernel_sizes)}) and model.paddings ({len(m.paddings)}) "
            f"need one entry per level in model.levels ({len(m.levels)})")
    if m.input_method != "none" and m.arch != "cstn":
        raise ConfigError(f"model.input_method={m.input_method!r} is for model.arch=cstn (the CAM family has "
                          f"model.arch=has / cutmix)")
    if m.arch == "cstn" and m.loc_net == "authors" and any(k % 2 == 0 for k in m.kernel_sizes):
        raise ConfigError(f"model.loc_net=authors needs odd model.kernel_sizes (same padding), got {m.kernel_sizes}")
    if m.arch == "cstn" and m.window_span == "taps" and min(m.kernel_sizes) < 2:
        raise ConfigError(f"model.window_span=taps needs model.kernel_sizes >= 2, got {m.kernel_sizes}")
    if m.num_classes < 2:
        raise ConfigError(f"model.num_classes={m.num_classes} must be >= 2")
    for key in ("data.image_size", "data.batch_size", "data.eval_batch_size", "train.grad_accum"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{key} must be >= 1")


# ---------------------------------------------------------------------------
# Merging dictionaries into dataclasses
# ---------------------------------------------------------------------------

def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hints = typing.get_type_hints(cls)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def _suggest(key: str) -> str:
    """The closest valid dotted key: section first, then the field within it."""
    candidates = _all_keys()
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close and "." in key:
        section, leaf = key.split(".", 1)
        sections = sorted({k.split(".", 1)[0] for k in candidates})
        sec = difflib.get_close_matches(section, sections, n=1, cutoff=0.5)
        sec = sec[0] if sec else None
        pool = [k for k in candidates if sec is None or k.startswith(sec + ".")]
        leaves = {k.split(".", 1)[1]: k for k in pool}
        match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.5)
        close = [leaves[match[0]]] if match else ([f"{sec}.{leaf}"] if sec and f"{sec}.{leaf}" in candidates else [])
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp``; allow int -> float and None for Optional."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source)
    if origin is Literal:  # the value's type here; membership in _validate, once the config is whole
        return _coerce(value, type(typing.get_args(tp)[0]), key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} (from {source}): expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} (from {source}): expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _merge(obj, values: dict, source: str, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'} (from {source}): expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in names:
            if isinstance(value, dict) and value:  # unknown section: name the full dotted key
                key = f"{key}.{next(iter(flatten(value)))}"
            raise ConfigError(f"unknown key '{key}' (from {source}){_suggest(key)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(obj, name), value, source, key + ".")
        else:
            setattr(obj, name, _coerce(value, tp, key, source))


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"command-line override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key} (from command line): cannot parse value {raw!r}: {exc}") from None
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def load_config(config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: str | Path | None = "auto") -> Config:
    """Resolve a :class:`Config`.

    Args:
        config: experiment YAML (may be ``configs/base.yaml`` itself) or None.
        overrides: ``section.key=value`` strings; values are parsed as YAML.
        base: the base YAML; ``"auto"`` means ``base.yaml`` beside ``config`` when
            that file exists and is not ``config`` itself; None skips it.
    """
    cfg = Config()
    sources: list[tuple[str, dict]] = []
    if config is not None:
        config = Path(config)
        if base == "auto":
            candidate = config.parent / "base.yaml"
            base = candidate if candidate.is_file() and candidate.resolve() != config.resolve() else None
        if base is not None:
            sources.append((str(base), _read_yaml(base)))
        sources.append((str(config), _read_yaml(config)))
    for source, values in sources:
        _merge(cfg, values, source)
    for text in overrides:
        key, value = _parse_override(text)
        _merge(cfg, _nest(key, value), "command line")
    _validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict, source: str = "dict") -> Config:
    cfg = Config()
    _merge(cfg, values, source)
    _validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (the caller creates the directory)."""
    path = Path(path)
    path.write_text(dump_yaml(cfg))
    return path


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(cfg: Config, sections: tuple[str, ...] = ("model",)) -> str:
    """Short sha256 of the given sections (what a checkpoint must agree on)."""
    blob = json.dumps({s: to_dict(getattr(cfg, s)) for s in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _field_docs(cls) -> dict[str, str]:
    """Docstrings written as string literals under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = nxt.value.value
    return docs


def describe(cls=Config, prefix: str = "") -> dict[str, str]:
    """Every dotted key -> its docstring."""
    out = {}
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(describe(hints[f.name], prefix + f.name + "."))
        else:
            out[prefix + f.name] = docs.get(f.name, "")
    return out


def commented_yaml(cfg: Config | None = None) -> str:
    """The config as YAML with each key's docstring as a comment (how ``configs/base.yaml`` is made)."""
    cfg = cfg or Config()
    docs = describe()
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"{section}:")
        for name, value in values.items():
            doc = docs[f"{section}.{name}"]
            for part in textwrap.wrap(doc, 100):
                lines.append(f"  # {part}")
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()
            lines.append(f"  {dumped[1:-1]}")
        lines.append("")
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="experiment YAML (base.yaml beside it is read first)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (command line wins)")


def config_from_args(args: argparse.Namespace) -> Config | None:
    """The config named by a script's ``--config`` and overrides (see :func:`add_config_args`).

    On a :class:`ConfigError` the message goes to stderr and None comes back: the script exits 2.
    """
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cstn.config", description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--print", action="store_true", help="print the resolved config as YAML")
    parser.add_argument("--describe", action="store_true",
                        help="print the resolved config as YAML with every key's docstring as a comment")
    args = parser.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    if args.describe:
        sys.stdout.write(commented_yaml(cfg))
    else:  # --print is the default action
        sys.stdout.write(dump_yaml(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
