"""MLPerf logger: rank-0 only, one file per run (no accumulation across runs), required keys."""
import json

from rn50.config import load_config
from rn50.mllog import REQUIRED_KEYS_COMMON, REQUIRED_KEYS_LARS, REQUIRED_KEYS_SGD, RunLogger


def _records(path):
    out = []
    for line in path.read_text().splitlines():
        if line.startswith(":::MLLOG "):
            out.append(json.loads(line[len(":::MLLOG "):]))
    return out


def _log_run(path, cfg, rank=0):
    log = RunLogger(path, rank, echo=False)
    log.event("cache_clear", True)
    log.start("init_start")
    log.log_submission(cfg)
    log.event("seed", 1)
    log.log_hyperparameters(cfg, global_batch=64, per_rank_batch=32, warmup_epochs=2, decay_steps=100)
    log.end("init_stop")
    log.start("run_start")
    log.event("train_samples", 10)
    log.event("eval_samples", 2)
    log.start("block_start", metadata={"first_epoch_num": 1, "epoch_count": 1})
    log.start("epoch_start", metadata={"epoch_num": 1})
    log.end("epoch_stop", metadata={"epoch_num": 1})
    log.start("eval_start", metadata={"epoch_num": 1})
    log.end("eval_stop", metadata={"epoch_num": 1})
    log.event("eval_accuracy", 0.8, metadata={"epoch_num": 1})
    log.end("block_stop", metadata={"first_epoch_num": 1})
    log.end("run_stop", metadata={"status": "success"})
    log.close()


def test_lars_run_logs_every_required_key(tmp_path):
    cfg = load_config("cpu-demo")
    _log_run(tmp_path / "result_0.txt", cfg)
    recs = _records(tmp_path / "result_0.txt")
    keys = {r["key"] for r in recs}
    assert set(REQUIRED_KEYS_COMMON + REQUIRED_KEYS_LARS) <= keys
    by_key = {r["key"]: r for r in recs}
    assert by_key["lars_opt_end_learning_rate"]["value"] == 1e-4
    assert by_key["lars_epsilon"]["value"] == 0.0
    assert by_key["opt_name"]["value"] == "lars"
    assert by_key["submission_benchmark"]["value"] == "resnet"
    assert by_key["run_stop"]["metadata"]["status"] == "success"
    assert by_key["eval_accuracy"]["metadata"]["epoch_num"] == 1


def test_sgd_run_logs_sgd_keys(tmp_path):
    cfg = load_config("cpu-demo", ["optimizer=sgd"])
    _log_run(tmp_path / "result_0.txt", cfg)
    keys = {r["key"] for r in _records(tmp_path / "result_0.txt")}
    assert set(REQUIRED_KEYS_COMMON + REQUIRED_KEYS_SGD) <= keys
    assert not any(k.startswith("lars_") for k in keys)


def test_each_run_gets_its_own_file_and_only_its_own_lines(tmp_path):
    cfg = load_config("cpu-demo")
    _log_run(tmp_path / "result_0.txt", cfg)
    _log_run(tmp_path / "result_1.txt", cfg)
    a, b = _records(tmp_path / "result_0.txt"), _records(tmp_path / "result_1.txt")
    assert len(a) == len(b)
    assert sum(r["key"] == "run_start" for r in a) == 1
    assert sum(r["key"] == "run_start" for r in b) == 1


def test_fresh_attempt_overwrites_not_appends(tmp_path):
    cfg = load_config("cpu-demo")
    _log_run(tmp_path / "result_0.txt", cfg)
    _log_run(tmp_path / "result_0.txt", cfg)
    assert sum(r["key"] == "run_start" for r in _records(tmp_path / "result_0.txt")) == 1


def test_other_ranks_write_nothing(tmp_path):
    _log_run(tmp_path / "result_0.txt", load_config("cpu-demo"), rank=1)
    assert not (tmp_path / "result_0.txt").exists()
