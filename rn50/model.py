"""ResNet-50 v1.5 in Gluon.

v1.5 differs from the original v1 only in where a downsampling bottleneck strides: on the 3x3
convolution, not on the first 1x1 (the 1x1 would discard 3/4 of the activations unseen). This is
the MLPerf reference model; at 1000 classes it has 25,557,032 trainable parameters.
`width` and `layers` exist so tests and the CPU demo can run a narrower/shallower net with the same
code; the defaults are ResNet-50.
"""
from __future__ import annotations

from typing import Sequence

from mxnet import init
from mxnet.gluon import nn
from mxnet.gluon.block import HybridBlock

RESNET50_LAYERS = (3, 4, 6, 3)


class Bottleneck(HybridBlock):
    """1x1 reduce -> 3x3 (carries the stride, v1.5) -> 1x1 expand, plus a projection shortcut."""

    def __init__(self, channels: int, stride: int, downsample: bool, bn: dict, layout: str,
                 zero_init_last_bn: bool, **kwargs):
        super().__init__(**kwargs)
        mid = channels // 4
        axis = layout.index("C")
        with self.name_scope():
            self.body = nn.HybridSequential(prefix="")
            self.body.add(nn.Conv2D(mid, 1, 1, 0, use_bias=False, layout=layout))
            self.body.add(nn.BatchNorm(axis=axis, **bn))
            self.body.add(nn.Activation("relu"))
            self.body.add(nn.Conv2D(mid, 3, stride, 1, use_bias=False, layout=layout))
            self.body.add(nn.BatchNorm(axis=axis, **bn))
            self.body.add(nn.Activation("relu"))
            self.body.add(nn.Conv2D(channels, 1, 1, 0, use_bias=False, layout=layout))
            # Zero-init of the last BN's gamma makes each block start as identity (Goyal et al.);
            # optional because the seed 002 system did not use it.
            self.body.add(nn.BatchNorm(axis=axis, gamma_initializer="zeros" if zero_init_last_bn else "ones", **bn))
            if downsample:
                self.downsample = nn.HybridSequential(prefix="")
                self.downsample.add(nn.Conv2D(channels, 1, stride, 0, use_bias=False, layout=layout))
                self.downsample.add(nn.BatchNorm(axis=axis, **bn))
            else:
                self.downsample = None

    def hybrid_forward(self, F, x):
        residual = self.downsample(x) if self.downsample is not None else x
        return F.Activation(self.body(x) + residual, act_type="relu")


class ResNetV15(HybridBlock):
    def __init__(self, classes: int = 1000, layers: Sequence[int] = RESNET50_LAYERS, width: int = 64,
                 layout: str = "NCHW", bn_momentum: float = 0.9, bn_eps: float = 1e-5,
                 zero_init_last_bn: bool = False, **kwargs):
        super().__init__(**kwargs)
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, not {layout!r}")
        bn = {"momentum": bn_momentum, "epsilon": bn_eps}
        axis = layout.index("C")
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="")
            self.features.add(nn.Conv2D(width, 7, 2, 3, use_bias=False, layout=layout))
            self.features.add(nn.BatchNorm(axis=axis, **bn))
            self.features.add(nn.Activation("relu"))
            self.features.add(nn.MaxPool2D(3, 2, 1, layout=layout))
            channels = width * 4
            for stage, n_blocks in enumerate(layers):
                stage_blocks = nn.HybridSequential(prefix=f"stage{stage + 1}_")
                with stage_blocks.name_scope():
                    for i in range(n_blocks):
                        stride = 2 if (i == 0 and stage > 0) else 1
                        stage_blocks.add(Bottleneck(channels, stride, downsample=(i == 0), bn=bn, layout=layout,
                                                    zero_init_last_bn=zero_init_last_bn, prefix=""))
                self.features.add(stage_blocks)
                channels *= 2
            self.features.add(nn.GlobalAvgPool2D(layout=layout))
            # N(0, 0.01) weights and zero bias, as NVIDIA's MLPerf ResNet; the convolutions get the
            # trainer's default (He/MSRA) init.
            self.output = nn.Dense(classes, weight_initializer=init.Normal(0.01))

    def hybrid_forward(self, F, x):
        return self.output(self.features(x))


def resnet50_v1_5(classes: int = 1000, **kwargs) -> ResNetV15:
    return ResNetV15(classes=classes, **kwargs)


def count_trainable(net: HybridBlock) -> int:
    """Parameters that receive gradients (BN running statistics are excluded)."""
    total = 0
    for p in net.collect_params().values():
        if p.grad_req != "null":
            n = 1
            for d in p.shape:
                n *= d
            total += n
    return total
