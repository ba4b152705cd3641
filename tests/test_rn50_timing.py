"""rn50.timing.EpochClock against a scripted clock: which steps are sampled, what each mark measures,
and the summary's arithmetic. (The clock in real training runs: tests/test_rn50_train.py.)"""
import pytest

from rn50.config import ConfigError, load_config
from rn50.timing import EpochClock, percentile


class Script:
    """A clock that advances only when told, and a `wait` that advances it by the engine's backlog."""

    def __init__(self):
        self.t, self.backlog, self.waits = 0.0, 0.0, 0

    def now(self):
        return self.t

    def wait(self):
        self.waits += 1
        self.t += self.backlog
        self.backlog = 0.0


def test_sampling_period_shrinks_for_short_epochs_and_skips_the_first_step():
    c = EpochClock(lambda: None, every=16, min_samples=4)
    c.reset(1000)
    assert [s for s in range(1000) if c.sampled(s)][:3] == [16, 32, 48] and not c.sampled(0)
    c.reset(15)  # 15 // 4 = 3: five samples instead of none
    assert [s for s in range(15) if c.sampled(s)] == [3, 6, 9, 12]
    c.reset(3)
    assert [s for s in range(3) if c.sampled(s)] == [1, 2]
    default = EpochClock(lambda: None)  # what training uses: 1 in 64 (bench/rank_timing.py: under 1 %)
    default.reset(392)  # an epoch of ImageNet at GBS 3264
    assert default.period == 64 and sum(default.sampled(s) for s in range(392)) == 6
    off = EpochClock(lambda: None, every=0)
    off.reset(100)
    assert not any(off.sampled(s) for s in range(100))


def test_marks_measure_data_compute_allreduce_and_the_whole_step():
    s = Script()
    c = EpochClock(s.wait, every=1, clock=s.now)
    c.reset(3)
    for data, compute, reduce, update in ((0.010, 0.100, 0.040, 0.005), (0.030, 0.120, 0.010, 0.005)):
        s.backlog = 0.5  # earlier steps' work still queued: begin() waits for it, not counted
        c.begin()
        s.t += data
        c.fetched()
        s.backlog = compute
        c.computed()
        s.backlog = reduce
        c.reduced()
        s.backlog = update
        c.updated()
    assert [round(x, 6) for x in c.data] == [0.01, 0.03]
    assert [round(x, 6) for x in c.compute] == [0.1, 0.12]
    assert [round(x, 6) for x in c.allreduce] == [0.04, 0.01]
    assert [round(x, 6) for x in c.steps] == [0.155, 0.165]
    out = c.summary(batch=32, seconds=1.0, steps=3)
    assert out["steps"] == 3 and out["images"] == 96 and out["img_per_s"] == 96.0 and out["sampled_steps"] == 2
    assert out["own_img_per_s"] == round(64 / 0.26, 3)  # 2 x 32 images over data + compute
    assert out["step_ms_p50"] == 155.0 and out["step_ms_p95"] == out["step_ms_max"] == 165.0
    assert abs(out["data_wait_frac"] - 0.04 / 0.32) < 1e-4 and abs(out["allreduce_frac"] - 0.05 / 0.32) < 1e-4


def test_no_samples_gives_zeros_not_a_division_error():
    c = EpochClock(lambda: None, every=16)
    c.reset(1)
    out = c.summary(batch=8, seconds=0.5, steps=1)
    assert out["sampled_steps"] == 0 and out["own_img_per_s"] == 0.0 and out["step_ms_max"] == 0.0


def test_percentile_is_nearest_rank():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 95) == 95.0
    assert percentile([7.0], 95) == 7.0


@pytest.mark.parametrize("setting, msg", [
    ("preflight_allreduce_mb=-1", "preflight_allreduce_mb must be in [0, 4096]"),
    ("expected_busbw_gbps=-2", "expected_busbw_gbps >= 0"),
    ("preflight_refuse=maybe", "preflight_refuse must be true or false"),
])
def test_preflight_settings_are_checked(setting, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        load_config("cpu-demo", [setting])
    assert load_config("cpu-demo")["preflight_allreduce_mb"] == 0  # off unless asked for
