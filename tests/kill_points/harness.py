"""The machinery of the controller kill-point run (issue 19, section 2).

One ``Spec`` per command that writes the repository or the device CA. For each, the
harness prepares a case folder (a copy of a prepared repository, the bundles, the
device's TUF cache, a broker folder where the command needs one), learns the command's
durable steps from one uninterrupted run (``EDGEFLEET_TEST_WRITE_LOG``, see
``controller.base.fsio``) and then, for each step K, runs the command again on a fresh
copy with ``EDGEFLEET_TEST_KILL_AT_WRITE=K``: the real ``edgectl`` process SIGKILLs
itself right after its Kth durable step. Then, in order:

1. a device (a real ``tuf.ngclient.Updater`` on the TUF cache it had before the command,
   bootstrapped from the root it was enrolled with) refreshes over HTTP and downloads
   its fleet's desired state and every bundle that state names;
2. ``edgectl serve``'s start-up passes run: the real ``edgectl serve`` (for the middle
   kill point of each command, or every one with ``EDGEFLEET_KILL_POINTS_SERVE=every``)
   until its re-sign check and its first rollout tick have run (seen in its ``-v`` log),
   the device refreshing through its HTTP side and ``/metrics`` read; elsewhere the same
   functions in this process (``controller.app._resign``, ``RolloutService.tick``, the
   device registry as ingestion loads it, the expiries ``/metrics`` renders). For the
   identity commands serve is given a broker address where nothing listens (it loads
   the registry) and, when ``broker config`` had run before, its TLS files;
3. the device refreshes again;
4. when the state already is what the uninterrupted command leaves, the natural next
   command runs (``Spec.follow``), otherwise the command runs again; either must exit 0
   (or, where ``Spec.taken`` says so, the command refuses to repeat what it did and the
   next command completes);
5. ``serve``'s passes run again, the device refreshes, and the state must equal the one
   the uninterrupted command (and its follow-up) produced (``summary``: desired states,
   active rollouts, targets, retired releases, bundle files, which roles' keys changed
   and how many key files each has, the registry, whether the CRL lists every revoked
   serial and whether the broker folder matches the CA and the registry).

At every refresh no fleet's desired state may have gone backwards from where it was
before the command (a lower version, or the same version at a lower percentage), except
for an explicit rollback (``rollout abort``); and a serve pass never moves one backwards
from where it was just before it (serve is no operator), except to finish an interrupted
``rollout abort`` exactly as the uninterrupted command would have left the fleet.

Not covered: the telemetry store (``serve`` writes it; of the commands here only
``rollout start`` does, each device's place in the rollout, in one transaction of a
cache a tick does without: not a durable step of the repository), the
repository lock's release (a SIGKILL releases an ``flock`` with the process, so "after
the last write" and "after the unlock" are the same state on disk), creating folders
(an empty folder is no state), and ``init``, ``keys`` ceremony commands other than
``rotate``, ``device renew`` (not in the issue's list). ``gateway enroll`` and ``gateway
revoke`` (site gateways' bridge identities) are covered like ``device add``/``revoke``.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tuf.ngclient import Updater

from agent.contracts import desired_target_path, parse_desired_state, version_key
from agent.contracts.enrollment import DEVICE_CERT
from controller.identity.broker import (
    BROKER_RECORD,
    BrokerOptions,
    refresh_broker_files,
    render_acl,
    write_broker_config,
)
from controller.identity.ca import CREATING_DIR, DeviceCA, read_crl
from controller.identity.devices import EnrollOptions, add_device, ca_dir, load_registry
from controller.identity.gateways import enroll_gateway, load_gateways
from controller.repository.expiry import has_device_ca
from controller.repository.history import read_retired
from controller.repository.keys import key_files
from controller.repository.release import current_desired_state
from controller.repository.repo import ALL_ROLES, Repository

MODEL: Final = "lin"
FLEET: Final = "lab"
SUBPROCESS_TIMEOUT_S: Final = 120.0
SERVE_PASSES_TIMEOUT_S: Final = 60.0
SERVE_ENV: Final = "EDGEFLEET_KILL_POINTS_SERVE"


class CaseFailure(AssertionError):
    """A kill point that did not recover; the message says at which stage and why."""


def edgectl_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "controller.cli", *map(str, args)]


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("EDGEFLEET_TEST_WRITE_LOG", "EDGEFLEET_TEST_KILL_AT_WRITE"):
        env.pop(name, None)
    for name in ("EDGECTL_REPO", "EDGECTL_LISTEN", "EDGECTL_MQTT", "EDGECTL_STORE"):
        env.pop(name, None)
    return env


def run_edgectl(
    argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env=env or _clean_env(),
        check=False,
    )


@dataclass(frozen=True)
class Step:
    index: int
    path: str


def read_steps(log: Path) -> list[Step]:
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        index, _, path = line.partition("\t")
        steps.append(Step(int(index), path))
    return steps


def relative(case: Case, path: str) -> str:
    """A written path as the tally shows it: relative to the case folder."""
    try:
        return str(Path(path).relative_to(case.root))
    except ValueError:
        return path


# ---------------------------------------------------------------------------- a case


@dataclass
class Case:
    """One folder: ``repo/``, ``device/`` (the device's TUF cache), ``out/`` (archives),
    ``broker/`` (when a spec configures one), shared read-only ``bundles``."""

    root: Path
    bundles: Path
    enrolled_root: Path  # the root.json the device was enrolled with
    # serve speaks TLS with the broker folder's files: `broker config` had run before the
    # command (an operator turns `mqtt_tls` on once that folder is whole)
    tls: bool = False

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def device(self) -> Path:
        return self.root / "device"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    def bundle(self, version: str) -> Path:
        return self.bundles / f"{version}.bundle"


def copy_case(template: Case, dest: Path) -> Case:
    shutil.copytree(template.root, dest, symlinks=True)
    return Case(dest, template.bundles, template.enrolled_root)


# ---------------------------------------------------------------------------- the device


class RepoHttp:
    """A plain HTTP server on 127.0.0.1 over one case's repository at a time (the
    device's side of ``edgectl serve``'s HTTP for the in-process passes)."""

    def __init__(self) -> None:
        self.directory = Path("/nonexistent")
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(outer.directory), **kwargs)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


DesiredView = dict[str, tuple[str, float, str | None, tuple[str, ...]]]


def device_refresh(case: Case, url: str) -> DesiredView:
    """What the fleet's device sees: refresh (from its cache, else its enrolled root),
    the desired state and every bundle it names, downloaded and verified. Raises
    CaseFailure naming what a device could not verify or fetch."""
    case.device.mkdir(exist_ok=True)
    cached = case.device / "root.json"
    bootstrap = cached.read_bytes() if cached.exists() else case.enrolled_root.read_bytes()
    downloads = case.root / "downloads"
    shutil.rmtree(downloads, ignore_errors=True)
    downloads.mkdir()
    try:
        updater = Updater(
            metadata_dir=str(case.device),
            metadata_base_url=f"{url}/metadata/",
            target_base_url=f"{url}/targets/",
            target_dir=str(downloads),
            bootstrap=bootstrap,
        )
        updater.refresh()
        path = desired_target_path(FLEET)
        info = updater.get_targetinfo(path)
        if info is None:
            return {}
        desired = parse_desired_state(Path(updater.download_target(info)).read_bytes(), FLEET)
        view: DesiredView = {}
        for model, release in desired.models.items():
            for target in (release.target, release.previous_target):
                if target is None:
                    continue
                bundle = updater.get_targetinfo(target)
                if bundle is None:
                    raise CaseFailure(f"the desired state names {target}, not in the targets")
                updater.download_target(bundle)
            view[model] = (release.version, release.percent, release.previous, release.canaries)
        return view
    except CaseFailure:
        raise
    except Exception as exc:  # what python-tuf raises: the device cannot verify
        what = f"{type(exc).__name__}: {exc}"
        raise CaseFailure(f"the device cannot verify the repository: {what}") from None


def regressions(before: DesiredView, after: DesiredView) -> list[str]:
    """Models whose desired release went backwards: a lower version, or the same
    version at a lower percentage, or gone."""
    out = []
    for model, (version, percent, _, _) in before.items():
        now = after.get(model)
        if now is None:
            out.append(f"{model}: {version} at {percent:g}% -> no entry")
        elif (version_key(now[0]), now[1]) < (version_key(version), percent):
            out.append(f"{model}: {version} at {percent:g}% -> {now[0]} at {now[1]:g}%")
    return out


# ---------------------------------------------------------------------------- the state


def summary(case: Case, before_keys: dict[str, list[str]]) -> dict[str, Any]:
    """What the commands change, without what is random (key ids, rollout ids, dates)."""
    repo = Repository.open(case.repo)
    desired = current_desired_state(repo, FLEET)
    targets = repo.load("targets").signed.targets
    from controller.rollout.store import RolloutStore

    active = sorted(
        (r.fleet, r.model, r.version, r.state.value, r.stage)
        for r in RolloutStore(case.repo).active()
    )
    registry = load_registry(case.repo)
    return {
        "desired": {
            m: (r.version, r.percent, r.previous, r.canaries)
            for m, r in (desired.models.items() if desired else ())
        },
        "active_rollouts": active,
        "targets": sorted(targets),
        "retired": sorted(read_retired(case.repo)),
        "bundle_files": sorted(
            str(p.relative_to(case.repo))
            for p in (case.repo / "targets" / "bundles").rglob("*")
            if p.is_file()
        ),
        "rotated": {r: sorted(repo.role_keys(r)[0]) != before_keys[r] for r in ALL_ROLES},
        "key_files": {r: len(key_files(repo.keys_dir, r)) for r in ALL_ROLES},
        "devices": {d: (r.fleet, r.is_revoked) for d, r in sorted(registry.items())},
        "gateways": {s: g.is_revoked for s, g in sorted(load_gateways(case.repo).items())},
        "crl": crl_problem(case),
        "broker": broker_problem(case),
        "gateway_files": gateway_files_problem(case),
    }


def role_keyids(case: Case) -> dict[str, list[str]]:
    repo = Repository.open(case.repo)
    return {r: sorted(repo.role_keys(r)[0]) for r in ALL_ROLES}


def crl_problem(case: Case) -> str:
    """'' when the CRL lists every serial the registry revoked (or there is no CA)."""
    folder = ca_dir(case.repo)
    if not has_device_ca(case.repo):
        return "" if not (folder / CREATING_DIR).exists() else "the CA's creation is unfinished"
    try:
        crl = read_crl(folder)
        DeviceCA.open(folder)
    except Exception as exc:
        return f"the device CA or its CRL is unusable: {exc}"
    listed = {entry.serial_number for entry in crl}
    holders = [*load_registry(case.repo).items(), *load_gateways(case.repo).items()]
    missing = [
        f"{d}:{serial:x}"
        for d, r in holders
        for serial, _ in r.revoked_serials()
        if serial not in listed
    ]
    return f"revoked but not on the CRL: {', '.join(missing)}" if missing else ""


def broker_problem(case: Case) -> str:
    """'' when no broker folder is configured, or it matches the CA and the registry."""
    try:
        record = json.loads((ca_dir(case.repo) / BROKER_RECORD).read_bytes())
    except FileNotFoundError:
        return "" if not case.broker.exists() else "no broker record"
    folder = Path(record["folder"])
    problems = []
    for name in ("broker", "controller"):
        try:
            key = serialization.load_pem_private_key((folder / f"{name}.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((folder / f"{name}.crt").read_bytes())
        except (OSError, ValueError) as exc:
            problems.append(f"{name} identity: {exc}")
            continue
        if key.public_key() != cert.public_key():
            problems.append(f"{name}.key does not match {name}.crt")
    if not (folder / "mosquitto.conf").exists():
        problems.append("no mosquitto.conf")
    for name in ("ca.crt", "crl.pem"):
        try:
            if (folder / name).read_bytes() != (ca_dir(case.repo) / name).read_bytes():
                problems.append(f"{name} differs from the CA's")
        except OSError as exc:
            problems.append(f"{name}: {exc.strerror}")
    acl = render_acl(
        load_registry(case.repo).values(),
        record["controller_identity"],
        load_gateways(case.repo).values(),
    )
    try:
        if (folder / "acl").read_text() != acl:
            problems.append("the ACL does not match the registry")
    except OSError as exc:
        problems.append(f"acl: {exc.strerror}")
    return "; ".join(problems)


def gateway_files_problem(case: Case) -> str:
    """'' when every unrevoked gateway's folder (``out/gw-<site>``, as the specs write it)
    holds its current certificate and the key of that certificate."""
    problems = []
    for site, record in sorted(load_gateways(case.repo).items()):
        if record.is_revoked:
            continue
        folder = case.out / f"gw-{site}"
        try:
            cert = x509.load_pem_x509_certificate((folder / "gateway.crt").read_bytes())
            key = serialization.load_pem_private_key((folder / "gateway.key").read_bytes(), None)
        except (OSError, ValueError) as exc:
            problems.append(f"{site}: {exc}")
            continue
        if cert.serial_number != record.serial:
            problems.append(f"{site}: gateway.crt is not its current certificate")
        if key.public_key() != cert.public_key():
            problems.append(f"{site}: gateway.key does not match gateway.crt")
    return "; ".join(problems)


def archive_problem(case: Case, device_id: str) -> str:
    """'' when an enrollment archive in ``out/`` holds the device's current certificate."""
    record = load_registry(case.repo).get(device_id)
    if record is None:
        return f"{device_id} is not enrolled"
    for archive in sorted(case.out.glob("*.tar")):
        with tarfile.open(archive) as tar:
            member = tar.extractfile(DEVICE_CERT)
            if member is None:
                continue
            cert = x509.load_pem_x509_certificate(member.read())
        if cert.serial_number == record.serial:
            return ""
    return f"no archive in {case.out} holds {device_id}'s current certificate {record.serial:x}"


