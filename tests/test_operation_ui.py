"""End to end through the Prefect UI: a real `rn50/full` run, looked at with Debian's headless Chromium.

Everything is real: a local Prefect server + `rn50` process worker (flows.local.LocalPrefect, SQLite, loopback,
its own PREFECT_HOME), the full flow on a 10-class synthetic ILSVRC2012 (~1 min of training), and Chromium
driven by Debian's chromedriver over the W3C WebDriver protocol, which is plain JSON over HTTP, so the test needs
no browser-automation package. The UI is a JavaScript single-page app: pages are checked on the text the app
renders (`document.body.innerText`), polled until it settles.

Screenshots go to $RN50_TEST_ARTIFACTS (if set, e.g. by CI) or the test's tmp dir; their paths are printed.
Debian packages: chromium, chromium-driver. Only the page tests need them: the run through the worker and its
check on the server's API run without a browser.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port, missing, stop_group

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Flags known to work headless as root in a container; the resolver rule keeps the browser on loopback
# (nothing else is reachable, and nothing else may be contacted).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--no-proxy-server", "--window-size=1600,1700",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
STAGES = {"fetch": "Completed", "verify": "Completed", "pack": "Completed", "container": "Skipped",
          "distribute": "Skipped", "train": "Completed", "compliance": "Completed", "archive": "Completed"}
ARTIFACTS = ("data-verification", "pack-report", "training-progress", "compliance", "cluster-health", "archive-manifest")

# Loopback only: never route these requests through a proxy from the environment.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(method: str, url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with _http.open(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {url}: HTTP {e.code}: {e.read()[:2000]!r}") from None


class WebDriver:
    """Just enough of a W3C WebDriver client for chromedriver: open a page, run JS, take a screenshot."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=workdir))
        self.log = workdir / "chromedriver.log"
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}", f"--log-path={self.log}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if _request("GET", f"{self.url}/status", timeout=2)["value"]["ready"]:
                    break
            except (OSError, AssertionError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.quit()
                raise RuntimeError(f"chromedriver did not come up; see {self.log}")
            time.sleep(0.2)
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": CHROMIUM_FLAGS + [f"--user-data-dir={self.profile}"]}}
        try:
            self.session = _request("POST", f"{self.url}/session",
                                    {"capabilities": {"alwaysMatch": caps}}, timeout=120)["value"]["sessionId"]
        except BaseException:
            self.quit()
            raise
        self.base = f"{self.url}/session/{self.session}"

    def get(self, url: str) -> None:
        _request("POST", f"{self.base}/url", {"url": url})

    def js(self, script: str, *args):
        return _request("POST", f"{self.base}/execute/sync", {"script": script, "args": list(args)})["value"]

    def text(self) -> str:
        return self.js("return document.body ? document.body.innerText : ''")

    def wait_for(self, what: str, ok, timeout_s: float = 90) -> str:
        """Poll the rendered text until ok(text) holds; fail with what was on the page instead."""
        deadline, text = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            text = self.text()
            if ok(text):
                return text
            time.sleep(1)
        raise AssertionError(f"page never showed {what} within {timeout_s}s; it showed:\n{text[:4000]}")

    def screenshot(self, path: Path) -> Path:
        png = base64.b64decode(_request("GET", f"{self.base}/screenshot")["value"])
        path.write_bytes(png)
        return path

    def quit(self) -> None:
        if getattr(self, "session", None):
            try:
                _request("DELETE", f"{self.url}/session/{self.session}", timeout=30)
            except (OSError, AssertionError):
                pass
            self.session = None
        stop_group(self.proc, timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


def _missing_browser() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def prefect_run(demo_run):
    """A local Prefect with one finished rn50/full run on a synthetic set (conftest's `demo_run`):
    (LocalPrefect, flow run id)."""
    return demo_run.local, demo_run.run_id


@pytest.fixture(scope="module")
def browser(tmp_path_factory, prefect_run):
    if reason := _missing_browser():
        missing(reason)
    driver = WebDriver(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("RN50_TEST_ARTIFACTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_api_has_every_stage_and_artifact(prefect_run):
    """The server's record of the run, which the UI pages below render."""
    local, run_id = prefect_run
    run = _request("GET", f"{local.api_url}/flow_runs/{run_id}")
    assert run["state"]["type"] == "COMPLETED", run["state"]
    tasks = _request("POST", f"{local.api_url}/task_runs/filter",
                     {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})
    # Task run names are the task's name plus a short random suffix ("train-8e0").
    states = {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in tasks}
    assert {s: states.get(s) for s in STAGES} == STAGES, states
    arts = _request("POST", f"{local.api_url}/artifacts/filter",
                    {"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    keys = {a["key"] for a in arts if a.get("key")}
    assert set(ARTIFACTS) <= keys, f"missing artifacts {sorted(set(ARTIFACTS) - keys)}; have {sorted(keys)}"


def _click(browser: WebDriver, text: str, selector: str) -> None:
    """Click the element matching `selector` whose rendered text is `text`, once the app has rendered it."""
    find = ("return [...document.querySelectorAll(arguments[1])]"
            ".filter(e => e.innerText && e.innerText.trim() === arguments[0]).length")
    browser.wait_for(f"a {selector} labelled {text!r}", lambda _: browser.js(find, text, selector) > 0, 60)
    browser.js("[...document.querySelectorAll(arguments[1])]"
               ".filter(e => e.innerText && e.innerText.trim() === arguments[0])[0].click()", text, selector)


def test_flow_run_page_lists_stage_task_runs(prefect_run, browser, shots):
    local, run_id = prefect_run
    browser.get(f"{local.ui_url}/runs/flow-run/{run_id}")
    _click(browser, "Task Runs", ".p-tab, [role=tab]")

    def every_stage_listed(text: str) -> bool:
        return all(re.search(rf"^{s}-\w+$", text, re.M) for s in STAGES) and "Skipped" in text

    text = browser.wait_for("the seven stage task runs", every_stage_listed)
    time.sleep(2)  # the run graph is drawn on a canvas after the list; let it finish before the picture
    shot = browser.screenshot(shots / "flow-run-task-runs.png")
    print(f"screenshot: {shot}")
    width, height = _png_size(shot)
    assert width >= 1200 and height >= 1000, (width, height)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # The header: run name, then its state badge, before the tabs.
    assert "Completed" in lines[:lines.index("Logs")], f"flow run not shown Completed: {lines[:30]}"
    # Each task run's row: its name, then its state badge, duration, start time.
    for stage, state in STAGES.items():
        i = next(i for i, ln in enumerate(lines) if re.fullmatch(rf"{stage}-\w+", ln))
        assert lines[i + 1] == state, f"{stage}: expected {state} under {lines[i]}, got {lines[i:i + 4]}"


def test_artifacts_page_lists_artifacts(prefect_run, browser, shots):
    local, _ = prefect_run
    browser.get(f"{local.ui_url}/artifacts")
    text = browser.wait_for("the stage artifacts", lambda t: all(re.search(rf"^{k}$", t, re.M) for k in ARTIFACTS))
    print(f"screenshot: {browser.screenshot(shots / 'artifacts.png')}")
    assert "Eval accuracy per epoch (live)" in text  # descriptions render with the keys
    # The live training table, newest version: one row per evaluated epoch, reaching the MLPerf target.
    _click(browser, "training-progress", "a, h1, h2, h3, div")
    browser.wait_for("the artifact's versions", lambda t: re.search(r"^[0-9a-f]{8}$", t, re.M))
    browser.js("[...document.querySelectorAll('a, span, div')]"
               ".filter(e => /^[0-9a-f]{8}$/.test((e.innerText || '').trim()))[0].click()")
    browser.wait_for("the per-epoch accuracy table", lambda t: "eval_accuracy" in t)
    print(f"screenshot: {browser.screenshot(shots / 'training-progress.png')}")
    header = browser.js("return [...document.querySelectorAll('table thead th')].map(c => c.innerText.trim())")
    rows = browser.js("return [...document.querySelectorAll('table tbody tr')]"
                      ".map(r => [...r.cells].map(c => c.innerText.trim()))")
    assert "eval_accuracy" in header, header
    accuracy = [float(r[header.index("eval_accuracy")]) for r in rows]
    assert len(accuracy) >= 2 and max(accuracy) >= 0.759, f"no converged per-epoch rows: {header} {rows}"
