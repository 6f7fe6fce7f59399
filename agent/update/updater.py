"""One update check: refresh trusted metadata, read desired state, install what it names.

This is the orchestrator of the update path. It decides what is expected (the same
version: nothing to do; a version that failed here for this rollout: skip until desired
state changes; a version on probation: let probation finish, unless desired state went
back to the previous release, which rolls back now) and what gets reported. The rules it
applies live in ``agent.contracts`` (desired-state resolution) and ``agent.update.journal``; the
install itself, phase by phase, is ``agent.update.lifecycle``'s. Wherever it does not install
the version desired state names (or fails to), it records why in ``waiting``
(``agent.update.waiting``), which the status message and heartbeats carry.

Invariants:
- Every check builds a new ``tuf.ngclient.Updater`` (one refresh per Updater). Its
  metadata cache is written durably (``DurableUpdater``, ``agent.update.tuf_client``);
  a cached root that no longer loads (a power cut left it empty or half written) is
  replaced by the enrolled ``trusted_root``, from which TUF walks the root rotations
  forward again.
- python-tuf's client, the fetchers (httpx, the MQTT one) and TLS are imported by the
  first check, not at start: the agent serves what it restored without waiting for them.
- Every call into python-tuf maps its errors (``_tuf_errors``): a transfer failure is a
  ``FetchError``, metadata that fails verification an ``UntrustedInputError``, a cache
  the disk refuses a ``StorageError``. That includes ``get_targetinfo``, which loads the
  delegated ``rollout`` role lazily, after the refresh. ``check`` returns every
  ``AgentError`` in its result; anything else is a bug, left to the update loop.
- Checks never overlap: ``check`` is serialised by a lock.
- Targets are downloaded here, not by ``Updater.download_target`` (which stages in a
  temporary file and copies: twice the disk, and no resumption): into
  ``staging/<name>.<sha256 prefix>.part``, resumed from its size on the next check after
  an interruption, never past the signed length, verified as a whole against the signed
  length and hashes, then renamed into place. A part that fails verification is deleted.
- A delta (``agent.contracts.delta``) is tried before the full bundle when the signed
  targets list one from the version the device serves, smaller than the bundle: it is
  downloaded like any target, applied to the installed files, and the rebuilt file is
  verified against the *full bundle's* signed length and hashes before it is used. Any
  failure (no base on disk, a base that differs, a bad delta, a rebuild that does not
  match, a transfer error, a format 2 delta made with another libzstd release than this
  agent's, refused before any rebuild) falls back to the full bundle, logged once per
  delta; a cut
  or timed-out transfer of the delta is resumed on the next check, any other failure
  writes the delta off while the agent runs.
- The transport is chosen by ``[repository] transport``: HTTP, MQTT chunks, or HTTP
  falling back to MQTT (``agent.update.fetcher``, ``agent.update.mqtt_fetcher``).
- Sources: HTTP checks try ``[repository] mirrors`` then ``url`` (``sources``), always in
  that order, from the first, on every check. A source fails the check when it cannot
  be reached or answers with errors (``FetchError``), when its metadata fails TUF's
  verification (``UntrustedInputError``), or when a bundle it serves fails (a transfer
  error, or bytes that do not match the signed length and hashes): the whole check is
  then run again on the next source (models installed already are found unchanged), and
  the last source's failure names every source's. Sources are untrusted: python-tuf
  persists metadata only once it verified it, so a tampering source can neither make the
  device accept anything nor roll back what the next source is checked against. With
  ``auto``, MQTT is the last resort behind the last HTTP source. Staged parts are per
  source (``<name>.<sha256 prefix>.<source tag>.part`` when there are several), so bytes
  from one source are never resumed from another.

Blocking: call ``check`` from a worker thread, never the event loop.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

# python-tuf's exceptions only (cheap); its client comes with the first check.
from tuf.api import exceptions as tuf_errors

from agent.base.errors import (
    AgentError,
    FetchError,
    InsufficientSpaceError,
    StorageError,
    TamperedDownloadError,
    UntrustedInputError,
)
from agent.base.fsutil import atomic_write, durable_rename, free_bytes, remove_tree
from agent.contracts import (
    ROLLOUT_ROLE,
    DesiredState,
    ModelRelease,
    Waiting,
    desired_target_path,
    parse_desired_state,
    resolve_release,
)
from agent.contracts.delta import DeltaError, apply_delta, delta_target_path
from agent.device.config import AgentConfig
from agent.update.journal import Phase, serving_version, should_skip
from agent.update.lifecycle import ModelLifecycle
from agent.update.waiting import (
    WaitingBoard,
    after_check_error,
    after_install_error,
    before_install,
)

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile
    from tuf.ngclient import Updater

    from agent.update.fetcher import ResumableFetcher

logger = logging.getLogger(__name__)

# Room for the unpacked copy next to the downloaded file, plus slack.
_UNPACK_FACTOR = 2.2
# A staged part nobody resumed for this long belongs to a release no longer wanted.
_STALE_PART_S = 7 * 86400.0


@dataclass
class CheckResult:
    """What one check did, for logs and tests."""

    installed: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    error: str | None = None
    # Each repository source that failed during the check, "<url>: <why>", in order
    # (a later source may have succeeded).
    source_failures: list[str] = field(default_factory=list)
    # Models refused for their source's fault (a transfer, or altered bytes): the next
    # source is tried for them.
    source_refused: dict[str, str] = field(default_factory=dict)


class UpdateService:
    """Keeps the device's models at the versions its fleet's desired state names."""

    def __init__(
        self,
        config: AgentConfig,
        lifecycle: ModelLifecycle,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        """``on_progress``: called as each transfer starts and as its data arrives (the
        agent's watchdog renews the check's deadline then)."""
        self._config = config
        self._lifecycle = lifecycle
        self._on_progress = on_progress
        self._lock = threading.Lock()
        repository = config.repository
        if repository.transport == "mqtt":
            from agent.update.mqtt_fetcher import URL_PREFIX

            self._sources: tuple[str, ...] = (URL_PREFIX,)
        else:
            self._sources = tuple(url.rstrip("/") + "/" for url in repository.sources)
        # The source the running check uses (checks never overlap: ``_lock``).
        self._source = 0
        # The failures of the sources the running check tried before this one.
        self._failures: list[str] = []
        # What the last check said of each source that failed (agent status).
        self.source_failures: list[str] = []
        self._metadata_dir = config.state_dir / "tuf"
        self._staging_dir = config.state_dir / "staging"
        # Built on first use of each source (``_fetcher``): their imports are the heavy
        # part of the update path. Their TLS files were checked at start by the MQTT link.
        self._built_fetchers: dict[int, ResumableFetcher] = {}
        self._fetcher_lock = threading.Lock()
        # Why each model is not on the version desired state names, as the last check
        # left it (``agent.update.waiting``); the models the last desired state named.
        self.waiting = WaitingBoard()
        self._desired_models: set[str] = set()
        # Delta target paths that failed here for good (not a transfer that may resume):
        # not tried again by this process. Every failure of a delta is logged once. With
        # several sources, a delta whose bytes one source altered is written off for that
        # source only ("<source> <path>"): the others may serve it intact.
        self._failed_deltas: set[str] = set()
        self._logged_deltas: set[str] = set()

    @property
    def sources(self) -> tuple[str, ...]:
        """The repository base URLs a check tries, in order."""
        return self._sources

    @property
    def _base_url(self) -> str:
        return self._sources[self._source]

    @property
    def _metadata_url(self) -> str:
        return self._base_url + "metadata/"

    @property
    def _targets_url(self) -> str:
        return self._base_url + "targets/"

    @property
    def _fetcher(self) -> ResumableFetcher:
        with self._fetcher_lock:
            index = self._source
            fetcher = self._built_fetchers.get(index)
            if fetcher is None:
                last = index == len(self._sources) - 1
                fetcher = build_fetcher(
                    self._config, self._base_url, mqtt_fallback=last, on_progress=self._on_progress
                )
                self._built_fetchers[index] = fetcher
            return fetcher

    def close(self) -> None:
        with self._fetcher_lock:
            for fetcher in self._built_fetchers.values():
                fetcher.close()

    # ------------------------------------------------------------------ one check

    def check(self) -> CheckResult:
        """Refresh metadata and install whatever desired state names for this device."""
        with self._lock:
            try:
                return self._check()
            except FetchError as exc:
                logger.warning("update check failed, will retry: %s", exc)
                self._check_failed(exc)
                return CheckResult(error=str(exc))
            except UntrustedInputError as exc:
                logger.error("update check refused the repository: %s", exc)
                self._check_failed(exc)
                return CheckResult(error=str(exc))
            except AgentError as exc:
                logger.error("update check failed, will retry: %s", exc)
                self._check_failed(exc)
                return CheckResult(error=str(exc))

    def _check_failed(self, exc: AgentError) -> None:
        """Every model the device knows waits on a check that read no desired state."""
        models = self._desired_models | set(self._lifecycle.model_names())
        self.waiting.set_all(models, after_check_error(exc))

    def _check(self) -> CheckResult:
        """Run the check on each source in order until one serves it without fault."""
        # Decisions below start from settled journals, whatever the repository says.
        self._lifecycle.put_back_interrupted()
        self._failures = []
        self.source_failures = []
        merged = CheckResult()
        completed = False  # a source gave desired state: its decisions stand
        try:
            for index, base in enumerate(self._sources):
                self._source = index
                last = index == len(self._sources) - 1
                try:
                    attempt = self._check_source()
                except (FetchError, UntrustedInputError) as exc:
                    if last and not completed:
                        raise self._every_source_failed(exc) from exc
                    if last:
                        # An earlier source read desired state and installed what it
                        # could: keep that, and the reasons it gave for the rest.
                        logger.warning("repository %s failed too (%s)", base, exc)
                        self._failures.append(f"{base}: {exc}")
                        break
                    self._source_failed(base, exc)
                    continue
                completed = True
                merged.installed.update(attempt.installed)
                merged.refused = attempt.refused
                merged.unchanged = [m for m in attempt.unchanged if m not in merged.installed]
                merged.source_refused = attempt.source_refused
                if not attempt.source_refused or last:
                    break
                why = "; ".join(f"{m}: {r}" for m, r in sorted(attempt.source_refused.items()))
                self._source_failed(base, FetchError(why))
            merged.source_failures = list(self._failures)
            return merged
        finally:
            self.source_failures = list(self._failures)
            self._source = 0

    def _source_failed(self, base: str, exc: AgentError) -> None:
        """Note a source's failure (the check goes on with the next source)."""
        logger.warning(
            "repository %s failed (%s); trying the next one, %s",
            base,
            exc,
            self._sources[self._source + 1],
        )
        self._failures.append(f"{base}: {exc}")

    def _every_source_failed(self, exc: AgentError) -> AgentError:
        """The last source's error, naming every source's failure when there are several
        (of the same class as ``exc``: the status tells an untrusted repository from an
        unreachable one by the last source)."""
        if len(self._sources) == 1:
            return exc
        self._failures.append(f"{self._base_url}: {exc}")
        error = type(exc)(
            f"every repository source failed ({len(self._sources)}): " + "; ".join(self._failures)
        )
        return error

    def _check_source(self) -> CheckResult:
        """One check against the current source."""
        updater = self._new_updater()
        with self._tuf_errors("metadata refresh"):
            updater.refresh()
        desired = self._read_desired_state(updater)
        result = CheckResult()
        self._desired_models = set(desired.models) if desired is not None else set()
        self.waiting.keep_only(self._desired_models)
        if desired is None:
            return result
        for model, release in sorted(desired.models.items()):
            self._apply(updater, model, release, result)
        return result

    def _new_updater(self) -> Updater:
        """An Updater on the cached root, or on the enrolled root when the cache has none
        or its root no longer loads (TUF then walks the rotations forward again)."""
        try:
            self._metadata_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._storage_error("the metadata cache", exc) from exc
        cached = self._cached_root()
        if cached is not None:
            try:
                return self._updater(cached)
            except tuf_errors.RepositoryError as exc:
                self._log_cache_rebuilt(_describe(exc))
            except OSError as exc:
                raise self._storage_error("the cached root", exc) from exc
        try:
            return self._updater(self._enrolled_root())
        except tuf_errors.RepositoryError as exc:
            raise UntrustedInputError(
                f"trusted root {self._config.trusted_root} is not valid: {_describe(exc)}; "
                "enroll the device again (edge-agent enroll)"
            ) from exc
        except OSError as exc:
            raise self._storage_error("the trusted root", exc) from exc

    def _cached_root(self) -> bytes | None:
        """The root the last check trusted (``root.json``); None when there is none."""
        path = self._metadata_dir / "root.json"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None  # a first check, or a link left dangling: bootstrap
        except OSError as exc:
            self._log_cache_rebuilt(exc.strerror or str(exc))
            return None

    def _log_cache_rebuilt(self, why: str) -> None:
        logger.warning(
            "the cached TUF root %s cannot be loaded (%s); starting again from the enrolled "
            "root %s, walking its rotations forward",
            self._metadata_dir / "root.json",
            why,
            self._config.trusted_root,
        )

    def _updater(self, bootstrap: bytes) -> Updater:
        """Raises RepositoryError or OSError, as python-tuf does (mapped by the caller)."""
        from agent.update.tuf_client import DurableUpdater

        return DurableUpdater(
            metadata_dir=str(self._metadata_dir),
            metadata_base_url=self._metadata_url,
            target_base_url=self._targets_url,
            fetcher=self._fetcher,
            bootstrap=bootstrap,
        )

    def _enrolled_root(self) -> bytes:
        try:
            return self._config.trusted_root.read_bytes()
        except OSError as exc:
            raise UntrustedInputError(
                f"cannot read the trusted root {self._config.trusted_root}: {exc.strerror}; "
                "install the fleet's root.json there (edge-agent enroll does it)"
            ) from None

    @contextmanager
    def _tuf_errors(self, what: str) -> Iterator[None]:
        """Map the errors of one call into python-tuf (every call goes through here).

        DownloadError → FetchError, RepositoryError → UntrustedInputError, OSError (its
        metadata cache) → StorageError.
        """
        try:
            yield
        except tuf_errors.DownloadError as exc:
            raise FetchError(f"{what} from {self._metadata_url}: {exc}") from exc
        except tuf_errors.RepositoryError as exc:
            raise UntrustedInputError(f"{what} rejected: {_describe(exc)}") from exc
        except OSError as exc:
            raise self._storage_error(what, exc) from exc

    def _storage_error(self, what: str, exc: OSError) -> StorageError:
        return StorageError(
            f"{what}: cannot write the TUF metadata cache {self._metadata_dir}: "
            f"{exc.strerror or exc}; free space on the device (or fix the state folder) and "
            "the next check retries"
        )

    def _read_desired_state(self, updater: Updater) -> DesiredState | None:
        path = desired_target_path(self._config.fleet)
        # The delegated rollout role is fetched here, lazily, not by the refresh.
        with self._tuf_errors(f"the {ROLLOUT_ROLE} role's metadata for {path}"):
            info = updater.get_targetinfo(path)
        if info is None:
            logger.info("fleet %s has no desired state yet (%s)", self._config.fleet, path)
            return None
        local = self._download(updater, info, self._staging_dir / "desired.json")
        try:
            return parse_desired_state(local.read_bytes(), self._config.fleet)
        finally:
            remove_tree(local)

    # ------------------------------------------------------------------ decisions

    def _apply(
        self, updater: Updater, model: str, release: ModelRelease, result: CheckResult
    ) -> None:
        # One reason per model and check, set once: a reason that stays keeps its ``since``.
        self.waiting.set(model, self._apply_one(updater, model, release, result))

    def _apply_one(
        self, updater: Updater, model: str, release: ModelRelease, result: CheckResult
    ) -> Waiting | None:
        """Act on desired state for one model; return why the device does not run the
        version named for it after this, or None when it does (or is given none)."""
        resolved = resolve_release(release, self._config.device_id)
        if resolved is None:
            return None
        version, target = resolved
        record = self._lifecycle.record(model)
        if record.phase is Phase.SHADOW:
            if version == record.version:
                return before_install(
                    record, version, release.rollout_id, agent_version=self._lifecycle.agent_version
                )
            # Desired state names another version (the previous one, or a newer one):
            # the shadow ends without a verdict; the candidate answered no client.
            self._lifecycle.cancel_shadow(model, f"desired state names {version} now")
            record = self._lifecycle.record(model)
        if record.phase is Phase.ACTIVE:
            if version == record.previous:
                self._lifecycle.roll_back(model, f"desired state went back to {version}")
                result.installed[model] = version
                return None
            waits = before_install(
                record,
                version,
                release.rollout_id,
                self._lifecycle.probation_left_s(model),
                agent_version=self._lifecycle.agent_version,
            )
            if waits is not None:
                logger.info("%s: %s %s", model, version, waits.detail)
            return waits
        if serving_version(record) == version:
            result.unchanged.append(model)
            return None
        agent_version = self._lifecycle.agent_version
        skip = should_skip(record, version, release.rollout_id, agent_version)
        if skip is not None:
            logger.debug("%s: not installing: %s", model, skip)
            return before_install(record, version, release.rollout_id, agent_version=agent_version)
        if record.format_refused_by and (record.version, record.rollout_id) == (
            version,
            release.rollout_id,
        ):
            logger.info(
                "%s: %s was refused here by %s for a contract it lacked (%s); "
                "edge-agent %s tries it again",
                model,
                version,
                record.format_refused_by,
                record.reason,
                agent_version,
            )
        served = serving_version(record) or "nothing"
        try:
            self._lifecycle.install(
                model,
                version,
                release.rollout_id,
                release.probation,
                lambda: self._download_bundle(
                    updater, model, version, target, serving_version(record)
                ),
                release.shadow,
            )
        except TamperedDownloadError as exc:
            tampered = self._source_error(exc)
            logger.error(
                "refused target %s: %s; still serving %s %s; will fetch it again%s",
                target,
                tampered,
                model,
                served,
                self._next_try(),
            )
            result.refused[model] = str(tampered)
            result.source_refused[model] = str(exc)
            return after_install_error(tampered, version)
        except FetchError as exc:
            failed = self._source_error(exc)
            logger.warning(
                "install of %s put back, will retry%s: %s", target, self._next_try(), failed
            )
            result.refused[model] = str(failed)
            result.source_refused[model] = str(exc)
            return after_install_error(failed, version)
        except (InsufficientSpaceError, StorageError) as exc:
            logger.warning("install of %s put back, will retry: %s", target, exc)
            result.refused[model] = str(exc)
            return after_install_error(exc, version)
        except AgentError as exc:
            logger.error("refused target %s: %s; still serving %s %s", target, exc, model, served)
            result.refused[model] = str(exc)
            return after_install_error(exc, version)
        result.installed[model] = version
        return None

    def _next_try(self) -> str:
        if self._source + 1 < len(self._sources):
            return f" from {self._sources[self._source + 1]} now"
        return " on the next check"

    def _source_error(self, exc: FetchError) -> FetchError:
        """``exc`` naming its source when there are several, and every earlier source's
        failure when it is the last."""
        if len(self._sources) == 1:
            return exc
        if self._source + 1 < len(self._sources):
            return type(exc)(f"{self._base_url}: {exc}")
        earlier = "".join(f"{failure}; " for failure in self._failures)
        return type(exc)(f"every repository source failed: {earlier}{self._base_url}: {exc}")

    def _download_bundle(
        self, updater: Updater, model: str, version: str, target: str, served: str | None = None
    ) -> Path:
        try:
            with self._tuf_errors(f"the targets metadata for {target}"):
                info = updater.get_targetinfo(target)
        except UntrustedInputError as exc:
            # Metadata that fails verification now is the repository's (or a mirror's)
            # doing, not the release's: put the install back, as for altered bytes.
            raise TamperedDownloadError(str(exc)) from exc
        if info is None:
            raise UntrustedInputError(f"desired state names {target}, which no signed targets list")
        limit = self._config.repository.max_bundle_bytes
        if info.length > limit:
            raise UntrustedInputError(
                f"bundle is {info.length} bytes, over repository.max_bundle_bytes={limit}"
            )
        path = self._staging_dir / f"{model}-{version}.bundle"
        if served is not None and served != version:
            rebuilt = self._try_delta(updater, model, version, served, info, path)
            if rebuilt is not None:
                return rebuilt
        self._check_disk_space(info.length)
        logger.info("installing %s %s from %s (%d bytes)", model, version, target, info.length)
        return self._download(updater, info, path)

    def _try_delta(
        self, updater: Updater, model: str, version: str, old: str, full: TargetFile, path: Path
    ) -> Path | None:
        """The bundle rebuilt from a delta and verified against ``full``'s signed length
        and hashes, at ``path``; None (logged once per delta) when there is no usable delta:
        the caller downloads the full bundle."""
        delta_path = delta_target_path(model, version, old)
        written_off = {delta_path, f"{self._base_url} {delta_path}"}
        if written_off & self._failed_deltas:
            return None
        try:
            with self._tuf_errors(f"the targets metadata for {delta_path}"):
                info = updater.get_targetinfo(delta_path)
        except AgentError:
            return None  # the full bundle's lookup says what is wrong, if anything
        if info is None or info.length >= full.length:
            return None
        staged = self._staging_dir / f"{model}-{version}.from-{old}.delta"
        try:
            base_dir = self._lifecycle.installed_dir(model, old)
            if not base_dir.is_dir():
                raise DeltaError(f"the installed files of {model} {old} are not on disk")
            self._check_disk_space(info.length + full.length)
            logger.info(
                "installing %s %s from %s (%d bytes, the bundle is %d)",
                model,
                version,
                delta_path,
                info.length,
                full.length,
            )
            downloaded = self._download(updater, info, staged)
            try:
                delta = downloaded.read_bytes()
            finally:
                remove_tree(downloaded)
            data = apply_delta(
                delta,
                lambda name: (base_dir / name).read_bytes(),
                model=model,
                old=old,
                new=version,
                max_output_bytes=self._config.repository.max_bundle_bytes,
            )
            del delta
            # The check that matters: the rebuilt file against the full bundle's
            # signed length and hashes, whatever the delta's header claims.
            full.verify_length_and_hashes(io.BytesIO(data))
            atomic_write(path, data)
        except (AgentError, OSError, tuf_errors.LengthOrHashMismatchError, MemoryError) as exc:
            # A transfer cut or timed out (not altered bytes) or a full disk is tried again
            # on the next check, resuming its part: on a poor link the delta is the better
            # bet. Anything else about this delta will not change: never again.
            transient = isinstance(exc, FetchError | InsufficientSpaceError) and not isinstance(
                exc, TamperedDownloadError
            )
            if not transient:
                altered_here = isinstance(exc, TamperedDownloadError) and len(self._sources) > 1
                self._failed_deltas.add(
                    f"{self._base_url} {delta_path}" if altered_here else delta_path
                )
                for leftover in [staged, *staged.parent.glob(f"{staged.name}.*.part")]:
                    remove_tree(leftover)
            if delta_path in self._logged_deltas:
                return None
            self._logged_deltas.add(delta_path)
            what = (
                f"rebuilt bundle does not match the signed target {full.path}: {_describe(exc)}"
                if isinstance(exc, tuf_errors.LengthOrHashMismatchError)
                else f"{type(exc).__name__}: {exc}"
            )
            logger.warning(
                "%s %s: delta %s not used (%s); downloading the full bundle",
                model,
                version,
                delta_path,
                what,
            )
            return None
        logger.info(
            "%s %s rebuilt from %s and verified against %s", model, version, delta_path, full.path
        )
        return path

    # ------------------------------------------------------------------ helpers

    def _check_disk_space(self, length: int) -> None:
        self._staging_dir.mkdir(parents=True, exist_ok=True)
        needed = int(length * _UNPACK_FACTOR)
        available = free_bytes(self._staging_dir)
        if available < needed:
            raise InsufficientSpaceError(
                f"not enough disk space in {self._staging_dir}: need {needed} bytes "
                f"(the bundle and its unpacked copy), have {available}; free some space "
                "and the install resumes on the next check"
            )

    def _target_url(self, info: TargetFile) -> str:
        """The target's URL: under its consistent-snapshot name when root says so."""
        path = info.path
        if self._consistent_snapshot():
            directory, sep, basename = path.rpartition("/")
            path = f"{directory}{sep}{info.hashes['sha256']}.{basename}"
        return self._targets_url + path

    def _consistent_snapshot(self) -> bool:
        # The root the refresh just trusted (python-tuf wrote it after verifying it).
        from tuf.api.metadata import Metadata, Root

        try:
            with self._tuf_errors("the trusted root"):
                root = Metadata[Root].from_file(str(self._metadata_dir / "root.json"))
        except UntrustedInputError as exc:
            raise TamperedDownloadError(str(exc)) from exc
        return bool(root.signed.consistent_snapshot)

    def _download(self, updater: Updater, info: TargetFile, path: Path) -> Path:
        """Download a verified target to ``path``: resumed into a ``.part``, checked whole
        against its signed length and hashes, then renamed.

        Raises FetchError (transient: the part is kept and resumed next time),
        TamperedDownloadError (more bytes than signed, or a hash mismatch: the part is
        deleted), StorageError (the disk refused the part), UntrustedInputError (no
        sha256 in the signed target).
        """
        del updater  # the trusted metadata is on disk; the transfer is ours
        sha256 = info.hashes.get("sha256")
        if not sha256:
            raise UntrustedInputError(f"{info.path}: the signed target has no sha256 hash")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{sha256[:16]}{self._part_tag()}.part")
        _drop_stale_parts(path, partial, f"{path.name}.{sha256[:16]}.")
        try:
            self._transfer(info, partial)
            with open(partial, "rb") as f:
                info.verify_length_and_hashes(f)
        except tuf_errors.LengthOrHashMismatchError as exc:
            remove_tree(partial)
            raise TamperedDownloadError(_describe(exc)) from exc
        except OSError as exc:
            raise StorageError(
                f"{info.path}: cannot write {partial}: {exc.strerror or exc}; free space on the "
                "device (or fix the state folder) and the next check resumes"
            ) from exc
        durable_rename(partial, path)
        for other in path.parent.glob(f"{path.name}.{sha256[:16]}.*part"):
            remove_tree(other)  # the same bytes, partly from other sources: not needed now
        return path

    def _part_tag(self) -> str:
        """What tells the staged parts of each source apart ("" with one source)."""
        if len(self._sources) == 1:
            return ""
        return "." + hashlib.sha256(self._base_url.encode()).hexdigest()[:8]

    def _transfer(self, info: TargetFile, partial: Path) -> None:
        """Append to ``partial`` from its current size up to the signed length."""
        have = partial.stat().st_size if partial.exists() else 0
        if have > info.length:
            remove_tree(partial)
            have = 0
        if have == info.length:
            return  # complete already: only the verification was missing
        from agent.update.fetcher import close_body  # built already: no import cost here

        url = self._target_url(info)
        body: Iterator[bytes] | None = None
        try:
            start, body = self._fetcher.fetch_from(url, have)
            if have:
                logger.info(
                    "%s: resuming at byte %d of %d%s",
                    info.path,
                    have,
                    info.length,
                    "" if start == have else " (the server cannot resume: from the start)",
                )
            with open(partial, "r+b" if start else "wb") as out:
                out.truncate(start)
                out.seek(start)
                _write_bounded(body, out, info.length - start, info.path)
        except tuf_errors.DownloadError as exc:
            raise FetchError(f"{info.path}: {exc}") from exc
        finally:
            # However it ended (the part's file refused too): a body left open holds its
            # connection until the garbage collector closes it (agent.update.fetcher).
            if body is not None:
                close_body(body)


