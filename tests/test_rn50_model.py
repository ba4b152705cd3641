"""ResNet-50 v1.5: parameter count and where the stride sits."""
import mxnet as mx
import pytest

from rn50.model import Bottleneck, count_trainable, resnet50_v1_5


@pytest.fixture(scope="module")
def rn50():
    net = resnet50_v1_5(classes=1000)
    net.initialize()
    out = net(mx.nd.zeros((1, 3, 224, 224)))
    assert out.shape == (1, 1000)
    return net


def test_parameter_count_is_resnet50(rn50):
    assert count_trainable(rn50) == 25_557_032


def _blocks(net):
    return [b for stage in list(net.features)[4:8] for b in stage]


def test_stride_on_the_3x3_not_the_1x1(rn50):
    blocks = _blocks(rn50)
    assert [len(s) for s in list(rn50.features)[4:8]] == [3, 4, 6, 3]
    firsts = [list(rn50.features)[4 + i][0] for i in range(4)]
    for stage, block in enumerate(firsts):
        conv1x1, conv3x3 = block.body[0], block.body[3]
        assert conv1x1._kwargs["kernel"] == (1, 1) and conv1x1._kwargs["stride"] == (1, 1)
        want = (1, 1) if stage == 0 else (2, 2)
        assert conv3x3._kwargs["kernel"] == (3, 3) and conv3x3._kwargs["stride"] == want
        assert block.downsample[0]._kwargs["stride"] == want
    # No other block strides at all.
    for block in blocks:
        if block not in firsts:
            assert all(c._kwargs["stride"] == (1, 1) for c in block.body if isinstance(c, mx.gluon.nn.Conv2D))
            assert block.downsample is None


def test_spatial_sizes_follow_v1_5():
    """Feature map after each stage: 56, 28, 14, 7 for a 224 input."""
    net = resnet50_v1_5(classes=10)
    net.initialize()
    x = mx.nd.zeros((1, 3, 224, 224))
    sizes = []
    for i, layer in enumerate(net.features):
        x = layer(x)
        if 4 <= i < 8:
            sizes.append(x.shape[2])
    assert sizes == [56, 28, 14, 7]


def test_small_variant_is_an_explicit_option():
    net = resnet50_v1_5(classes=4, layers=[1, 1, 1, 1], width=8)
    net.initialize()
    net.hybridize()
    assert net(mx.nd.zeros((2, 3, 32, 32))).shape == (2, 4)
    assert count_trainable(net) < 200_000
    assert isinstance(net.features[4][0], Bottleneck)


def test_final_dense_layer_is_normal_0_01_under_the_trainers_default_init():
    """NVIDIA's MLPerf ResNet initialises the classifier N(0, 0.01) (bias 0); rn50.train initialises
    the net with He/MSRA as the default, which must not override the dense layer's own init."""
    net = resnet50_v1_5(classes=1000)
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2))
    net(mx.nd.zeros((1, 3, 64, 64)))
    w = net.output.weight.data().asnumpy()
    assert abs(w.mean()) < 1e-3 and w.std() == pytest.approx(0.01, rel=0.02)
    assert not net.output.bias.data().asnumpy().any()
    # The convolutions keep He init: std sqrt(2 / fan_in) for the 7x7 stem (fan_in 147).
    stem = net.features[0].weight.data().asnumpy()
    assert stem.std() == pytest.approx((2 / 147) ** 0.5, rel=0.1)
