"""Learning-rate schedule against hand-computed points, LARS update against a hand computation."""
import math

import mxnet as mx
import numpy as np
import pytest

from rn50.optim import MLPerfLARS, PolyWarmupSchedule, smoothed_labels


def test_schedule_seed002_points():
    # Seed 002: base 10.5, 2 warm-up epochs, 37 decay epochs; 1,281,167 / 3264 -> 392 steps/epoch.
    spe = 1281167 // 3264
    assert spe == 392
    s = PolyWarmupSchedule(10.5, 2 * spe, 37 * spe, end_lr=1e-4, power=2)
    assert s(0) == pytest.approx(10.5 / 784)                     # first update: 1/784 of base
    assert s(391) == pytest.approx(10.5 * 392 / 784)             # end of epoch 1: half of base
    assert s(783) == pytest.approx(10.5)                         # last warm-up step reaches base
    assert s(784) == pytest.approx(10.5)                         # decay starts at base (p = 0)
    # Middle of the decay: p = 0.5 -> (10.5 - 1e-4) * 0.25 + 1e-4
    mid = 784 + (37 * spe - 784) // 2
    assert s(mid) == pytest.approx((10.5 - 1e-4) * 0.25 + 1e-4)
    assert s(37 * spe) == pytest.approx(1e-4)                    # end of decay
    assert s(10 ** 7) == pytest.approx(1e-4)                     # clipped past the end
    assert s.decay_steps == 37 * spe - 784


def test_schedule_small_hand_values():
    s = PolyWarmupSchedule(2.0, warmup_steps=4, total_steps=14, end_lr=0.0, power=2)
    assert [s(i) for i in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # p = (step - 4) / 10
    assert s(6) == pytest.approx(2.0 * 0.8 ** 2)
    assert s(9) == pytest.approx(2.0 * 0.5 ** 2)
    assert s(14) == pytest.approx(0.0)


def test_schedule_rejects_decay_shorter_than_warmup():
    with pytest.raises(ValueError):
        PolyWarmupSchedule(1.0, 10, 10)


def _param(name, value):
    p = mx.gluon.Parameter(name, shape=value.shape)
    p.initialize(init=mx.init.Constant(0))
    p.set_data(mx.nd.array(value))
    return p


def test_lars_update_matches_hand_computation():
    w = np.array([3.0, 4.0], dtype=np.float32)   # |w| = 5
    g = np.array([0.6, 0.8], dtype=np.float32)   # |g| = 1
    lr, wd, eta, mom = 0.5, 0.01, 0.001, 0.9
    opt = MLPerfLARS(learning_rate=lr, wd=wd, eta=eta, momentum=mom,
                     param_dict={0: _param("conv0_weight", w), 1: _param("bn0_gamma", w)})
    trust = eta * 5.0 / (1.0 + wd * 5.0)
    weight, state = mx.nd.array(w), opt.create_state(0, mx.nd.array(w))
    opt.update(0, weight, mx.nd.array(g), state)
    step1 = lr * trust * (g + wd * w)
    np.testing.assert_allclose(state.asnumpy(), step1, rtol=1e-5)
    np.testing.assert_allclose(weight.asnumpy(), w - step1, rtol=1e-5)
    # Second step: momentum accumulates.
    w1 = w - step1
    trust2 = eta * np.linalg.norm(w1) / (1.0 + wd * np.linalg.norm(w1))
    opt.update(0, weight, mx.nd.array(g), state)
    step2 = mom * step1 + lr * trust2 * (g + wd * w1)
    np.testing.assert_allclose(weight.asnumpy(), w1 - step2, rtol=1e-5)

    # Batch-norm gamma: no trust ratio, no weight decay.
    weight, state = mx.nd.array(w), opt.create_state(1, mx.nd.array(w))
    opt.update(1, weight, mx.nd.array(g), state)
    np.testing.assert_allclose(weight.asnumpy(), w - lr * g, rtol=1e-6)


def test_sgd_mode_has_no_trust_ratio_but_keeps_bn_exclusion():
    w = np.array([3.0, 4.0], dtype=np.float32)
    g = np.array([0.6, 0.8], dtype=np.float32)
    opt = MLPerfLARS(learning_rate=0.1, wd=0.01, momentum=0.9, lars=False,
                     param_dict={0: _param("dense0_weight", w), 1: _param("dense0_bias", w)})
    weight, state = mx.nd.array(w), opt.create_state(0, mx.nd.array(w))
    opt.update(0, weight, mx.nd.array(g), state)
    np.testing.assert_allclose(weight.asnumpy(), w - 0.1 * (g + 0.01 * w), rtol=1e-6)
    weight, state = mx.nd.array(w), opt.create_state(1, mx.nd.array(w))
    opt.update(1, weight, mx.nd.array(g), state)
    np.testing.assert_allclose(weight.asnumpy(), w - 0.1 * g, rtol=1e-6)


def test_zero_weight_layer_gets_trust_one():
    opt = MLPerfLARS(learning_rate=0.1, wd=0.0, momentum=0.0, param_dict={0: _param("conv_weight", np.zeros(2, np.float32))})
    weight = mx.nd.zeros((2,))
    opt.update(0, weight, mx.nd.array([1.0, -1.0]), opt.create_state(0, weight))
    np.testing.assert_allclose(weight.asnumpy(), [-0.1, 0.1], rtol=1e-6)


def test_float16_weights_keep_an_fp32_master_copy():
    w = np.array([3.0, 4.0], dtype=np.float32)
    opt = MLPerfLARS(learning_rate=0.5, wd=0.0, momentum=0.0, multi_precision=True,
                     param_dict={0: _param("bn_beta", w)})
    weight = mx.nd.array(w, dtype="float16")
    state = opt.create_state_multi_precision(0, weight)
    master = state[0]  # MXNet's base class keeps (fp32 master, optimizer state)
    assert master.dtype == np.float32
    opt.update_multi_precision(0, weight, mx.nd.array([1e-4, 1e-4], dtype="float16"), state)
    # The fp16 weight cannot represent 3 - 5e-5, the fp32 master can.
    assert master.asnumpy()[0] == pytest.approx(3.0 - 5e-5, abs=1e-6)
    assert weight.asnumpy()[0] == 3.0
    assert weight.dtype == np.float16


def test_label_smoothing_targets():
    t = smoothed_labels(mx.nd.array([2, 0], dtype="int32"), classes=4, smoothing=0.1).asnumpy()
    np.testing.assert_allclose(t[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
    np.testing.assert_allclose(t.sum(axis=1), [1.0, 1.0], rtol=1e-6)
    assert math.isclose(t[1, 0], 0.925, rel_tol=1e-6)