# ---------------------------------------------------------------------------- serve


def serve_in_process(case: Case, identity: bool) -> None:
    """What ``edgectl serve`` runs at start, in this process: its re-sign check, the
    rollout job's first tick, the device registry as ingestion loads it and the expiries
    ``/metrics`` renders. Raises CaseFailure."""
    from controller.app import _resign, registry_roster
    from controller.fleet.stores import open_store
    from controller.repository.expiry import ExpiryReader, has_device_ca
    from controller.rollout.service import RolloutService

    try:
        Repository.open(case.repo).versions()  # serve's own start-up check
        _resign(case.repo)
    except Exception as exc:
        raise CaseFailure(f"serve's re-sign check fails: {type(exc).__name__}: {exc}") from exc
    store = open_store(str(case.repo / "telemetry.sqlite"))
    try:
        RolloutService(case.repo, store).tick()
    except Exception as exc:
        raise CaseFailure(f"serve's rollout tick fails: {type(exc).__name__}: {exc}") from exc
    finally:
        store.close()
    if identity:
        try:
            registry_roster(case.repo).load()
        except Exception as exc:
            raise CaseFailure(f"serve cannot load the device registry: {exc}") from exc
        expiries = ExpiryReader(case.repo).read(time.time())
        if has_device_ca(case.repo) and (
            expiries.ca_not_after_s is None or expiries.crl_next_update_s is None
        ):
            raise CaseFailure("/metrics cannot read the device CA or its CRL")
        if len(expiries.roles_s) != len(ALL_ROLES):
            raise CaseFailure(f"/metrics reads the expiry of only {sorted(expiries.roles_s)}")


