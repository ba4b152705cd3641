"""Alerts: a Prefect automation that notifies the team when an `rn50/nightly` run ends Failed or Crashed.

    python -m flows.alerts setup                         # idempotent; flows.local up and deploy.sh run it
    python -m flows.alerts setup --slack https://hooks.slack.com/services/...
    python -m flows.alerts setup --teams https://<tenant>.webhook.office.com/...
    python -m flows.alerts setup --webhook https://alerts.example.internal/rn50   # POSTs JSON {text, subject, body}
    python -m flows.alerts setup --all-runs              # also a second automation for any failed rn50/* run

The notification goes through the notification block named `rn50-alerts` (Prefect's Slack webhook,
Microsoft Teams webhook or custom webhook block; `--slack/--teams/--webhook`, or RN50_ALERT_SLACK_URL /
RN50_ALERT_TEAMS_URL / RN50_ALERT_WEBHOOK_URL, save it). A block made in the UI works too: give it that
name, or name it with `--block <block-type-slug>/<name>` (RN50_ALERT_BLOCK). Until a block exists the
automation is still there (and visible in the UI's Automations and event feed) but only records that it
fired. Its message carries the run's final state message: for the nightly, the verdict and the reason
("nightly regressed: epochs to 0.759 = 9 vs baseline 6 (tolerance 2)").

Running `setup` again updates the automations in place (same names), never duplicates them.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import urllib.parse
from typing import Any, Iterable
from uuid import UUID

from tasks.common import StageError

FLOW = "rn50"
NIGHTLY = "nightly"
BLOCK_NAME = "rn50-alerts"
NIGHTLY_AUTOMATION = "rn50-nightly-failed"
ALL_RUNS_AUTOMATION = "rn50-run-failed"
ZOMBIE_AUTOMATION = "rn50-crash-zombie-runs"
# Workers run flows with PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 (flows/local.py, docker-compose.yml): a run whose
# heartbeats stop for this long (its worker or machine died) is marked Crashed, as Prefect's docs recommend.
ZOMBIE_WITHIN_S = 90
END_EVENTS = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}

SUBJECT = "rn50/{{ deployment.name }}: flow run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = ("{{ flow_run.state.message }}\n"
        "Flow run {{ flow.name }}/{{ flow_run.name }} of deployment {{ deployment.name }} ended "
        "{{ flow_run.state.name }} at {{ flow_run.state.timestamp }}.\n"
        "Flow run ID: {{ flow_run.id }}\n"
        "Flow run URL: {{ flow_run|ui_url }}")


def _block_classes() -> dict[str, Any]:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, MicrosoftTeamsWebhook, SlackWebhook

    return {"slack": SlackWebhook, "teams": MicrosoftTeamsWebhook, "webhook": CustomWebhookNotificationBlock}


def check_target(url: str, private_hosts: Iterable[str] = ()) -> bool:
    """Whether the alert URL may be used, as a one-line StageError if not; True when its target is private
    (this machine's loopback, or a host the operator named in `private_hosts`), so the block must allow it.

    https:// only (http:// to loopback, for tests); every address the host resolves to is checked, and one
    that is private, link-local or otherwise not global is refused unless the host is named. Errors name the
    host, never the URL: its path or query often is the token."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise StageError(f"alert channel URL: expected https://host/..., got a {parts.scheme or 'schemeless'} URL")
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise StageError(f"alert channel host {host}: does not resolve ({e})") from None
    addresses = set()
    for info in infos:
        a = ipaddress.ip_address(info[4][0].split("%")[0])
        addresses.add(a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else a)
    if all(a.is_loopback for a in addresses):
        return True
    if parts.scheme != "https":
        raise StageError(f"alert channel {host}: expected an https:// URL (http:// only to this machine's loopback)")
    private = sorted(str(a) for a in addresses if not a.is_global)
    if private and host.lower() not in {h.lower() for h in private_hosts}:
        raise StageError(f"alert channel {host} resolves to {', '.join(private)}, not a public address: refusing it "
                         f"unless named (--allow-private-host {host} or RN50_ALERT_PRIVATE_HOSTS)")
    return bool(private)


def save_channel(kind: str, url: str, name: str = BLOCK_NAME, private_hosts: Iterable[str] = ()) -> UUID:
    """Save (or replace) the notification block `name` of `kind` (slack | teams | webhook) pointing at `url`,
    once `check_target` allows it. The URL is kept in the block's secret fields (Slack and Teams blocks hold it
    as a secret; the custom webhook's url is a placeholder filled from its secrets). A public target is
    checked again by Prefect at each notification (allow_private_urls=False: it connects to the address it
    checked, so a DNS change cannot turn it private)."""
    classes = _block_classes()
    if kind not in classes:
        raise StageError(f"alert channel kind {kind!r}: expected one of {', '.join(classes)}")
    private = check_target(url, private_hosts)
    if kind == "webhook":
        block = classes[kind](name=name, url="{{webhook_url}}", secrets={"webhook_url": url}, method="POST",
                              allow_private_urls=private,
                              json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"})
    else:
        block = classes[kind](url=url, allow_private_urls=private)
    return block.save(name, overwrite=True)


def find_channel(client, ref: str | None = None) -> tuple[UUID, str] | None:
    """(block document id, "slug/name") of the alert channel: `ref` ("slug/name"), else a block named
    rn50-alerts of the Slack, Teams or custom webhook type; None if there is none."""
    from prefect.exceptions import ObjectNotFound

    if ref:
        slug, sep, name = ref.partition("/")
        if not sep or not slug or not name:
            raise StageError(f"alert block {ref!r}: expected <block-type-slug>/<name>, e.g. slack-webhook/rn50-alerts")
        candidates = [(slug, name)]
    else:
        candidates = [(cls.get_block_type_slug(), BLOCK_NAME) for cls in _block_classes().values()]
    for slug, name in candidates:
        try:
            doc = client.read_block_document_by_name(name=name, block_type_slug=slug)
        except ObjectNotFound:
            continue
        return doc.id, f"{slug}/{name}"
    if ref:
        raise StageError(f"alert block {ref!r} does not exist on the server (create it in the UI: Blocks)")
    return None


def _automation(name: str, description: str, related: dict[str, str], channel: tuple[UUID, str] | None):
    from prefect.events.actions import DoNothing, SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    if channel:
        actions = [SendNotification(block_document_id=channel[0], subject=SUBJECT, body=BODY)]
        description += f" Notifies through the block {channel[1]}."
    else:
        actions = [DoNothing()]
        description += (f" No channel yet: create a notification block named {BLOCK_NAME} "
                        "(python -m flows.alerts setup --slack/--teams/--webhook URL) and run setup again.")
    return AutomationCore(
        name=name, description=description, enabled=True,
        trigger=EventTrigger(expect=set(END_EVENTS), match={"prefect.resource.id": "prefect.flow-run.*"},
                             match_related=related, posture=Posture.Reactive, threshold=1, within=0),
        actions=actions)


def _zombie_automation():
    """Prefect's recipe for zombie flow runs ("Detect zombie flows"), limited to rn50 runs: after a heartbeat, expect
    another heartbeat or a final state within ZOMBIE_WITHIN_S, else mark the run Crashed."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=ZOMBIE_AUTOMATION, enabled=True,
        description=f"An {FLOW} flow run sent no heartbeat for {ZOMBIE_WITHIN_S} s (its worker or machine died): "
                    "marked Crashed, so the next run does not wait on it and its stages can run again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=ZOMBIE_WITHIN_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {ZOMBIE_WITHIN_S} s: the worker or its machine died")])


def _upsert(client, core) -> UUID:
    existing = client.read_automations_by_name(core.name)
    if not existing:
        return client.create_automation(core)
    keep, *extra = existing
    client.update_automation(keep.id, core)
    for a in extra:  # left by an older, non-idempotent setup
        client.delete_automation(a.id)
    return keep.id


def ensure_alerts(all_runs: bool = False, block: str | None = None) -> dict[str, Any]:
    """Create or update the nightly automation (and with `all_runs` the one for any rn50/* run)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"{FLOW}/{NIGHTLY}")
        except ObjectNotFound:
            raise StageError(f"deployment {FLOW}/{NIGHTLY} not found: deploy prefect.yaml first") from None
        channel = find_channel(client, block)
        made = {NIGHTLY_AUTOMATION: _upsert(client, _automation(
            NIGHTLY_AUTOMATION, f"A {FLOW}/{NIGHTLY} run ended Failed or Crashed (convergence regression or a broken "
            "stage); the message carries the verdict and the reason.",
            {"prefect.resource.id": f"prefect.deployment.{deployment.id}", "prefect.resource.role": "deployment"},
            channel))}
        made[ZOMBIE_AUTOMATION] = _upsert(client, _zombie_automation())
        if all_runs:
            made[ALL_RUNS_AUTOMATION] = _upsert(client, _automation(
                ALL_RUNS_AUTOMATION, f"Any {FLOW}/* run ended Failed or Crashed.",
                {"prefect.resource.role": "flow", "prefect.resource.name": FLOW}, channel))
    return {"automations": {k: str(v) for k, v in made.items()}, "channel": channel[1] if channel else None}


def setup(slack: str | None = None, teams: str | None = None, webhook: str | None = None,
          block: str | None = None, all_runs: bool = False, private_hosts: Iterable[str] = ()) -> dict[str, Any]:
    given = [(k, u) for k, u in (("slack", slack), ("teams", teams), ("webhook", webhook)) if u]
    if len(given) > 1:
        raise StageError("give one alert channel: --slack, --teams or --webhook")
    if given and block:
        raise StageError("--block names an existing block; do not combine it with --slack/--teams/--webhook")
    if given:
        kind, url = given[0]
        save_channel(kind, url, private_hosts=private_hosts)
        block = f"{_block_classes()[kind].get_block_type_slug()}/{BLOCK_NAME}"
    return ensure_alerts(all_runs=all_runs, block=block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.alerts", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("setup", help="create or update the alert automation(s) and, if given, the channel block")
    s.add_argument("--slack", default=os.environ.get("RN50_ALERT_SLACK_URL") or None, help="Slack incoming-webhook URL")
    s.add_argument("--teams", default=os.environ.get("RN50_ALERT_TEAMS_URL") or None, help="Microsoft Teams webhook URL")
    s.add_argument("--webhook", default=os.environ.get("RN50_ALERT_WEBHOOK_URL") or None,
                   help="any https:// URL: POST {text, subject, body} as JSON")
    s.add_argument("--allow-private-host", action="append", dest="private_hosts", metavar="HOST",
                   default=[h.strip() for h in os.environ.get("RN50_ALERT_PRIVATE_HOSTS", "").split(",") if h.strip()],
                   help="a channel host that may resolve to a private or link-local address (repeatable; "
                        "RN50_ALERT_PRIVATE_HOSTS=a,b)")
    s.add_argument("--block", default=os.environ.get("RN50_ALERT_BLOCK") or None,
                   help="an existing notification block, <block-type-slug>/<name>")
    s.add_argument("--all-runs", action="store_true",
                   default=os.environ.get("RN50_ALERT_ALL_RUNS", "").lower() in ("1", "true", "yes"),
                   help="also alert on any failed rn50/* run, not only the nightly")
    args = p.parse_args(argv)
    try:
        out = setup(args.slack, args.teams, args.webhook, args.block, args.all_runs, args.private_hosts)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"alerts: {', '.join(out['automations'])} -> "
          + (out["channel"] or f"no channel yet (create block {BLOCK_NAME}: python -m flows.alerts setup --slack URL)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
