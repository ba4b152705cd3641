"""Optimizer and learning-rate schedule of MLPerf closed ResNet.

- Schedule: linear warm-up to `base_lr` over `warmup_steps`, then polynomial decay of power 2 to
  `end_lr` (1e-4) at `total_steps` (the MLPerf reference's poly schedule).
- LARS (You et al. 2017), the form NVIDIA's submissions use: the layer-wise trust ratio and the
  weight decay apply to conv/dense weights only; batch-norm gamma/beta and biases get the plain
  learning rate and no weight decay; no momentum correction; epsilon 0 (the ruleset requires 0).
- SGD: the same update with the trust ratio off (weight decay still skips BN and biases).
- Two implementations of the same update:
  * multi-tensor (the default, as NVIDIA's `common/fit.py` SGDwFASTLARS and MXNet's own LARS): the
    updater hands over up to `aggregate_num` parameters at once; one `multi_sum_sq` per weights and
    per gradients, one `multi_lars` for all trust ratios, one `preloaded_multi_(mp_)sgd_mom_update`
    for all updates — a handful of operator launches per step instead of ~10 per parameter;
  * per-tensor (`aggregate_num=0`): one Python update per parameter, the readable reference.
  tests/test_rn50_optim.py proves them equal; bench/optimizer.py measures the difference.
  Momentum state follows MXNet's sgd_mom_update convention in both (v = m*v - lr*g'; w += v), so a
  checkpoint written by one path resumes in the other.
- Label smoothing: cross-entropy against (1-eps) one-hot + eps/K.
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

import mxnet as mx
from mxnet import nd

NO_DECAY_SUFFIXES = ("gamma", "beta", "bias")
# NVIDIA's MLPerf v0.7 setting (MXNET_OPTIMIZER_AGGREGATION_SIZE=54 in configs/env/gpu.env).
DEFAULT_AGGREGATE_NUM = 54


class PolyWarmupSchedule:
    """lr(step) for the 0-based index of the update being applied.

    warm-up:  lr = base_lr * (step + 1) / warmup_steps              for step < warmup_steps
    decay:    lr = (base_lr - end_lr) * (1 - p) ** power + end_lr,  p = (step - W) / (T - W), clipped to 1

    `total_steps` (T) is what MLPerf logs as `lars_opt_learning_rate_decay_steps`: the step, counted
    from the first one, at which the learning rate reaches `end_lr` (the RCP table's 14523 for GBS
    3264 is 37 epochs x 1,281,167 / 3264 steps).
    """

    def __init__(self, base_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 1e-4,
                 power: float = 2.0):
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.base_lr, self.warmup_steps, self.total_steps = base_lr, warmup_steps, total_steps
        self.end_lr, self.power = end_lr, power

    @property
    def decay_steps(self) -> int:
        """Length of the polynomial phase alone (after warm-up)."""
        return self.total_steps - self.warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        p = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        return (self.base_lr - self.end_lr) * (1.0 - p) ** self.power + self.end_lr


def is_no_decay(name: str) -> bool:
    return name.endswith(NO_DECAY_SUFFIXES)


def aggregate_num_from_env(default: int) -> int:
    """MXNET_OPTIMIZER_AGGREGATION_SIZE when set (as for MXNet's own optimizers), else `default`."""
    raw = os.environ.get("MXNET_OPTIMIZER_AGGREGATION_SIZE")
    return int(raw) if raw not in (None, "") else int(default)


@mx.optimizer.register
class MLPerfLARS(mx.optimizer.Optimizer):
    """Momentum SGD with an optional LARS trust ratio; see the module docstring for the exact form.

    update:  g' = rescale * g (+ wd * w on weights);  lr_l = lr * trust (weights, lars=True) or lr
             v = momentum * v - lr_l * g';  w = w + v
    trust = eta * |w| / (|rescale * g| + wd * |w| + eps), or 1 where |w| or |g| is 0.
    `aggregate_num` > 0 selects the multi-tensor path (MXNet's updater then passes lists of up to
    that many parameters); 0 the per-tensor reference path.
    """

    def __init__(self, momentum: float = 0.9, eta: float = 0.001, eps: float = 0.0, lars: bool = True,
                 aggregate_num: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.eta, self.eps, self.lars = momentum, eta, eps, lars
        self.aggregate_num = int(aggregate_num)
        if self.aggregate_num < 0:
            raise ValueError(f"aggregate_num must be >= 0, not {aggregate_num}")

    def create_state(self, index, weight):
        return nd.zeros(weight.shape, weight.context, dtype=weight.dtype)

    def _name(self, index) -> str:
        if index in self.param_dict:
            return self.param_dict[index].name
        return self.idx2name.get(index, str(index))

    # ---- per-tensor reference path -------------------------------------------------------------
    def _update_one(self, index, weight, grad, state):
        self._update_count(index)
        lr = self._get_lr(index)
        no_decay = is_no_decay(self._name(index))
        wd = 0.0 if no_decay else self._get_wd(index)
        g = grad * self.rescale_grad
        if self.clip_gradient is not None:
            g = nd.clip(g, -self.clip_gradient, self.clip_gradient)
        if self.lars and not no_decay:
            w_norm = nd.norm(weight.astype("float32"))
            g_norm = nd.norm(g.astype("float32"))
            ratio = self.eta * w_norm / (g_norm + wd * w_norm + self.eps)
            # Where either norm is 0 (fresh zero-init layer) the trust ratio is 1, as in the paper.
            trust = nd.where((w_norm > 0) * (g_norm > 0), ratio, nd.ones_like(ratio))
            step = (g + wd * weight) * (lr * trust).astype(weight.dtype)
        else:
            step = (g + wd * weight) * lr if wd else g * lr
        state[:] = self.momentum * state - step
        weight[:] = weight + state

    # ---- multi-tensor path ---------------------------------------------------------------------
    def _update_many(self, indices: List[int], weights, grads, states, multi_precision: bool) -> None:
        if self.clip_gradient is not None:
            raise ValueError("the multi-tensor LARS path does not clip gradients; use aggregate_num=0")
        self._update_count(indices)
        n = len(indices)
        ctx = weights[0].context
        names = [self._name(i) for i in indices]
        no_decay = [is_no_decay(name) for name in names]
        wds = [0.0 if nd_ else wd for nd_, wd in zip(no_decay, self._get_wds(indices))]
        lrs_list = self._get_lrs(indices)
        lrs = nd.array(lrs_list, ctx=ctx, dtype="float32")
        wds_nd = nd.array(wds, ctx=ctx, dtype="float32")
        # fp16 weights: the trust ratio and the update work on the fp32 master copies.
        masters = [s[0] for s in states] if multi_precision else list(weights)
        if self.lars and not all(no_decay):
            w_sq = nd.multi_sum_sq(*masters, num_arrays=n)
            g_sq = nd.multi_sum_sq(*grads, num_arrays=n)
            scaled = nd.multi_lars(lrs, w_sq, g_sq, wds_nd, eta=self.eta, eps=self.eps,
                                   rescale_grad=self.rescale_grad)
            mask = nd.array([0.0 if x else 1.0 for x in no_decay], ctx=ctx, dtype="float32")
            lrs = nd.where(mask, scaled, lrs)
        kwargs = {"momentum": self.momentum, "rescale_grad": self.rescale_grad, "num_weights": n}
        if multi_precision:
            data = []
            for w, g, s in zip(weights, grads, states):
                data += [w, g, s[1], s[0]]
            nd.preloaded_multi_mp_sgd_mom_update(*(data + [lrs, wds_nd]), out=list(weights), **kwargs)
        else:
            data = []
            for w, g, s in zip(weights, grads, states):
                data += [w, g, s]
            nd.preloaded_multi_sgd_mom_update(*(data + [lrs, wds_nd]), out=list(weights), **kwargs)

    # ---- entry points (MXNet's Updater calls update_multi_precision) ---------------------------
    def update(self, index, weight, grad, state):
        if isinstance(index, (list, tuple)):
            self._update_many(list(index), weight, grad, state, multi_precision=False)
        else:
            self._update_one(index, weight, grad, state)

    def update_multi_precision(self, index, weight, grad, state):
        first = weight[0] if isinstance(weight, (list, tuple)) else weight
        mp = self.multi_precision and first.dtype == np.float16
        if not isinstance(index, (list, tuple)):
            return super().update_multi_precision(index, weight, grad, state)
        self._update_many(list(index), weight, grad, state, multi_precision=mp)


def build_optimizer(cfg: dict, schedule: PolyWarmupSchedule, multi_precision: bool,
                    aggregate_num: Optional[int] = None) -> MLPerfLARS:
    """The optimizer of `cfg` with the schedule attached (gradient averaging is Horovod's job).

    aggregate_num: None reads MXNET_OPTIMIZER_AGGREGATION_SIZE, else cfg["optimizer_aggregation"]."""
    if aggregate_num is None:
        aggregate_num = aggregate_num_from_env(cfg.get("optimizer_aggregation", DEFAULT_AGGREGATE_NUM))
    return MLPerfLARS(
        learning_rate=schedule.base_lr,
        lr_scheduler=_Scheduler(schedule),
        momentum=cfg["momentum"],
        wd=cfg["weight_decay"],
        eta=cfg["lars_eta"],
        eps=cfg["lars_epsilon"],
        lars=cfg["optimizer"] == "lars",
        multi_precision=multi_precision,
        aggregate_num=aggregate_num,
    )


class _Scheduler(mx.lr_scheduler.LRScheduler):
    """MXNet calls the scheduler with num_update, which counts from 1 after the first update."""

    def __init__(self, schedule: PolyWarmupSchedule):
        super().__init__(base_lr=schedule.base_lr)
        self.schedule = schedule

    def __call__(self, num_update: int) -> float:
        return self.schedule(max(0, num_update - 1))


def smoothed_labels(label: nd.NDArray, classes: int, smoothing: float, dtype="float32") -> nd.NDArray:
    off = smoothing / classes
    return nd.one_hot(label, classes, on_value=1.0 - smoothing + off, off_value=off, dtype=dtype)
