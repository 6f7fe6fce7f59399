"""Install records exactly as older agents wrote them: bytes produced by running that
code (issue #18, defect 10), for the migration tests.

- ``edgefleet.journal/1``, the journal since 3c52cd2 ("Agent: installs go through the
  journaled state machine"): ``JournalRecord.to_json_bytes`` of ``agent/journal.py`` at
  that commit, for a model that committed 1.0.0 and then met 2.0.0 in each phase;
- before it (e3fac1e up to 3c52cd2) there was no journal: ``agent/store.py`` kept
  ``<model>/active.json`` and ``<model>/failed.json`` (``ModelStore.write_active`` and
  ``write_failed`` at e3fac1e).
"""

from __future__ import annotations

V1_WRITTEN_BY_3C52CD2 = {
    "committed": b'{"baseline_p99_s": null, "baseline_samples": 0, "deadline_at": null, "entered_at": 1780000040.0, "interrupted": 0, "interrupted_version": "1.0.0", "model": "digits", "phase": "committed", "previous": null, "probation": {"duration_s": 30.0, "max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 10}, "probation_started_at": 1780000002.0, "reason": "probation passed: 12 requests, 0 errors", "restarts": 0, "rollout_id": "r-1", "schema": "edgefleet.journal/1", "version": "1.0.0"}',  # noqa: E501
    "active": b'{"baseline_p99_s": 0.004, "baseline_samples": 250, "deadline_at": 1780000164.0, "entered_at": 1780000104.0, "interrupted": 0, "interrupted_version": "2.0.0", "model": "digits", "phase": "active", "previous": "1.0.0", "probation": {"duration_s": 60.0, "max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 0}, "probation_started_at": 1780000104.0, "reason": "", "restarts": 1, "rollout_id": "r-2", "schema": "edgefleet.journal/1", "version": "2.0.0"}',  # noqa: E501
    "rolled_back": b'{"baseline_p99_s": 0.004, "baseline_samples": 250, "deadline_at": null, "entered_at": 1780000120.0, "interrupted": 0, "interrupted_version": "2.0.0", "model": "digits", "phase": "rolled_back", "previous": "1.0.0", "probation": {"duration_s": 60.0, "max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 0}, "probation_started_at": 1780000104.0, "reason": "error rate 0.5 over 0.05", "restarts": 1, "rollout_id": "r-2", "schema": "edgefleet.journal/1", "version": "2.0.0"}',  # noqa: E501
    "downloading": b'{"baseline_p99_s": null, "baseline_samples": 0, "deadline_at": 1780000700.0, "entered_at": 1780000100.0, "interrupted": 0, "interrupted_version": "2.0.0", "model": "digits", "phase": "downloading", "previous": "1.0.0", "probation": {"duration_s": 60.0, "max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 0}, "probation_started_at": null, "reason": "", "restarts": 0, "rollout_id": "r-2", "schema": "edgefleet.journal/1", "version": "2.0.0"}',  # noqa: E501
    "failed": b'{"baseline_p99_s": null, "baseline_samples": 0, "deadline_at": null, "entered_at": 1780000102.0, "interrupted": 0, "interrupted_version": "2.0.0", "model": "digits", "phase": "failed", "previous": "1.0.0", "probation": {"duration_s": 60.0, "max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 0}, "probation_started_at": null, "reason": "golden vectors differ", "restarts": 0, "rollout_id": "r-2", "schema": "edgefleet.journal/1", "version": "2.0.0"}',  # noqa: E501
    "idle": b'{"baseline_p99_s": null, "baseline_samples": 0, "deadline_at": null, "entered_at": 1780000200.0, "interrupted": 1, "interrupted_version": "2.0.0", "model": "digits", "phase": "idle", "previous": null, "probation": {"duration_s": 60.0, "max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 0}, "probation_started_at": null, "reason": "downloading abandoned: the agent restarted", "restarts": 0, "rollout_id": "r-2", "schema": "edgefleet.journal/1", "version": "1.0.0"}',  # noqa: E501
}
# phase -> (the version it serves, what a restart loads, its fallback)
V1_SERVES = {
    "committed": ("1.0.0", "1.0.0", None),
    "active": ("2.0.0", "2.0.0", "1.0.0"),
    "rolled_back": ("1.0.0", "1.0.0", None),
    "downloading": ("1.0.0", "1.0.0", None),
    "failed": ("1.0.0", "1.0.0", None),
    "idle": ("1.0.0", "1.0.0", None),
}
POINTERS_WRITTEN_BY_E3FAC1E = {
    "active": b'{"version": "1.1.0", "previous": "1.0.0"}',
    "active_first": b'{"version": "0.3.0", "previous": null}',
    "failed": b'{"version": "2.0.0", "reason": "golden vectors differ: max abs error 0.31 > atol 0.0001"}',  # noqa: E501
}
# A /2 bundle (zstd members) refused by the agent of 3ada5d04 (the system test's previous
# release, which reads manifest /1 only): its unpack's BundleError, journaled as failed by
# running that commit's ``begin_install``, ``transition`` and ``to_json_bytes``.
V1_FORMAT_REFUSED_BY_3ADA5D0 = b'{"baseline_p99_s": null, "baseline_samples": 0, "deadline_at": null, "entered_at": 1780000101.5, "interrupted": 0, "interrupted_version": "2.0.0", "model": "linear", "phase": "failed", "previous": "1.0.0", "probation": {"duration_s": 1.0, "max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 0}, "probation_started_at": null, "reason": "manifest.json: schema expected \'edgefleet.manifest/1\', got \'edgefleet.manifest/2\'", "restarts": 0, "rollout_id": "r-2", "schema": "edgefleet.journal/1", "version": "2.0.0"}'  # noqa: E501