def _drop_stale_parts(path: Path, keep: Path, same_bytes: str) -> None:
    """Delete parts of other bytes under ``path``'s name (parts of the same bytes from
    other sources, named ``same_bytes...``, stay), and any part left untouched for
    ``_STALE_PART_S`` (a version desired state no longer names)."""
    now = time.time()
    for part in path.parent.glob("*.part"):
        if part == keep:
            continue
        try:
            other_bytes = part.name.startswith(path.name + ".") and not part.name.startswith(
                same_bytes
            )
            stale = other_bytes or now - part.stat().st_mtime > _STALE_PART_S
        except OSError:
            continue
        if stale:
            remove_tree(part)


def _write_bounded(body: Iterator[bytes], out: BinaryIO, allowed: int, what: str) -> None:
    """Write ``body`` to ``out``, refusing a byte past ``allowed``; fsync at the end.

    A source that sends more than the signed length is hostile (endless data): raise
    LengthOrHashMismatchError without reading further.
    """
    written = 0
    try:
        for chunk in body:
            written += len(chunk)
            if written > allowed:
                raise tuf_errors.LengthOrHashMismatchError(
                    f"{what}: received more than the signed length ({allowed} bytes left)"
                )
            out.write(chunk)
    finally:
        out.flush()
        os.fsync(out.fileno())


