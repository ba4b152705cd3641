"""The flow's result line and return value (issue 24): the set's figure as MLPerf scores it (the olympic mean the
compliance stage computed) with the number of runs; one run's own time only when there is one run."""
from __future__ import annotations

import pytest

from tasks import compliance
from test_compliance import write_constructed_log


def _checked(tmp_path, minutes: list[float]) -> dict:
    """The compliance stage's result (as the flow receives it) for constructed runs of these times."""
    run = tmp_path / "runs" / f"set{len(minutes)}"
    run.mkdir(parents=True)
    for i, m in enumerate(minutes):
        write_constructed_log(run / f"result_{i}.txt", seed=i + 1, minutes=m)
    return compliance.check(run, ruleset="4.0.0", dataset="synthetic").to_dict()


def test_five_runs_give_the_sets_olympic_mean_not_run_0s_time(tmp_path):
    from flows.pipeline import result_figure

    checked = _checked(tmp_path, [10.0, 11.0, 12.0, 13.0, 20.0])
    ttt, scored = result_figure(checked)
    assert ttt == pytest.approx(12.0) == checked["set_time_to_train_min"]  # 10 and 20 dropped; run 0 took 10
    assert scored == "12.00 min (olympic mean of 5 runs, as MLPerf scores a set)"


def test_runs_that_are_no_set_give_no_figure_and_say_why(tmp_path):
    from flows.pipeline import result_figure

    ttt, scored = result_figure(_checked(tmp_path, [10.0, 11.0, 12.0]))
    assert ttt is None
    assert scored.startswith("no set figure (3 runs: not an official set: MLPerf resnet needs exactly 5 runs"), scored


def test_one_run_gives_its_own_time(tmp_path):
    from flows.pipeline import result_figure

    assert result_figure(_checked(tmp_path, [3.0])) == (pytest.approx(3.0), "3.00 min (1 run)")