_PASSES: Final = (
    re.compile(r"re-sign check: nothing due|re-signed metadata before expiry"),
    re.compile(r'Job "rollout gates[^"]*" executed successfully'),
)
_SERVE_ERRORS: Final = re.compile(r"re-signing failed|rollout tick failed|Traceback")


def serve_real(case: Case, identity: bool) -> DesiredView:
    """Run the real ``edgectl serve`` until its re-sign check and its first rollout tick
    have run, refresh the device through its HTTP side, read ``/metrics``, SIGTERM it.
    Returns what the device saw. Raises CaseFailure."""
    config = case.root / "serve.toml"
    lines = ["[serve]", "resign_check_interval_s = 3600", "rollout_tick_interval_s = 3600"]
    mqtt = ""
    if identity:  # a broker nobody runs: serve loads the registry and its TLS files
        mqtt = f"127.0.0.1:{_closed_port()}"
        if case.tls:
            lines.append("mqtt_tls = true")
    config.write_text("\n".join(lines) + "\n")
    log = case.root / "serve.log"
    argv = edgectl_argv("-v", "serve", "--repo", case.repo, "--listen", "127.0.0.1:0")
    argv += ["--mqtt", mqtt, "--config", str(config)]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, text=True, env=_clean_env()
        )
    try:
        url = _ready_url(proc, log)
        deadline = time.monotonic() + SERVE_PASSES_TIMEOUT_S
        while not all(p.search(log.read_text()) for p in _PASSES):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CaseFailure(f"edgectl serve never ran its passes:\n{_tail(log)}")
            if _SERVE_ERRORS.search(log.read_text()):
                break
            time.sleep(0.05)
        if match := _SERVE_ERRORS.search(log.read_text()):
            raise CaseFailure(f"edgectl serve: {match.group(0)}:\n{_tail(log)}")
        seen = device_refresh(case, url)
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        roles = re.findall(
            r'edgefleet_tuf_metadata_expires_timestamp_seconds\{role="(\w+)"', metrics
        )
        if sorted(roles) != sorted(ALL_ROLES):
            raise CaseFailure(f"/metrics has the expiry of only {roles}:\n{_tail(log)}")
        if identity and (case.repo / "ca" / "ca.crt").exists():
            for series in ("device_ca_cert_expires", "device_crl_next_update"):
                if f"edgefleet_{series}_timestamp_seconds" not in metrics:
                    raise CaseFailure(f"/metrics lacks edgefleet_{series}:\n{_tail(log)}")
        return seen
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready_url(proc: subprocess.Popen[str], log: Path) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # serve prints it once listening, or exits
    if match := re.fullmatch(r"edgectl serve: listening on (http://\S+)\n", line):
        return match.group(1)
    proc.wait(timeout=60)
    raise CaseFailure(f"edgectl serve did not start (rc {proc.returncode}):\n{_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Spec:
    """One command under test.

    ``prepare`` makes the case's starting state from a copy of the template it names;
    ``argv``/``follow`` give the command and its natural next command for a case;
    ``rollback``: the command itself sends the fleet back (no regression check);
    ``serve_first``: serve's passes run between the kill and the next command;
    ``compare``: the summary keys the final state must share with the reference;
    ``archive_of``: a device whose enrollment archive must exist after recovery;
    ``taken``: a refusal of the command run again that says it already took effect (the
    follow-up must then complete, and the state be the one after it).
    """

    name: str
    template: str
    argv: Callable[[Case], list[str | Path]]
    follow: Callable[[Case], list[str | Path]]
    prepare: Callable[[Case], None] | None = None
    rollback: bool = False
    serve_first: bool = True
    identity: bool = False
    compare: tuple[str, ...] | None = None
    archive_of: str | None = None
    taken: str | None = None


def enroll_options() -> EnrollOptions:
    return EnrollOptions(repository_url="http://127.0.0.1:1/", mqtt_host="127.0.0.1")


def configure_broker(case: Case) -> None:
    write_broker_config(case.repo, case.broker, BrokerOptions(hosts=("localhost",)))


def enroll(case: Case, device_id: str) -> None:
    _, archive = add_device(case.repo, device_id, FLEET, enroll_options())
    case.out.mkdir(exist_ok=True)
    (case.out / f"{device_id}.tar").write_bytes(archive)
    refresh_broker_files(case.repo)


def broker_and_device(case: Case) -> None:
    configure_broker(case)
    enroll(case, "dev-1")


def _device_add(
    device_id: str, output: str, site: str | None = None
) -> Callable[[Case], list[str | Path]]:
    def argv(c: Case) -> list[str | Path]:
        return [
            "device", "add", device_id, "--fleet", FLEET, "--repo", c.repo,
            "--repository-url", "http://127.0.0.1:1/", "--broker", "127.0.0.1:8883",
            "-o", c.out / output, "--force", *(["--site", site] if site else []),
        ]  # fmt: skip

    return argv


def _gateway(action: str, site: str) -> Callable[[Case], list[str | Path]]:
    def argv(c: Case) -> list[str | Path]:
        out = ["-o", c.out / f"gw-{site}"] if action == "enroll" else []
        return ["gateway", action, site, "--repo", c.repo, *out]

    return argv


def broker_device_and_gateway(case: Case) -> None:
    """The broker folder, dev-1 behind site plant-7, and plant-7's gateway enrolled."""
    configure_broker(case)
    _, archive = add_device(case.repo, "dev-1", FLEET, enroll_options(), site="plant-7")
    case.out.mkdir(exist_ok=True)
    (case.out / "dev-1.tar").write_bytes(archive)
    enroll_gateway(case.repo, "plant-7", case.out / "gw-plant-7")
    refresh_broker_files(case.repo)


def _rollout(action: str) -> Callable[[Case], list[str | Path]]:
    def argv(c: Case) -> list[str | Path]:
        return ["rollout", action, MODEL, "--fleet", FLEET, "--repo", c.repo]

    return argv


def _start(version: str) -> Callable[[Case], list[str | Path]]:
    def argv(c: Case) -> list[str | Path]:
        return [
            "rollout", "start", MODEL, version, "--fleet", FLEET, "--repo", c.repo,
            "--bundle", c.bundle(version), "--stages", "10,50,100", "--wait", "1h",
        ]  # fmt: skip

    return argv


def _release(version: str) -> Callable[[Case], list[str | Path]]:
    def argv(c: Case) -> list[str | Path]:
        return ["release", c.bundle(version), "--fleet", FLEET, "--repo", c.repo]

    return argv


def _rotate(role: str) -> Callable[[Case], list[str | Path]]:
    def argv(c: Case) -> list[str | Path]:
        return ["keys", "rotate", role, "--repo", c.repo]

    return argv


SPECS: Final = (
    Spec("release", "released", _release("2.0.0"), _release("3.0.0")),
    Spec("rollout start", "released", _start("2.0.0"), _rollout("promote")),
    # Interrupted, then the operator moves on to a newer release before serve's next
    # tick (issue 19, defect 2): the fleet must stay on the newer release.
    Spec(
        "rollout start, then release",
        "released",
        _start("2.0.0"),
        _release("3.0.0"),
        serve_first=False,
        compare=("active_rollouts",),
    ),
    Spec("rollout pause", "rolling", _rollout("pause"), _rollout("resume")),
    Spec("rollout resume", "paused", _rollout("resume"), _rollout("pause")),
    Spec("rollout promote", "rolling", _rollout("promote"), _rollout("promote")),
    Spec("rollout abort", "rolling", _rollout("abort"), _start("3.0.0"), rollback=True),
    *(
        Spec(f"keys rotate {role}", "released", _rotate(role), _release("2.0.0"))
        for role in ALL_ROLES
    ),
    Spec(
        "releases retire",
        "three",
        lambda c: ["releases", "retire", MODEL, "1.0.0", "--repo", c.repo, "--grace-days", "0"],
        lambda c: ["releases", "prune", "--repo", c.repo, "--grace-days", "0"],
        # Killed once the targets dropped it: retiring it again says it is retired, and
        # `releases prune` deletes its file (retired.json names it).
        taken=r"no release lin 1\.0\.0: it was retired at",
    ),
    Spec(
        "releases prune",
        "retired",
        lambda c: ["releases", "prune", "--repo", c.repo, "--grace-days", "0"],
        lambda c: ["releases", "prune", "--repo", c.repo, "--grace-days", "0"],
    ),
    Spec(
        "broker config",
        "released",
        lambda c: ["broker", "config", "--repo", c.repo, "--host", "localhost", "-o", c.broker],
        _device_add("dev-1", "dev-1.tar"),
        identity=True,
    ),
    Spec(
        "broker config, again",
        "released",
        lambda c: ["broker", "config", "--repo", c.repo, "--host", "localhost", "-o", c.broker],
        _device_add("dev-2", "dev-2.tar"),
        prepare=broker_and_device,
        identity=True,
    ),
    Spec(
        "device add",
        "released",
        _device_add("dev-2", "dev-2.tar"),
        lambda c: ["device", "renew", "dev-2", "--repo", c.repo, "-o", c.out / "dev-2-renewed.tar"],
        prepare=broker_and_device,
        identity=True,
        archive_of="dev-2",
        # Killed once it recorded the device: its certificate's key was in the archive it
        # did not write; `device add` refuses to enroll it twice and names `device renew`.
        taken=r"is already enrolled .*edgectl device renew",
    ),
    Spec(
        "device revoke",
        "released",
        lambda c: ["device", "revoke", "dev-1", "--repo", c.repo],
        _device_add("dev-1", "dev-1-again.tar"),
        prepare=broker_and_device,
        identity=True,
    ),
    # Killed once it recorded the certificate but before the key reached gw-plant-7/: run
    # again, it issues a new one and revokes the lost one (the CRL must list it).
    Spec(
        "gateway enroll",
        "released",
        _gateway("enroll", "plant-7"),
        _device_add("dev-2", "dev-2.tar", site="plant-7"),
        prepare=broker_and_device,
        identity=True,
    ),
    Spec(
        "gateway revoke",
        "released",
        _gateway("revoke", "plant-7"),
        _gateway("enroll", "plant-7"),
        prepare=broker_device_and_gateway,
        identity=True,
    ),
)


# ---------------------------------------------------------------------------- running


@dataclass
class Outcome:
    spec: str
    step: int
    path: str
    problem: str = ""
    real_serve: bool = False
    known: str = ""  # the defect (KNOWN in the test) this failure is expected on

    @property
    def recovered(self) -> bool:
        return not self.problem


@dataclass
class Reference:
    """The uninterrupted command: its steps, the state after it and after its follow-up."""

    steps: list[Step]
    before: dict[str, Any]
    before_keys: dict[str, list[str]]
    before_view: DesiredView
    after: dict[str, Any]
    after_follow: dict[str, Any]


@dataclass
class Runner:
    templates: dict[str, Case]
    work: Path
    http: RepoHttp
    counter: Iterator[int] = field(default_factory=lambda: iter(range(1_000_000)))

    def fresh(self, spec: Spec, label: str) -> Case:
        case = copy_case(self.templates[spec.template], self.work / f"{label}-{next(self.counter)}")
        case.out.mkdir(exist_ok=True)
        if spec.prepare is not None:
            spec.prepare(case)
        case.tls = (ca_dir(case.repo) / BROKER_RECORD).exists()
        return case

    def view(self, case: Case) -> DesiredView:
        self.http.directory = case.repo
        return device_refresh(case, self.http.url)

    def serve(self, case: Case, spec: Spec, real: bool) -> DesiredView:
        if real:
            return serve_real(case, spec.identity)
        serve_in_process(case, spec.identity)
        return self.view(case)

    def reference(self, spec: Spec) -> Reference:
        case = self.fresh(spec, "reference")
        before_keys = role_keyids(case)
        before = summary(case, before_keys)
        before_view = self.view(case)
        log = case.root / "steps.log"
        env = {**_clean_env(), "EDGEFLEET_TEST_WRITE_LOG": str(log)}
        done = run_edgectl(edgectl_argv(*spec.argv(case)), env)
        if done.returncode != 0:
            raise AssertionError(f"{spec.name} fails uninterrupted:\n{done.stdout}{done.stderr}")
        steps = read_steps(log)
        self.serve(case, spec, real=False)
        after = summary(case, before_keys)
        self._must_complete(spec.follow(case), "the follow-up on the uninterrupted state")
        self.serve(case, spec, real=False)
        after_follow = summary(case, before_keys)
        shutil.rmtree(case.root)
        return Reference(steps, before, before_keys, before_view, after, after_follow)

    def _must_complete(self, args: list[str | Path], what: str, taken: str | None = None) -> bool:
        """Run edgectl; raise CaseFailure unless it exits 0. Returns True instead when it
        refuses with a message matching ``taken`` (it already took effect)."""
        done = run_edgectl(edgectl_argv(*args))
        if done.returncode in (1, 2) and taken and re.search(taken, done.stderr):
            return True
        if done.returncode != 0:
            raise CaseFailure(
                f"{what} (edgectl {' '.join(map(str, args[:3]))}) exits {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-600:]}"
            )
        if "Traceback" in done.stderr:
            raise CaseFailure(f"{what} printed a traceback:\n{done.stderr[-600:]}")
        return False

    def kill_point(self, spec: Spec, ref: Reference, k: int, real_serve: bool) -> Outcome:
        case = self.fresh(spec, f"k{k}")
        outcome = Outcome(spec.name, k, f"({ref.steps[k - 1].path})", real_serve=real_serve)
        try:
            self._kill_point(spec, ref, case, k, real_serve, outcome)
        except CaseFailure as exc:
            outcome.problem = str(exc)
        except Exception as exc:  # the harness's own reads of a broken state
            outcome.problem = f"{type(exc).__name__}: {exc}"
        else:
            shutil.rmtree(case.root, ignore_errors=True)
        return outcome

    def _kill_point(
        self, spec: Spec, ref: Reference, case: Case, k: int, real_serve: bool, outcome: Outcome
    ) -> None:
        log = case.root / "steps.log"
        env = {**_clean_env(), "EDGEFLEET_TEST_WRITE_LOG": str(log)}
        env["EDGEFLEET_TEST_KILL_AT_WRITE"] = str(k)
        done = run_edgectl(edgectl_argv(*spec.argv(case)), env)
        steps = read_steps(log)
        if done.returncode != -signal.SIGKILL or len(steps) != k:
            raise CaseFailure(
                f"not killed at step {k} (rc {done.returncode}, {len(steps)} steps; the "
                f"steps differ from the uninterrupted run's): {done.stderr[-400:]}"
            )
        outcome.path = relative(case, steps[-1].path)

        def check(stage: str, view: DesiredView, last: DesiredView | None = None) -> DesiredView:
            """No regression from before the command (unless it is a rollback), nor,
            for a serve pass (``last``: what devices saw before it), from before serve:
            serve is no operator and never sends a fleet back on its own. It may finish the
            operator's interrupted rollback (the command saved it before publishing): then
            the fleet is exactly where the uninterrupted command put it."""
            back = [] if spec.rollback else regressions(ref.before_view, view)
            finished = spec.rollback and view == ref.after["desired"]
            if last is not None and not finished:
                back += [f"{b} (by serve)" for b in regressions(last, view)]
            if back:
                raise CaseFailure(f"{stage}: desired state went backwards: {'; '.join(back)}")
            return view

        def serve(stage: str, last: DesiredView, real: bool) -> DesiredView:
            try:
                view = self.serve(case, spec, real)
            except CaseFailure as exc:
                raise CaseFailure(f"{stage}: {exc}") from None
            return check(stage, view, last)

        try:
            seen = check("after the kill", self.view(case))
        except CaseFailure as exc:
            raise CaseFailure(f"after the kill: {exc}") from None
        if spec.serve_first:
            seen = serve("serve after the kill", seen, real_serve)
        state = summary(case, ref.before_keys)
        again = spec.serve_first and state != ref.after
        if again:
            expected, args, what = ref.after, spec.argv(case), "the command run again"
        else:
            expected, args, what = ref.after_follow, spec.follow(case), "the next command"
        refusal = self._must_complete(args, what, spec.taken if again else None)
        if refusal:
            expected, what = ref.after_follow, "the next command, the command refusing to repeat"
            self._must_complete(spec.follow(case), what)
        seen = check(f"after {what}", self.view(case))
        serve(f"serve after {what}", seen, real=real_serve and not spec.serve_first)
        final = summary(case, ref.before_keys)
        keys = spec.compare or tuple(expected)
        differ = {key: (final[key], expected[key]) for key in keys if final[key] != expected[key]}
        if spec.compare is not None:
            view = self.view(case)
            want = ref.after_follow["desired"]
            if {m: v[:2] for m, v in view.items()} != {m: v[:2] for m, v in want.items()}:
                differ["desired"] = (view, want)
        if differ:
            raise CaseFailure(
                f"after {what} and serve, the state is not the uninterrupted one's: "
                + "; ".join(
                    f"{key}: {got} (expected {want})" for key, (got, want) in differ.items()
                )
            )
        if spec.archive_of is not None and (problem := archive_problem(case, spec.archive_of)):
            raise CaseFailure(problem)