def build_fetcher(
    config: AgentConfig,
    base_url: str,
    mqtt_fallback: bool = True,
    on_progress: Callable[[], None] | None = None,
) -> ResumableFetcher:
    """The fetcher ``[repository] transport`` asks for, for the source at ``base_url``.

    With ``auto``, only the last HTTP source (``mqtt_fallback``) falls back to MQTT: the
    broker is the last resort, after every HTTP source."""
    from agent.device.tls_identity import tls_context
    from agent.update.fetcher import FallbackFetcher, HttpxFetcher, TransferLimits
    from agent.update.mqtt_fetcher import MqttFetcher, mqtt_url

    repository = config.repository
    limits = TransferLimits(
        connect_timeout_s=repository.connect_timeout_s,
        read_timeout_s=repository.read_timeout_s,
        deadline_s=repository.download_deadline_s,
        min_bytes_per_s=repository.min_bytes_per_s,
        progress_window_s=repository.progress_window_s,
        on_progress=on_progress,
    )

    def over_mqtt() -> MqttFetcher:
        return MqttFetcher(
            config.mqtt,
            config.fleet,
            config.device_id,
            limits,
            chunk_bytes=repository.mqtt_chunk_bytes,
            window=repository.mqtt_window,
            tls=tls_context(config, os.environ) if config.mqtt.tls else None,
        )

    if repository.transport == "mqtt":
        return over_mqtt()
    http = HttpxFetcher(limits)
    if repository.transport == "auto" and mqtt_fallback:
        return FallbackFetcher(
            http, over_mqtt(), lambda url: mqtt_url(base_url, url), repository.fallback_retry_s
        )
    return http


def _describe(exc: Exception) -> str:
    """A one-line reason for a TUF rejection, with its class (hash mismatch, expired, ...)."""
    kinds: dict[type[Exception], str] = {
        tuf_errors.LengthOrHashMismatchError: "length or hash mismatch",
        tuf_errors.ExpiredMetadataError: "metadata expired",
        tuf_errors.BadVersionNumberError: "version mismatch (rollback or mix-and-match)",
        tuf_errors.UnsignedMetadataError: "signature threshold not met",
    }
    for kind, label in kinds.items():
        if isinstance(exc, kind):
            return f"{label}: {exc}"
    return f"{type(exc).__name__}: {exc}"
