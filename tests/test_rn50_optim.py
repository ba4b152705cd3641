"""Learning-rate schedule against hand-computed points, LARS update against a hand computation, and the
multi-tensor LARS path against the per-tensor reference."""
import math

import mxnet as mx
import numpy as np
import pytest

from rn50.optim import MLPerfLARS, PolyWarmupSchedule, build_optimizer, smoothed_labels


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
    # MXNet's sgd_mom_update convention: the state holds the (negative) velocity.
    np.testing.assert_allclose(state.asnumpy(), -step1, rtol=1e-5)
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


def test_logged_decay_steps_mean_what_the_rcp_table_means():
    # RCP (mlperf_logging rcps_resnet.json, resnet_ref_3264): opt_learning_rate_decay_steps 14523 =
    # 37 epochs x 1,281,167 / 3264, counted from the first step (warm-up included). Ours drops the
    # last partial batch of an epoch (392 steps, not 392.5), so it may differ by under one step/epoch.
    spe = 1281167 // 3264
    s = PolyWarmupSchedule(10.5, 2 * spe, 37 * spe)
    assert s.total_steps == 37 * 392
    assert abs(s.total_steps - 14523) < 37


def _resnet_params(dtype="float32"):
    """Real ResNet-50 v1.5 parameter names and shapes (narrow, so the test stays fast)."""
    from rn50.model import resnet50_v1_5

    net = resnet50_v1_5(classes=10, width=8)
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2))
    net(mx.nd.zeros((1, 3, 32, 32)))
    params = [p for p in net.collect_params().values() if p.grad_req != "null"]
    return [(p.name, p.data().astype(dtype)) for p in params]


def _run_updates(aggregate_num, params, grads_per_step, lars=True, dtype="float32"):
    cfg = {"momentum": 0.9, "weight_decay": 5e-5, "lars_eta": 0.001, "lars_epsilon": 0.0,
           "optimizer": "lars" if lars else "sgd"}
    sched = PolyWarmupSchedule(2.0, 3, 20)
    opt = build_optimizer(cfg, sched, multi_precision=dtype == "float16", aggregate_num=aggregate_num)
    opt.idx2name = {i: name for i, (name, _) in enumerate(params)}
    opt.rescale_grad = 1.0 / 32
    updater = mx.optimizer.get_updater(opt)
    weights = [w.copy() for _, w in params]
    for grads in grads_per_step:
        updater(list(range(len(weights))), [g.astype(dtype) for g in grads], weights)
    masters = [updater.states[i][0] if dtype == "float16" else weights[i] for i in range(len(weights))]
    return [m.asnumpy().astype(np.float64) for m in masters], updater


@pytest.mark.parametrize("lars", [True, False])
def test_multi_tensor_path_equals_per_tensor_reference(lars, monkeypatch):
    """Same ResNet parameters, same gradients, 8 steps through warm-up and decay: the multi-tensor
    path (NVIDIA's multi_sum_sq / multi_lars / preloaded_multi_sgd_mom_update) ends on the same
    weights as the per-tensor reference. fp32; tolerance rtol 1e-4, atol 1e-6 (float summation order
    differs between nd.norm and multi_sum_sq)."""
    params = _resnet_params()
    rng = np.random.default_rng(0)
    steps = [[mx.nd.array(rng.normal(0, 1, w.shape).astype(np.float32)) for _, w in params] for _ in range(8)]
    calls = {"many": 0, "one": 0}
    many, one = MLPerfLARS._update_many, MLPerfLARS._update_one
    monkeypatch.setattr(MLPerfLARS, "_update_many", lambda self, *a, **k: (calls.__setitem__("many", calls["many"] + 1), many(self, *a, **k))[1])
    monkeypatch.setattr(MLPerfLARS, "_update_one", lambda self, *a, **k: (calls.__setitem__("one", calls["one"] + 1), one(self, *a, **k))[1])
    ref, _ = _run_updates(0, params, steps, lars=lars)
    assert calls == {"many": 0, "one": 8 * len(params)}
    fast, _ = _run_updates(54, params, steps, lars=lars)
    assert calls["many"] == 8 * -(-len(params) // 54)          # ceil(n / 54) fused calls per step
    moved = 0
    for (name, w0), a, b in zip(params, ref, fast):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=name)
        moved += not np.allclose(a, w0.asnumpy())
    assert moved == len(params)                                 # every parameter really was updated


def test_multi_tensor_path_float16_keeps_fp32_masters_close_to_reference():
    """fp16 weights with fp32 masters (preloaded_multi_mp_sgd_mom_update): masters match the
    per-tensor path's masters (rtol 1e-3: the gradients are fp16)."""
    params = _resnet_params("float16")
    rng = np.random.default_rng(1)
    steps = [[mx.nd.array(rng.normal(0, 1, w.shape).astype(np.float32)) for _, w in params] for _ in range(4)]
    ref, _ = _run_updates(0, params, steps, dtype="float16")
    fast, upd = _run_updates(54, params, steps, dtype="float16")
    assert upd.states[0][0].dtype == np.float32
    for (name, _), a, b in zip(params, ref, fast):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5, err_msg=name)


def test_trainer_routes_parameters_through_the_multi_tensor_path(monkeypatch):
    """Gluon's Trainer really hands lists to the optimizer when aggregate_num > 0 (MXNet's Updater)."""
    from rn50.model import resnet50_v1_5

    seen = []
    many = MLPerfLARS._update_many
    monkeypatch.setattr(MLPerfLARS, "_update_many", lambda self, idx, *a, **k: (seen.append(len(idx)), many(self, idx, *a, **k))[1])
    net = resnet50_v1_5(classes=4, layers=[1, 1, 1, 1], width=8)
    net.initialize(mx.init.Xavier())
    cfg = {"momentum": 0.9, "weight_decay": 5e-5, "lars_eta": 0.001, "lars_epsilon": 0.0, "optimizer": "lars"}
    opt = build_optimizer(cfg, PolyWarmupSchedule(1.0, 1, 10), multi_precision=False, aggregate_num=16)
    trainer = mx.gluon.Trainer(net.collect_params(), opt)
    with mx.autograd.record():
        loss = net(mx.nd.ones((2, 3, 32, 32))).sum()
    loss.backward()
    trainer.step(2)
    n = sum(1 for p in net.collect_params().values() if p.grad_req != "null")
    assert sum(seen) == n and max(seen) == 16
