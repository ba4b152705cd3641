"""Named configs, overrides, bad input, and the evaluation cadence."""
import pytest

from rn50.config import ConfigError, eval_epochs, load_config


def test_seed002_cadence_matches_its_logs():
    # The v0.7 Inspur logs evaluate after epochs 3, 7, ..., 35 (eval_offset 2, eval_period 4).
    cfg = load_config("nf5488-8xa100")
    # Epoch 37 (max_epochs) is off the grid and is never evaluated.
    assert eval_epochs(cfg["max_epochs"], cfg["eval_period"], cfg["eval_offset"]) == [3, 7, 11, 15, 19, 23, 27, 31, 35]


def test_cadence_is_only_the_mlperf_grid():
    # Every evaluated epoch is eval_offset + 1 + k * eval_period; the last epoch is not added.
    assert eval_epochs(8, 2, 1) == [2, 4, 6, 8]
    assert eval_epochs(5, 2, 0) == [1, 3, 5]
    assert eval_epochs(6, 4, 2) == [3]
    assert eval_epochs(37, 4, 2)[-1] == 35
    for max_epochs, period, offset in ((37, 4, 2), (24, 2, 1), (10, 3, 0), (7, 4, 3)):
        assert all((e - offset - 1) % period == 0 and e <= max_epochs for e in eval_epochs(max_epochs, period, offset))


def test_every_shipped_config_states_its_global_batch_size():
    assert load_config("cpu-demo")["global_batch_size"] == 64
    assert load_config("nf5488-8xa100")["global_batch_size"] == 3264


def test_seed002_hyperparameters():
    cfg = load_config("nf5488-8xa100")
    assert cfg["batch_size"] * 8 == cfg["global_batch_size"] == 3264
    assert (cfg["optimizer"], cfg["base_lr"], cfg["warmup_epochs"]) == ("lars", 10.5, 2)
    assert (cfg["dtype"], cfg["layout"], cfg["dali_decode"]) == ("float16", "NHWC", "mixed")
    assert cfg["end_lr"] == 1e-4 and cfg["lr_power"] == 2 and cfg["lars_epsilon"] == 0.0
    assert cfg["depth"] == [3, 4, 6, 3] and cfg["width"] == 64


def test_cpu_demo_loads_and_overrides_apply(tmp_path):
    cfg = load_config("cpu-demo", ["max_epochs=3", "depth=[1,1,1,1]", "base_lr=1"])
    assert cfg["max_epochs"] == 3 and cfg["depth"] == [1, 1, 1, 1]
    assert cfg["base_lr"] == 1.0 and isinstance(cfg["base_lr"], float)
    p = tmp_path / "mine.yaml"
    p.write_text("width: 8\nglobal_batch_size: 64\n")
    assert load_config(str(p))["width"] == 8


@pytest.mark.parametrize("name,overrides,msg", [
    ("no-such-config", [], "unknown config"),
    ("cpu-demo", ["nonsense=1"], "bad override"),
    ("cpu-demo", ["optimizer=adam"], "optimizer must be one of"),
    ("cpu-demo", ["eval_offset=5"], "eval_offset"),
    ("cpu-demo", ["depth=[1,2]"], "depth"),
    ("cpu-demo", ["batch_size=0"], "batch_size"),
    ("cpu-demo", ["warmup_epochs=40"], "decay_epochs"),
    ("cpu-demo", ["max_epochs=1"], "ends before the first evaluation"),
    ("cpu-demo", ["global_batch_size=100"], "global_batch_size 100 is not a multiple of batch_size 32"),
    ("cpu-demo", ["global_batch_size=null"], "must state global_batch_size"),
])
def test_bad_config_is_a_one_line_error(name, overrides, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(name, overrides)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file_is_an_error(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("bath_size: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'bath_size'"):
        load_config(str(p))


def test_print_config_gives_the_resolved_settings():
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "rn50.train", "--config", "cpu-demo", "--set", "max_epochs=3",
                        "--print-config"], capture_output=True, text=True, check=True)
    cfg = json.loads(r.stdout)
    assert cfg["max_epochs"] == 3 and cfg["name"] == "cpu-demo" and cfg["width"] == 16
    assert cfg["global_batch_size"] == 64


def test_world_size_mismatch_names_both_numbers():
    from rn50.config import world_size_error

    cfg = load_config("nf5488-8xa100")
    assert world_size_error(cfg, 8) is None
    msg = world_size_error(cfg, 16)
    assert "6528" in msg and "3264" in msg and "launch 8 rank(s)" in msg and "\n" not in msg
