"""MLPerf logging for one training run: rank 0 writes RUN_DIR/result_<n>.txt, other ranks log nothing.

`mlperf_logging.mllog`'s shared logger appends to every handler ever configured, so each run gets
its own `logging.Logger` (unique name, no propagation) with its own file handler, installed via
`mllog.config(logger=...)` and torn down by `close()`.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from mlperf_logging import mllog
from mlperf_logging.mllog import constants as C

_ids = itertools.count()

# Keys the 4.0.0 training ruleset requires for closed ResNet (common + closed_common + closed_resnet
# + the closed_resnet_{lars,sgd} file that opt_name selects). tests/test_rn50_mllog.py checks them.
REQUIRED_KEYS_COMMON = (
    "submission_benchmark", "submission_org", "submission_division", "submission_status",
    "submission_platform", "cache_clear", "init_start", "init_stop", "run_start", "run_stop",
    "train_samples", "eval_samples", "gradient_accumulation_steps", "global_batch_size", "opt_name",
    "eval_accuracy",
)
REQUIRED_KEYS_LARS = (
    "lars_opt_base_learning_rate", "lars_opt_end_learning_rate", "lars_opt_learning_rate_decay_poly_power",
    "lars_opt_learning_rate_decay_steps", "lars_epsilon", "lars_opt_learning_rate_warmup_epochs",
    "lars_opt_momentum", "lars_opt_weight_decay",
)
REQUIRED_KEYS_SGD = (
    "sgd_opt_base_learning_rate", "sgd_opt_end_learning_rate", "sgd_opt_learning_rate_decay_poly_power",
    "sgd_opt_learning_rate_decay_steps", "sgd_opt_weight_decay", "sgd_opt_momentum", "model_bn_span",
    "opt_learning_rate_warmup_epochs",
)


class RunLogger:
    """Thin wrapper over mllog; every method is a no-op on ranks other than 0."""

    def __init__(self, path: Optional[Path], rank: int, append: bool = False, echo: bool = True):
        self.enabled = rank == 0 and path is not None
        self.path = Path(path) if path is not None else None
        self._logger: Optional[logging.Logger] = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        logger = logging.getLogger(f"rn50.mllog.{os.getpid()}.{next(_ids)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        # "w": a retried timed attempt starts a fresh log instead of appending to a failed one.
        fh = logging.FileHandler(str(self.path), mode="a" if append else "w")
        fh.setLevel(logging.INFO)
        logger.addHandler(fh)
        if echo:
            sh = logging.StreamHandler(sys.stdout)
            sh.setLevel(logging.INFO)
            logger.addHandler(sh)
        self._logger = logger
        mllog.config(logger=logger, default_stack_offset=2, root_dir=str(Path(__file__).resolve().parent.parent))
        self._ml = mllog.get_mllogger()

    def event(self, key: str, value: Any = None, metadata: Optional[Dict[str, Any]] = None) -> None:
        if self.enabled:
            self._ml.event(key=key, value=value, metadata=metadata)

    def start(self, key: str, value: Any = None, metadata: Optional[Dict[str, Any]] = None) -> None:
        if self.enabled:
            self._ml.start(key=key, value=value, metadata=metadata)

    def end(self, key: str, value: Any = None, metadata: Optional[Dict[str, Any]] = None) -> None:
        if self.enabled:
            self._ml.end(key=key, value=value, metadata=metadata)

    def tracked_stats(self, epoch: int, throughput: float) -> None:
        """The aggregate img/s of an epoch, as NVIDIA's MLPerf logs carry it (after epoch_stop; the
        checker does not read it)."""
        self.event("tracked_stats", {"throughput": round(throughput, 3)}, metadata={"step": epoch})

    def note(self, text: str) -> None:
        """A plain line (not an MLLOG record; the checker ignores it)."""
        if self._logger is not None:
            self._logger.info(text)

    def log_submission(self, cfg: Dict[str, Any]) -> None:
        self.event(C.SUBMISSION_BENCHMARK, C.RESNET)
        self.event(C.SUBMISSION_ORG, cfg["submission_org"])
        self.event(C.SUBMISSION_DIVISION, cfg["submission_division"])
        self.event(C.SUBMISSION_STATUS, cfg["submission_status"])
        self.event(C.SUBMISSION_PLATFORM, cfg["submission_platform"])

    def log_hyperparameters(self, cfg: Dict[str, Any], global_batch: int, per_rank_batch: int,
                            warmup_epochs: float, decay_steps: int) -> None:
        self.event(C.GLOBAL_BATCH_SIZE, global_batch)
        self.event(C.GRADIENT_ACCUMULATION_STEPS, 1)
        # Batch norm statistics are computed over each rank's own batch (no cross-rank BN).
        self.event(C.MODEL_BN_SPAN, per_rank_batch)
        self.event(C.OPT_NAME, cfg["optimizer"])
        if cfg["optimizer"] == "lars":
            self.event(C.LARS_EPSILON, cfg["lars_epsilon"])
            self.event(C.LARS_OPT_WEIGHT_DECAY, cfg["weight_decay"])
            self.event(C.LARS_OPT_MOMENTUM, cfg["momentum"])
            self.event(C.LARS_OPT_BASE_LEARNING_RATE, cfg["base_lr"])
            self.event(C.LARS_OPT_END_LR, cfg["end_lr"])
            self.event(C.LARS_OPT_LR_DECAY_POLY_POWER, cfg["lr_power"])
            self.event(C.LARS_OPT_LR_DECAY_STEPS, decay_steps)
            self.event(C.LARS_OPT_LEARNING_RATE_WARMUP_EPOCHS, warmup_epochs)
        else:
            self.event("sgd_opt_weight_decay", cfg["weight_decay"])
            self.event("sgd_opt_momentum", cfg["momentum"])
            self.event("sgd_opt_base_learning_rate", cfg["base_lr"])
            self.event("sgd_opt_end_learning_rate", cfg["end_lr"])
            self.event("sgd_opt_learning_rate_decay_poly_power", cfg["lr_power"])
            self.event("sgd_opt_learning_rate_decay_steps", decay_steps)
            self.event(C.OPT_LR_WARMUP_EPOCHS, warmup_epochs)

    def close(self) -> None:
        if self._logger is not None:
            for h in list(self._logger.handlers):
                h.flush()
                h.close()
                self._logger.removeHandler(h)
            self._logger = None
            # Leave mllog's shared logger pointing at a handler-less logger, not at our closed file.
            mllog.config(logger=logging.getLogger(f"rn50.mllog.closed.{os.getpid()}.{next(_ids)}"))
