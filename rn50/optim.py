"""Optimizer and learning-rate schedule of MLPerf closed ResNet.

- Schedule: linear warm-up to `base_lr` over `warmup_steps`, then polynomial decay of power 2 to
  `end_lr` (1e-4) at `total_steps` (the MLPerf reference's poly schedule).
- LARS (You et al. 2017), the form NVIDIA's submissions use: the layer-wise trust ratio and the
  weight decay apply to conv/dense weights only; batch-norm gamma/beta and biases get the plain
  learning rate and no weight decay; no momentum correction; epsilon 0 (the ruleset requires 0).
- SGD: the same update with the trust ratio off (weight decay still skips BN and biases).
- Label smoothing: cross-entropy against (1-eps) one-hot + eps/K.
"""
from __future__ import annotations

import mxnet as mx
from mxnet import nd

NO_DECAY_SUFFIXES = ("gamma", "beta", "bias")


class PolyWarmupSchedule:
    """lr(step) for the 0-based index of the update being applied.

    warm-up:  lr = base_lr * (step + 1) / warmup_steps              for step < warmup_steps
    decay:    lr = (base_lr - end_lr) * (1 - p) ** power + end_lr,  p = (step - W) / (T - W), clipped to 1
    """

    def __init__(self, base_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 1e-4,
                 power: float = 2.0):
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.base_lr, self.warmup_steps, self.total_steps = base_lr, warmup_steps, total_steps
        self.end_lr, self.power = end_lr, power

    @property
    def decay_steps(self) -> int:
        return self.total_steps - self.warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        p = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        return (self.base_lr - self.end_lr) * (1.0 - p) ** self.power + self.end_lr


def is_no_decay(name: str) -> bool:
    return name.endswith(NO_DECAY_SUFFIXES)


@mx.optimizer.register
class MLPerfLARS(mx.optimizer.Optimizer):
    """Momentum SGD with an optional LARS trust ratio; see the module docstring for the exact form.

    update:  g' = rescale * g (+ wd * w on weights);  lr_l = lr * trust (weights, lars=True) or lr
             m = momentum * m + lr_l * g';  w = w - m
    The trust ratio stays on the device (no host sync per layer), so it costs nothing extra on GPU.
    """

    def __init__(self, momentum: float = 0.9, eta: float = 0.001, eps: float = 0.0, lars: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.eta, self.eps, self.lars = momentum, eta, eps, lars

    def create_state(self, index, weight):
        return nd.zeros(weight.shape, weight.context, dtype=weight.dtype)

    def _name(self, index) -> str:
        if index in self.param_dict:
            return self.param_dict[index].name
        return self.idx2name.get(index, str(index))

    def update(self, index, weight, grad, state):
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
        state[:] = self.momentum * state + step
        weight[:] = weight - state


def build_optimizer(cfg: dict, schedule: PolyWarmupSchedule, multi_precision: bool) -> MLPerfLARS:
    """The optimizer of `cfg` with the schedule attached (gradient averaging is Horovod's job)."""
    return MLPerfLARS(
        learning_rate=schedule.base_lr,
        lr_scheduler=_Scheduler(schedule),
        momentum=cfg["momentum"],
        wd=cfg["weight_decay"],
        eta=cfg["lars_eta"],
        eps=cfg["lars_epsilon"],
        lars=cfg["optimizer"] == "lars",
        multi_precision=multi_precision,
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
