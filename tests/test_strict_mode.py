"""Strict mode (RN50_STRICT=1, set by .ci/run): a skipped test fails in CI; outside CI it stays a skip
with its reason. Checked on probe tests run by a real pytest in a subprocess with this suite's conftest."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROBES = {
    "test_probe.py": '''
import pytest
from helpers import missing, require

def test_missing_component():
    missing("the frobnicator (apt-get install frob)")

def test_required_and_present():
    require(True, "never shown")

def test_bare_skip():
    pytest.skip("no widget here")

@pytest.mark.skipif(True, reason="marker says no gadget")
def test_skip_marker():
    pass

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
''',
    "test_probe_module.py": '''
import pytest
pytest.importorskip("no_such_module_rn50")

def test_never():
    pass
''',
}


def _run(tmp_path: Path, strict: bool) -> tuple[dict[str, tuple[str, str]], str]:
    """Run the probes; {test or module name: (outcome, message)} from pytest's JUnit XML, and the output."""
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(HERE / name, tmp_path / name)
    for name, text in PROBES.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "RN50_STRICT"}
    if strict:
        env["RN50_STRICT"] = "1"
    xml = tmp_path / "report.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "-c", os.devnull, "--continue-on-collection-errors", f"--junitxml={xml}",
                           *PROBES], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    outcomes = {}
    for case in ET.parse(xml).iter("testcase"):
        name = case.get("name") or case.get("classname")
        kids = [k for k in case if k.tag in ("failure", "error", "skipped")]
        if not kids:
            outcomes[name] = ("passed", "")
        else:
            k = kids[0]
            kind = "xfail" if k.tag == "skipped" and k.get("type") == "pytest.xfail" else k.tag
            outcomes[name] = (kind, (k.get("message") or "") + (k.text or ""))
    return outcomes, proc.stdout + proc.stderr


def test_outside_ci_missing_components_are_skips_with_their_reason(tmp_path):
    got, out = _run(tmp_path, strict=False)
    assert got["test_required_and_present"][0] == "passed", out
    assert got["test_missing_component"] == ("skipped", got["test_missing_component"][1]), out
    assert "the frobnicator (apt-get install frob)" in got["test_missing_component"][1], out
    assert got["test_bare_skip"][0] == got["test_skip_marker"][0] == "skipped", out
    assert "marker says no gadget" in got["test_skip_marker"][1], out
    assert got["test_expected_failure"][0] == "xfail", out
    [module] = [v for k, v in got.items() if "test_probe_module" in k]
    assert module[0] == "skipped" and "no_such_module_rn50" in module[1], out
    assert "SKIPPED" in out and "frobnicator" in out  # -rs/-ra shows the reason in the summary


def test_strict_mode_turns_every_skip_into_a_failure_naming_what_is_missing(tmp_path):
    got, out = _run(tmp_path, strict=True)
    assert got["test_required_and_present"][0] == "passed", out
    for probe, reason in (("test_missing_component", "the frobnicator (apt-get install frob)"),
                          ("test_bare_skip", "no widget here"), ("test_skip_marker", "marker says no gadget")):
        kind, message = got[probe]
        assert kind in ("failure", "error") and "RN50_STRICT=1" in message and reason in message, (probe, got[probe], out)
    [module] = [v for k, v in got.items() if "test_probe_module" in k]  # a module-level skip
    assert module[0] in ("failure", "error") and "no_such_module_rn50" in module[1], out
    assert got["test_expected_failure"][0] == "xfail", out  # an expected failure is not a skip
    assert "SKIPPED" not in out, out
