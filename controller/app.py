"""``edgectl serve``: the composition root of the controller service.

Owns for the life of the process: the HTTP server for the repository and
``/metrics``, the announcer task (watches ``metadata/timestamp.json``; on start, on
every new version and after every MQTT reconnection, publishes each fleet's retained
announcement), the re-signing task (online roles re-signed under the repository lock
when less than half their lifetime is left), the telemetry ingestor (devices' status,
heartbeats and events into the store, ``controller.fleet.ingest``, admitting only what the
device registry allows, ``controller.fleet.roster``) and the task that prunes what is past its
retention (heartbeats, events, devices, models, rollout records, old metadata), and the
lease keeper (``controller.fleet.lease``): of several ``serve`` sharing a store, only the
leader runs the rollout job, announces, re-signs and prunes, checking it still leads
right before each signing or promotion; every ``serve`` serves HTTP, ``/metrics`` and
ingests.

Invariants:
- The readiness line ``edgectl serve: listening on http://HOST:PORT`` is printed and
  flushed on stdout once the socket listens, with the bound port (so port 0 works).
- An unreachable broker never stops the HTTP side; a failing re-sign is logged and
  retried on the next check, whatever it raised (the task never dies of it). Every check
  also loads the online roles' keys as a re-sign would: a key serve cannot sign with is
  logged (once, naming the file) and shown in ``/metrics`` (``edgefleet_signing_ready``)
  before the metadata it signs expires, and again once it is usable. A device registry
  that cannot be read is a start-up error (ingestion would otherwise admit every device
  or none).
- SIGTERM and SIGINT cancel every named task, stop the HTTP server and disconnect MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from agent.contracts import ROLLOUT_ROLE
from controller.base.errors import ControllerError, UsageError
from controller.fleet.ingest import Ingestor, IngestSettings
from controller.fleet.lease import Leadership, LeaseKeeper, NotLeaderError
from controller.fleet.records import FleetAggregates
from controller.fleet.roster import RosterEntry, RosterReader
from controller.fleet.status import StalePolicy
from controller.fleet.store import StoreError, TelemetryStore
from controller.fleet.stores import open_store
from controller.identity.devices import REGISTRY_FILE, ca_dir, load_registry
from controller.repository.expiry import ExpiryReader
from controller.repository.keys import scan_signers
from controller.repository.repo import Repository, resign_expiring
from controller.repository.retention import MetadataRetention, prune_metadata
from controller.repository.rotation import locked_repository
from controller.rollout.metrics import render_rollouts
from controller.rollout.retention import RolloutRetention, prune_rollout_records
from controller.rollout.service import RolloutSettings, start_rollout_service
from controller.rollout.store import RolloutStore
from controller.serve.announcer import Announcer
from controller.serve.config import ServeConfig
from controller.serve.http import make_app, start_http
from controller.serve.metrics import (
    ServeHealth,
    StoreHealth,
    render_aggregates,
    render_leadership,
    render_serve_health,
)
from controller.serve.mqtt_repo import RepoResponder
from controller.serve.mqtt_tls import serve_tls_context

logger = logging.getLogger(__name__)

READY_LINE = "edgectl serve: listening on http://{host}:{port}"


def read_timestamp_version(repo_dir: Path) -> int:
    """The version in ``metadata/timestamp.json`` (not verified: this is our own file)."""
    doc = json.loads((repo_dir / "metadata" / "timestamp.json").read_bytes())
    return int(doc["signed"]["version"])


def _resign(repo_dir: Path, leadership: Leadership | None = None) -> dict[str, int]:
    # locked_repository first finishes an interrupted key rotation and refuses keys or a
    # lock this user cannot use (naming the chown).
    with locked_repository(repo_dir) as repo:
        if leadership is not None:  # fencing: checked under the lock, right before signing
            leadership.check("re-signing")
        return resign_expiring(repo)


async def announce_loop(
    repo_dir: Path, announcer: Announcer, interval_s: float, leadership: Leadership | None = None
) -> None:
    """Announce on start, on every new timestamp version and after every reconnection;
    with ``leadership``, only while this process leads, and again on each takeover (an
    announcement repeated is a refresh)."""
    announced: int | None = None
    while True:
        if leadership is not None and not leadership.is_leader:
            announced = None  # the next time this process leads, it announces at once
            await asyncio.sleep(interval_s)
            continue
        try:
            version = await asyncio.to_thread(read_timestamp_version, repo_dir)
            reconnected = announcer.take_needs_announce()
            if version != announced or reconnected:
                fleets = await asyncio.to_thread(lambda: Repository.open(repo_dir).fleets())
                now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                if leadership is not None and not leadership.is_leader:
                    continue  # lost while reading: the leader announces
                if announcer.announce(fleets, version, now):
                    announced = version
                elif reconnected:
                    announced = None
        except (OSError, ValueError, KeyError, ControllerError) as exc:
            logger.error("cannot read the repository to announce: %s", exc)
        await asyncio.sleep(interval_s)


ONLINE_ROLES = (ROLLOUT_ROLE, "snapshot", "timestamp")


@dataclass
class ServeState:
    """What serve's own tasks found, for ``/metrics``: the MQTT clients (set once they
    exist), whether each online role could be signed at the last check, failed re-signs."""

    ingestor: Ingestor | None = None
    announcer: Announcer | None = None
    signing_ready: dict[str, bool] = field(default_factory=dict)
    resign_failures: int = 0

    def health(self) -> ServeHealth:
        connected = {}
        if self.ingestor is not None:
            connected["ingest"] = self.ingestor.is_connected
        if self.announcer is not None:
            connected["announce"] = self.announcer.is_connected
        return ServeHealth(connected, dict(self.signing_ready), self.resign_failures)


def signing_problems(repo_dir: Path) -> dict[str, str]:
    """Why each online role could not be signed now ("" when it can): its keys loaded as
    a re-sign loads them (a key file that is not a key, or one this user may not read)."""
    repo = Repository.open(repo_dir)
    problems = {}
    for role in ONLINE_ROLES:
        try:
            keyids, threshold = repo.role_keys(role)
            found, ignored = scan_signers(repo.key_dirs, role, keyids, quiet=repo.revoking)
            problems[role] = (
                ""
                if len(found) >= threshold
                else f"it needs {threshold} key(s), {len(found)} usable in "
                f"{', '.join(map(str, repo.key_dirs))}"
                + (f" ({'; '.join(ignored)})" if ignored else "")
            )
        except (OSError, ControllerError) as exc:
            problems[role] = str(exc)
    return problems


def _check_signing(repo_dir: Path, state: ServeState) -> None:
    """Update ``state.signing_ready``; log when a role becomes unsignable or signable."""
    for role, problem in signing_problems(repo_dir).items():
        was_ready = state.signing_ready.get(role, True)
        state.signing_ready[role] = not problem
        if problem and was_ready:
            logger.error(
                "cannot sign %s metadata: %s; the repository is still served, re-signing "
                "and rollout stages wait until the key is usable",
                role,
                problem,
            )
        elif not problem and not was_ready:
            logger.info("the %s key is usable again", role)


async def resign_loop(
    repo_dir: Path,
    interval_s: float,
    state: ServeState | None = None,
    leadership: Leadership | None = None,
) -> None:
    """Re-sign online metadata before it expires; check every ``interval_s``. With
    ``state``, also check the online keys and count failures (``/metrics``); with
    ``leadership``, re-sign only while this process leads (every process checks that its
    keys could sign, so a follower ready to take over says so)."""
    state = state if state is not None else ServeState()
    while True:
        try:
            await asyncio.to_thread(_check_signing, repo_dir, state)
        except Exception as exc:  # the repository unreadable: the re-sign below says so too
            logger.error("cannot check the signing keys: %s", exc)
        if leadership is not None and not leadership.is_leader:
            await asyncio.sleep(interval_s)
            continue
        try:
            changed = await asyncio.to_thread(_resign, repo_dir, leadership)
            if changed:
                logger.info("re-signed metadata before expiry: %s", changed)
            else:
                logger.debug("re-sign check: nothing due")
        except NotLeaderError as exc:
            logger.warning("re-signing skipped: %s", exc)
        except Exception as exc:  # whatever it is, the next check tries again
            state.resign_failures += 1
            logger.error("re-signing failed (retrying in %.0f s): %s", interval_s, exc)
        await asyncio.sleep(interval_s)


# Pruning is cheap when little changed (indexed deletes; events: only devices heard
# from since the last pass), so it runs often enough to keep a flood's rows few.
PRUNE_INTERVAL_S = 600.0


def _revoked(repo_dir: Path) -> list[tuple[str, str]]:
    """(fleet, device) of every revoked device in the registry (none without a CA)."""
    if not (ca_dir(repo_dir) / REGISTRY_FILE).exists():
        return []
    return [(r.fleet, r.device_id) for r in load_registry(repo_dir).values() if r.is_revoked]


def prune_once(store: TelemetryStore, config: ServeConfig, now: float, active_since: float) -> None:
    """Delete what is past its retention (docs/operations.md, "Retention"), each kind on
    its own so one failing does not keep the others: heartbeats and events
    (``heartbeat_retention_s``, ``event_retention_s``, ``event_max_per_device``), devices
    and models in the store (``device_retention_s``, ``revoked_device_retention_s``,
    ``model_retention_s``), finished rollout records (``rollout_retention_s``,
    ``rollout_keep_per_model``), old metadata versions and desired-state files
    (``metadata_keep_versions``, ``metadata_min_age_s``). Raises the first failure."""
    steps: tuple[tuple[str, Callable[[], int]], ...] = (
        (
            "heartbeat(s)",
            lambda: store.prune_heartbeats(now - config.heartbeat_retention_s),
        ),
        (
            "event(s)",
            lambda: store.prune_events(
                now - config.event_retention_s, config.event_max_per_device, active_since
            ),
        ),
        (
            "silent or revoked device(s)",
            lambda: store.prune_devices(
                now - config.device_retention_s,
                _revoked(config.repo_dir),
                now - config.revoked_device_retention_s,
            ),
        ),
        (
            "model row(s) no longer reported",
            lambda: store.prune_models(now - config.model_retention_s),
        ),
        (
            "finished rollout record(s)",
            lambda: len(
                prune_rollout_records(
                    config.repo_dir,
                    now,
                    RolloutRetention(config.rollout_retention_s, config.rollout_keep_per_model),
                )
            ),
        ),
        (
            "old metadata or desired-state file(s)",
            lambda: len(
                prune_metadata(
                    config.repo_dir,
                    now,
                    MetadataRetention(config.metadata_keep_versions, config.metadata_min_age_s),
                )
            ),
        ),
    )
    failed: Exception | None = None
    for what, step in steps:
        try:
            removed = step()
        except Exception as exc:  # the store may be briefly unreachable (PostgreSQL)
            logger.error("pruning %s failed: %s", what, exc)
            failed = failed or exc
            continue
        if removed:
            logger.info("pruned %d %s past retention", removed, what)
    if failed is not None:
        raise failed


async def prune_loop(
    store: TelemetryStore,
    config: ServeConfig,
    interval_s: float,
    leadership: Leadership | None = None,
) -> None:
    """``prune_once`` every ``interval_s`` (with ``leadership``: in the leader only)."""
    active_since = 0.0  # the first pass looks at every device's events
    while True:
        if leadership is not None and not leadership.is_leader:
            await asyncio.sleep(min(interval_s, leadership.lease_s))
            continue
        now = time.time()
        try:
            await asyncio.to_thread(prune_once, store, config, now, active_since)
            active_since = now - interval_s  # overlap: events stored late are looked at too
        except Exception:  # logged per kind; events are looked at from the start again
            pass
        await asyncio.sleep(interval_s)


def registry_roster(repo_dir: Path) -> RosterReader:
    """The device registry as ingestion checks senders against it (controller.fleet.roster)."""

    def entries() -> list[RosterEntry]:
        return [(r.device_id, r.fleet, r.is_revoked) for r in load_registry(repo_dir).values()]

    return RosterReader(ca_dir(repo_dir) / REGISTRY_FILE, entries)


def add_metrics_route(
    app: web.Application,
    store: TelemetryStore,
    ingestor: Ingestor | None,
    policy: StalePolicy,
    repo_dir: Path | None = None,
    state: ServeState | None = None,
    leadership: Leadership | None = None,
) -> None:
    """``GET /metrics``: fleet aggregates from the store, in the Prometheus text format;
    with ``repo_dir``, also when the repository's metadata, CA, CRL and device
    certificates expire (read at each scrape, ``controller.repository.expiry``) and the
    latest rollout of each fleet and model (``controller.rollout.metrics``); with
    ``state``, serve's MQTT connections and signing keys (``ServeState``); with
    ``leadership``, whether this process leads (``render_leadership``)."""
    reader = ExpiryReader(repo_dir) if repo_dir is not None else None

    def render() -> str:
        counts = dict(ingestor.counts) if ingestor is not None else {}
        refusals = dict(ingestor.refusals) if ingestor is not None else {}
        now = time.time()
        expiries = reader.read(now) if reader is not None else None
        try:
            aggregates = store.fleet_aggregates(now, policy.default_interval_s, policy.stale_after)
            events = store.event_counts()
        except StoreError as exc:  # unreachable: say so, and serve the rest
            logger.warning("/metrics without the fleet gauges: %s", exc)
            aggregates, events = FleetAggregates({}, {}, {}), []
        health = StoreHealth(up=store.up, errors=store.errors)
        text = render_aggregates(aggregates, events, counts, expiries, refusals, health)
        if repo_dir is not None:
            try:
                text += render_rollouts(RolloutStore(repo_dir).all())
            except OSError as exc:  # the folder unreadable: the rest of the page still
                logger.warning("/metrics without the rollout gauges: %s", exc)
        if state is not None:
            text += render_serve_health(state.health())
        if leadership is not None:
            text += render_leadership(leadership.instance, leadership.is_leader, leadership.epoch)
        return text

    async def handle(_request: web.Request) -> web.Response:
        text = await asyncio.to_thread(render)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    app.router.add_get("/metrics", handle)


def ingest_settings(config: ServeConfig) -> IngestSettings:
    """The ingest settings of ``edgectl serve``'s config (an MQTT broker is set)."""
    assert config.mqtt_host is not None
    return IngestSettings(
        host=config.mqtt_host,
        port=config.mqtt_port,
        client_id=config.ingest_client_id,
        keepalive_s=config.mqtt_keepalive_s,
        shared_group=config.mqtt_shared_group,
        session_expiry_s=config.ingest_session_expiry_s,
        batch_size=config.ingest_batch_size,
        flush_s=config.ingest_flush_s,
        store_retry_max_s=config.ingest_store_retry_max_s,
        stop_timeout_s=config.ingest_stop_timeout_s,
        qos0_backlog_max=config.ingest_qos0_backlog_max,
        max_requests_per_s=config.max_requests_per_s,
    )


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT. Raises RepositoryError, StoreError or UsageError at
    start-up."""
    Repository.open(config.repo_dir).versions()  # fail fast on a missing or damaged repo
    # Before anything connects: a bad CA, certificate or key is an error here, not a log.
    tls = await asyncio.to_thread(serve_tls_context, config)
    roster = registry_roster(config.repo_dir)
    if config.mqtt_host is not None:  # ingestion checks senders against it
        try:
            await asyncio.to_thread(roster.load)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the device registry {roster.path}: {exc}") from None
    store = await asyncio.to_thread(open_store, config.store_location)
    ingestor: Ingestor | None = None
    if config.mqtt_host is not None:
        ingestor = Ingestor(ingest_settings(config), store, tls=tls, roster=roster)
    app = make_app(config.repo_dir)
    policy = StalePolicy(config.heartbeat_interval_s, config.stale_after_heartbeats)
    state = ServeState(ingestor=ingestor)
    # One leader among the serve processes sharing the store (controller.fleet.lease).
    leadership = Leadership(config.instance_id, config.lease_s)
    keeper = LeaseKeeper(store, leadership)
    add_metrics_route(app, store, ingestor, policy, config.repo_dir, state, leadership)
    try:
        runner, port = await start_http(app, config.listen_host, config.listen_port)
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {config.listen_host}:{config.listen_port}: {exc}"
        ) from None
    print(READY_LINE.format(host=config.listen_host, port=port), flush=True)
    logger.info("serving %s on port %d as %s", config.repo_dir, port, config.instance_id)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The first try before the tasks start: alone on its store, serve leads from its first
    # rollout tick and re-sign check on.
    await asyncio.to_thread(keeper.renew_once)
    keeper.start()

    announcer: Announcer | None = None
    # --- repository over MQTT (issue 8): chunk answers for devices without HTTP ---
    responder: RepoResponder | None = None
    if config.mqtt_host is not None:
        responder = RepoResponder(
            config.repo_dir,
            config.mqtt_host,
            config.mqtt_port,
            f"{config.mqtt_client_id}-repo",
            tls=tls,
            shared_group=config.mqtt_shared_group,
        )
        responder.start()
    # --- end repository over MQTT ---
    # Staged rollouts: judged on telemetry and advanced on a schedule (controller.rollout.stages).
    scheduler = AsyncIOScheduler()
    start_rollout_service(
        scheduler,
        config.repo_dir,
        store,
        RolloutSettings(
            tick_interval_s=config.rollout_tick_interval_s,
            heartbeat_interval_s=config.heartbeat_interval_s,
        ),
        leadership,
    )
    scheduler.start()
    tasks = [
        asyncio.create_task(
            resign_loop(config.repo_dir, config.resign_check_interval_s, state, leadership),
            name="resign",
        ),
        asyncio.create_task(prune_loop(store, config, PRUNE_INTERVAL_S, leadership), name="prune"),
    ]
    if ingestor is not None:
        # Ingestion allocates a few containers per message, 100,000s a second, nearly all
        # freed within a batch: the garbage collector's youngest generation is collected
        # every 50,000 allocations instead of 700, and what was set up until now (never
        # garbage) is left out of its full collections (docs/benchmarks.md, telemetry
        # ingest, 2026-12-03 14:00).
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        ingestor.start()
        logger.info("ingesting telemetry into %s", _redacted(config.store_location))
    if config.mqtt_host is not None:
        announcer = Announcer(
            config.mqtt_host,
            config.mqtt_port,
            config.mqtt_client_id,
            config.mqtt_keepalive_s,
            tls=tls,
        )
        state.announcer = announcer
        announcer.start()
        tasks.append(
            asyncio.create_task(
                announce_loop(config.repo_dir, announcer, config.announce_interval_s, leadership),
                name="announce",
            )
        )
    try:
        await stop.wait()
        logger.info("shutting down")
    finally:
        scheduler.shutdown(wait=False)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.cleanup()
        await asyncio.to_thread(keeper.stop)  # released: another serve leads at its next try
        if announcer is not None:
            await asyncio.to_thread(announcer.stop)
        if responder is not None:  # repository over MQTT (issue 8)
            await asyncio.to_thread(responder.stop)
        if ingestor is not None:
            await asyncio.to_thread(ingestor.stop)
        await asyncio.to_thread(store.close)
        sys.stdout.flush()


def _redacted(location: str) -> str:
    """A store location fit for a log line (no password)."""
    if "://" in location and "@" in location:
        scheme, rest = location.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return location


def run_serve(config: ServeConfig) -> None:
    """Blocking entry point for the CLI."""
    asyncio.run(serve(config))
