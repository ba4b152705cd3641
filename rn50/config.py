"""Training configuration: named YAML files in configs/training/ over a table of defaults.

Every key has a default here, so a config file states only what it changes and a typo'd key is an
error instead of a silently ignored setting.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

# configs/training/ of the checkout (or /opt/rn50/configs/training/ in the training image).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "training"


class ConfigError(Exception):
    """A bad config, override or command line; its message is one line."""


DEFAULTS: Dict[str, Any] = {
    # MLPerf submission metadata (logged as submission_*).
    "submission_org": "rn50-pipeline",
    "submission_platform": "cpu",
    "submission_division": "closed",
    "submission_status": "research",
    # A timed run is an MLPerf result: it may never resume from a checkpoint.
    "timed": True,
    # Model.
    "classes": None,  # None: taken from the data (max label + 1 of the train .lst / idx)
    "depth": [3, 4, 6, 3],
    "width": 64,
    "layout": "NCHW",  # NHWC needs a GPU (cuDNN)
    "dtype": "float32",  # float16 needs a GPU
    "bn_momentum": 0.9,
    "bn_eps": 1e-5,
    "bn_zero_init_last": False,
    # Data.
    "batch_size": 32,  # per rank
    # Every config states it: the launcher starts global_batch_size / batch_size ranks, and
    # rn50.train refuses to start when batch_size x ranks differs (hyper-parameters are tuned for it).
    "global_batch_size": None,
    "train_crop": 224,
    "val_resize": 256,
    "val_crop": 224,
    "min_random_area": 0.05,
    "max_random_area": 1.0,
    "min_random_aspect_ratio": 0.75,
    "max_random_aspect_ratio": 4.0 / 3.0,
    "dali_decode": "auto",  # auto: "mixed" when a GPU is used, else "cpu"
    "dali_threads": 2,
    "dali_prefetch": 2,
    "dali_initial_fill": 1024,
    "dali_hw_decoder_load": 0.0,
    "dali_resize_antialias": False,
    # Optimisation.
    "optimizer": "lars",  # lars | sgd
    "base_lr": 0.1,
    "end_lr": 1e-4,
    "lr_power": 2,
    "warmup_epochs": 2,
    "decay_epochs": None,  # None: max_epochs
    "momentum": 0.9,
    "weight_decay": 5e-5,
    "lars_eta": 0.001,
    "lars_epsilon": 0.0,
    "label_smoothing": 0.1,
    # Parameters per fused optimizer call (multi-tensor LARS, as NVIDIA's fit.py); 0 = the per-tensor
    # reference path. MXNET_OPTIMIZER_AGGREGATION_SIZE, when set, overrides it (as for MXNet's optimizers).
    "optimizer_aggregation": 54,
    # Schedule of the run.
    "max_epochs": 37,  # training stops after the last evaluation epoch on the grid that is <= max_epochs
    "eval_period": 4,
    "eval_offset": 2,  # evaluations only after epochs eval_offset + 1 + k * eval_period (1-based)
    "target_accuracy": 0.759,
    # Horovod: tensor fusion and cycle time are set in the environment before hvd.init().
    "horovod_fusion_threshold_mb": 64,
    "horovod_cycle_time_ms": 5,
    "horovod_num_groups": 0,
    # CPU threads per rank for MXNet's operators (0: leave MXNet/OMP defaults).
    "omp_threads": 0,
    "hybridize": True,
    "log_every": 20,
    # Preflight bandwidth, before run_start (untimed): an allreduce of this many MiB across all ranks, timed
    # (0: none). Below expected_busbw_gbps (0: no expectation) it warns, or with preflight_refuse exits 2.
    "preflight_allreduce_mb": 0.0,
    "expected_busbw_gbps": 0.0,
    "preflight_refuse": False,
}

_CHOICES = {
    "optimizer": ("lars", "sgd"),
    "layout": ("NCHW", "NHWC"),
    "dtype": ("float32", "float16"),
    "dali_decode": ("auto", "cpu", "mixed"),
    "submission_division": ("closed", "open"),
    "submission_status": ("cloud", "onprem", "preview", "research"),
}


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown config {name_or_path!r} (known: {known}; or give a .yaml path)")
    return candidate


def _coerce(key: str, raw: str) -> Any:
    value = yaml.safe_load(raw)
    default = DEFAULTS[key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def load_config(name_or_path: str, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of settings")
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in data.items():
        if key not in DEFAULTS:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        cfg[key] = value
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or key not in DEFAULTS:
            raise ConfigError(f"bad override {item!r}: expected KEY=VALUE with a known KEY")
        cfg[key] = _coerce(key, raw)
    cfg["name"] = path.stem
    validate(cfg)
    return cfg


def validate(cfg: Dict[str, Any]) -> None:
    for key, default in DEFAULTS.items():
        value = cfg[key]
        if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{key} must be a number, not {value!r}")
    for key, allowed in _CHOICES.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, not {cfg[key]!r}")
    for key in ("batch_size", "train_crop", "val_resize", "val_crop", "max_epochs", "eval_period", "width"):
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ConfigError(f"{key} must be a positive integer, not {cfg[key]!r}")
    if not (isinstance(cfg["eval_offset"], int) and 0 <= cfg["eval_offset"] < cfg["eval_period"]):
        raise ConfigError("eval_offset must be in [0, eval_period)")
    if cfg["max_epochs"] < cfg["eval_offset"] + 1:
        raise ConfigError(f"max_epochs {cfg['max_epochs']} ends before the first evaluation "
                          f"(epoch {cfg['eval_offset'] + 1} = eval_offset + 1)")
    gbs = cfg["global_batch_size"]
    if gbs is None:
        raise ConfigError("the config must state global_batch_size (batch_size x ranks it is tuned for)")
    if not isinstance(gbs, int) or isinstance(gbs, bool) or gbs <= 0:
        raise ConfigError(f"global_batch_size must be a positive integer, not {gbs!r}")
    if gbs % cfg["batch_size"]:
        raise ConfigError(f"global_batch_size {gbs} is not a multiple of batch_size {cfg['batch_size']}")
    if not isinstance(cfg["optimizer_aggregation"], int) or cfg["optimizer_aggregation"] < 0:
        raise ConfigError(f"optimizer_aggregation must be an integer >= 0, not {cfg['optimizer_aggregation']!r}")
    if not (isinstance(cfg["depth"], list) and len(cfg["depth"]) == 4 and all(isinstance(d, int) and d > 0 for d in cfg["depth"])):
        raise ConfigError(f"depth must be a list of 4 positive block counts, not {cfg['depth']!r}")
    if cfg["val_crop"] > cfg["val_resize"]:
        raise ConfigError("val_crop must not exceed val_resize")
    if cfg["warmup_epochs"] < 0:
        raise ConfigError("warmup_epochs must be >= 0")
    decay = cfg["decay_epochs"] if cfg["decay_epochs"] is not None else cfg["max_epochs"]
    if decay <= cfg["warmup_epochs"]:
        raise ConfigError("decay_epochs (default max_epochs) must exceed warmup_epochs")
    if not (0.0 < cfg["target_accuracy"] <= 1.0):
        raise ConfigError("target_accuracy must be in (0, 1]")
    if not (0.0 <= cfg["preflight_allreduce_mb"] <= 4096.0) or cfg["expected_busbw_gbps"] < 0:
        raise ConfigError("preflight_allreduce_mb must be in [0, 4096] and expected_busbw_gbps >= 0")
    if not isinstance(cfg["preflight_refuse"], bool):
        raise ConfigError(f"preflight_refuse must be true or false, not {cfg['preflight_refuse']!r}")


def eval_epochs(max_epochs: int, eval_period: int, eval_offset: int) -> List[int]:
    """1-based epochs after which evaluation runs: offset+1, offset+1+period, ... up to max_epochs.

    Only the MLPerf grid: an epoch off it is never evaluated (a run that "converged" there would
    report an epoch count the RCP checker compares wrongly). A run that has not reached the target
    at the last of these epochs stops there, aborted."""
    return list(range(eval_offset + 1, max_epochs + 1, eval_period))


def needs_gpu(cfg: Dict[str, Any]) -> bool:
    """A config the ranks can only run on GPUs: float16, NHWC or DALI mixed decode (`dali_decode: auto` runs
    either way). The launcher counts GPUs and checks NCCL for these; rn50.train refuses them without a GPU."""
    return cfg["dtype"] == "float16" or cfg["layout"] == "NHWC" or cfg["dali_decode"] == "mixed"


def world_size_error(cfg: Dict[str, Any], ranks: int) -> Optional[str]:
    """The one-line refusal when batch_size x ranks is not the config's global_batch_size, else None."""
    if cfg["batch_size"] * ranks == cfg["global_batch_size"]:
        return None
    need = cfg["global_batch_size"] // cfg["batch_size"]
    return (f"batch_size {cfg['batch_size']} x {ranks} rank(s) = global batch {cfg['batch_size'] * ranks}, "
            f"but config {cfg['name']!r} states global_batch_size {cfg['global_batch_size']}: "
            f"launch {need} rank(s) (or --set global_batch_size=...)")
