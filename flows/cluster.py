"""One timed run per cluster at a time, and a slot that a killed holder gives back at once.

The train stage's launch holds one slot of a Prefect global concurrency limit (`rn50-cluster` by default):
time-to-train figures of two runs sharing the nodes would both be wrong. The slot is held through a lease
that the holder renews; the server frees the slot of a holder that stops renewing when the lease ends
(60 s, the server's minimum). A run that was killed on this machine does not have to cost the next run that
minute: the holder publishes who it is (tasks/holder.py: host, boot id, PID namespace, pid and its start time)
in the Prefect variable `rn50_cluster_holder_<limit>` (visible on the UI's Variables page), and a waiting run on
the same machine that finds that process gone releases its lease with one log line. A holder on another host or
in another PID namespace is trusted to its lease. A holder whose lease the server ended (410 on renewal) is told
through `Lease.lost`: the train stage stops its run rather than train beside the next holder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
from typing import Any, Iterator
from uuid import UUID

from tasks.holder import holder_identity, holder_is_gone

CLUSTER_LIMIT = "rn50-cluster"
LEASE_S = 60.0  # the server's minimum lease
RENEW_S = 15.0
POLL_S = 5.0  # a waiting run asks again at least this often


def ensure_cluster_limit(name: str = CLUSTER_LIMIT, slots: int = 1) -> None:
    """Create the global concurrency limit `name` (1 slot) unless it exists; an existing one is kept as is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            except ObjectAlreadyExists:
                pass


def holder_variable(name: str) -> str:
    """The Prefect variable naming the holder of limit `name` (variable names: lowercase, digits, - and _)."""
    return "rn50_cluster_holder_" + re.sub(r"[^a-z0-9_-]", "_", name.lower())


def _me(lease_id: UUID) -> dict[str, Any]:
    return {"lease_id": str(lease_id), **holder_identity(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _release_if_holder_gone(client, name: str, log) -> None:
    from prefect.variables import Variable

    record = Variable.get(holder_variable(name), default=None)
    if not isinstance(record, dict) or not holder_is_gone(record):
        return
    try:
        lease = UUID(str(record.get("lease_id")))
    except ValueError:
        return
    client.release_concurrency_slots_with_lease(lease)  # a lease that already ended: the server ignores it
    current = Variable.get(holder_variable(name), default=None)
    if isinstance(current, dict) and current.get("lease_id") == record.get("lease_id"):
        Variable.unset(holder_variable(name))
    log.warning("train: released the cluster slot held by pid %s on %s since %s: that process is gone",
                record.get("pid"), record.get("host"), record.get("since"))


def _acquire(client, name: str, log) -> UUID:
    import httpx

    while True:
        try:
            r = client.increment_concurrency_slots_with_lease(names=[name], slots=1, mode="concurrency",
                                                              lease_duration=LEASE_S)
            return UUID(r.json()["lease_id"])
        except httpx.HTTPStatusError as e:
            if e.response.status_code != 423:  # 423 Locked: every slot is held
                raise
            retry_after = float(e.response.headers.get("Retry-After") or POLL_S)
        _release_if_holder_gone(client, name, log)
        time.sleep(min(max(retry_after, 1.0), POLL_S))


@dataclasses.dataclass
class Lease:
    """The held slot: `lost` is set when the server says the lease is gone (expired or revoked): the holder must
    stop using the cluster at once, another run may already hold it."""

    id: UUID
    lost: threading.Event = dataclasses.field(default_factory=threading.Event)


def _renew(lease: Lease, stop: threading.Event, log, renew_s: float) -> None:
    import httpx
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not stop.wait(renew_s):
            try:
                client.renew_concurrency_lease(lease.id, lease_duration=LEASE_S)
            except httpx.HTTPStatusError as e:
                if e.response.status_code == 410:
                    log.error("train: the cluster lease %s has ended on the server (410 Gone): the run is stopped, "
                              "another run may now hold the cluster", lease.id)
                    lease.lost.set()
                    return
                log.warning("train: could not renew the cluster lease (%s); retrying in %.0f s", e, renew_s)
            except Exception as e:  # noqa: BLE001 — keep trying while the lease still has time left
                log.warning("train: could not renew the cluster lease (%s); retrying in %.0f s", e, renew_s)


@contextlib.contextmanager
def cluster_slot(name: str = CLUSTER_LIMIT, renew_s: float = RENEW_S) -> Iterator[Lease]:
    """Hold one slot of the global concurrency limit `name` for the duration of the block; yields the Lease,
    whose `lost` event the train stage watches."""
    from prefect.client.orchestration import get_client
    from prefect.logging import get_run_logger
    from prefect.variables import Variable

    log = get_run_logger()
    ensure_cluster_limit(name)
    log.info("train: waiting for the cluster (global concurrency limit %r)", name)
    t0 = time.monotonic()
    with get_client(sync_client=True) as client:
        lease = Lease(_acquire(client, name, log))
        stop = threading.Event()
        renewer = threading.Thread(target=_renew, args=(lease, stop, log, renew_s), name="cluster-lease", daemon=True)
        try:
            Variable.set(holder_variable(name), _me(lease.id), overwrite=True)
            renewer.start()
            log.info("train: the cluster is ours (waited %.0f s)", time.monotonic() - t0)
            yield lease
        finally:
            stop.set()
            if renewer.is_alive():
                renewer.join(timeout=30)
            with contextlib.suppress(Exception):
                current = Variable.get(holder_variable(name), default=None)
                if isinstance(current, dict) and current.get("lease_id") == str(lease.id):
                    Variable.unset(holder_variable(name))
            client.release_concurrency_slots_with_lease(lease.id)
