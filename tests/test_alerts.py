"""Alert channels (issue 24): the webhook URL (and the token in it) is kept in the block's secret fields, only
https:// is accepted (http:// to loopback, for tests), and a target that resolves to a private or link-local
address is refused unless the operator names the host. Against a real Prefect server and a loopback receiver."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import Receiver, free_port, prefect_api
from tasks.common import StageError


@pytest.mark.parametrize("url,private_hosts,allowed", [
    ("https://8.8.8.8/hooks/T0/B0/s3cret", (), False),          # public: Prefect re-checks it at each notification
    ("http://127.0.0.1:9/rn50-alerts", (), True),                # loopback: the tests' receiver
    ("http://localhost:9/rn50-alerts", (), True),                # a name: every address it resolves to is loopback
    ("https://10.1.2.3/x", ("10.1.2.3",), True),                 # private, named by the operator
    ("https://alerts.invalid/x", (), "does not resolve"),
    ("http://8.8.8.8/x", (), "expected an https:// URL"),
    ("ftp://8.8.8.8/x", (), "expected https://host/"),
    ("https://10.1.2.3/x", ("10.9.9.9",), "resolves to 10.1.2.3, not a public address"),
    ("https://169.254.169.254/latest/meta-data", (), "resolves to 169.254.169.254, not a public address"),
    ("https://[::ffff:192.168.1.5]/x", (), "resolves to 192.168.1.5, not a public address"),
    ("https://[fe80::1]/x", (), "resolves to fe80::1, not a public address"),
    ("https://100.64.0.1/x", (), "resolves to 100.64.0.1, not a public address"),
])
def test_alert_targets(url, private_hosts, allowed):
    from flows.alerts import check_target

    if isinstance(allowed, bool):
        assert check_target(url, private_hosts) is allowed
    else:
        with pytest.raises(StageError, match=allowed) as e:
            check_target(url, private_hosts)
        assert "\n" not in str(e.value) and "/x" not in str(e.value) and "meta-data" not in str(e.value)


def test_setup_refuses_a_private_target_in_one_line_before_saving_anything():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RN50_ALERT_")}
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"  # nothing listens: a refused URL gets no further
    proc = subprocess.run([sys.executable, "-m", "flows.alerts", "setup", "--webhook", "https://10.0.0.7/hook?token=s3cret"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: alert channel 10.0.0.7 resolves to 10.0.0.7"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "s3cret" not in proc.stderr


_SAVE_AND_NOTIFY = """
import sys
from flows.alerts import save_channel
from prefect.blocks.notifications import CustomWebhookNotificationBlock
print(save_channel("webhook", sys.argv[1]))
CustomWebhookNotificationBlock.load("rn50-alerts").notify("the body", "the subject")
"""


def test_webhook_token_is_a_secret_of_the_block_and_still_reaches_the_target(bare_prefect_server):
    server, receiver = bare_prefect_server, Receiver()
    try:
        proc = subprocess.run([sys.executable, "-c", _SAVE_AND_NOTIFY, receiver.url + "?token=s3cret"],
                              env=server.env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        block_id = proc.stdout.split()[-1]
    finally:
        receiver.stop()
    # What the API (and so the UI) shows of the block: no token, the URL a placeholder filled from its secrets.
    doc = prefect_api(server.api_url, "GET", f"/block_documents/{block_id}")
    assert "s3cret" not in json.dumps(doc), doc
    assert doc["data"]["url"] == "{{webhook_url}}" and doc["data"]["allow_private_urls"] is True, doc["data"]
    assert receiver.paths == ["/rn50-alerts?token=s3cret"] and json.loads(receiver.bodies[0])["subject"] == "the subject"
