"""The contracts the agent and the controller share, owned by the agent. Pure: it imports
nothing of ours but agent.base (the error tree); the controller imports it.

The controller imports this module to produce exactly what the agent accepts; the agent
never imports the controller. Everything here is pure: names, target paths, MQTT topics,
the bundle manifest, the fleet's desired state and the payloads of announcements and
status messages.

Invariants:
- Fleet, model and device names are ASCII, start with a letter or digit, and hold no
  ``/`` and no MQTT wildcard, so they are safe in topics, TUF target paths and file names.
- Versions are semantic versions (semver 2.0) and order as semver says.
- Every JSON document carries a ``schema`` field ``edgefleet.<kind>/<major>``; a reader
  refuses a major version it does not know.
- Parsers raise ``ValueError`` subclasses naming the field, what was expected and what
  was found: ``BundleError`` and ``DesiredStateError`` (from ``agent.base.errors``) for
  manifests and desired state, ``PayloadError`` (``agent.contracts.messages``) for
  MQTT payloads, ``InvalidNameError`` for names and versions.

The contracts live in submodules, and this package re-exports every public name, so
callers import from ``agent.contracts``:
- ``names``: names, versions, TUF target paths and roles, MQTT topics;
- ``bundle``: tensor datatypes and the bundle manifest;
- ``desired``: a fleet's desired state and rollout bucketing;
- ``messages``: announcement, status, telemetry and event payloads and their parsers.

Two contracts are imported from their own modules, not re-exported here, because their
names only make sense next to their module's: ``agent.contracts.chunks`` (the repository
over MQTT: topics, chunk requests and answers) and ``agent.contracts.enrollment`` (the
``enroll.tar`` archive the controller writes and ``edge-agent enroll`` reads).
"""

from __future__ import annotations

from agent.contracts.bundle import (
    BUNDLE_GOLDEN,
    BUNDLE_MANIFEST,
    BUNDLE_MODEL,
    BUNDLE_OPTIONAL_MEMBERS,
    BUNDLE_REQUIRED_MEMBERS,
    GOLDEN_INPUT_PREFIX,
    GOLDEN_OUTPUT_PREFIX,
    MANIFEST_SCHEMA,
    MANIFEST_SCHEMA_V1,
    MANIFEST_SCHEMA_V2,
    MANIFEST_SCHEMAS,
    NUMPY_TO_OIP,
    OIP_TO_NUMPY,
    ORT_TO_OIP,
    GoldenSpec,
    Manifest,
    TensorSpec,
    parse_manifest,
)
from agent.contracts.desired import (
    DESIRED_SCHEMA,
    DesiredState,
    ModelRelease,
    ProbationPolicy,
    ShadowPolicy,
    check_shadow_policy,
    device_bucket,
    device_buckets,
    parse_desired_state,
    parse_shadow_policy,
    resolve_release,
)
from agent.contracts.messages import (
    ANNOUNCE_SCHEMA,
    EVENT_KIND_BY_PHASE,
    EVENT_KINDS,
    EVENT_SCHEMA,
    MAX_COUNT,
    MAX_DETAIL,
    MAX_SEQ,
    MAX_TEXT,
    SHADOW_STATES,
    STATUS_SCHEMA,
    TELEMETRY_SCHEMA,
    WAITING_CODES,
    Event,
    Heartbeat,
    ModelFigures,
    PayloadError,
    ShadowReport,
    Status,
    SystemFigures,
    Waiting,
    announce_payload,
    device_topic_filter,
    event_payload,
    parse_device_topic,
    parse_drift,
    parse_event,
    parse_shadow_report,
    parse_status,
    parse_telemetry,
    parse_waiting,
    status_payload,
    telemetry_payload,
    waiting_doc,
)
from agent.contracts.names import (
    BUNDLE_PATHS,
    ROLLOUT_PATHS,
    ROLLOUT_ROLE,
    TOPIC_ROOT,
    InvalidNameError,
    announce_topic,
    bundle_target_path,
    check_name,
    check_version,
    desired_target_path,
    device_topic,
    version_key,
)

__all__ = [
    "ANNOUNCE_SCHEMA",
    "BUNDLE_GOLDEN",
    "BUNDLE_MANIFEST",
    "BUNDLE_MODEL",
    "BUNDLE_OPTIONAL_MEMBERS",
    "BUNDLE_PATHS",
    "BUNDLE_REQUIRED_MEMBERS",
    "DESIRED_SCHEMA",
    "EVENT_KINDS",
    "EVENT_KIND_BY_PHASE",
    "EVENT_SCHEMA",
    "GOLDEN_INPUT_PREFIX",
    "GOLDEN_OUTPUT_PREFIX",
    "MANIFEST_SCHEMA",
    "MANIFEST_SCHEMAS",
    "MANIFEST_SCHEMA_V1",
    "MANIFEST_SCHEMA_V2",
    "MAX_COUNT",
    "MAX_DETAIL",
    "MAX_SEQ",
    "MAX_TEXT",
    "NUMPY_TO_OIP",
    "OIP_TO_NUMPY",
    "ORT_TO_OIP",
    "ROLLOUT_PATHS",
    "ROLLOUT_ROLE",
    "SHADOW_STATES",
    "STATUS_SCHEMA",
    "TELEMETRY_SCHEMA",
    "TOPIC_ROOT",
    "WAITING_CODES",
    "DesiredState",
    "Event",
    "GoldenSpec",
    "Heartbeat",
    "InvalidNameError",
    "Manifest",
    "ModelFigures",
    "ModelRelease",
    "PayloadError",
    "ProbationPolicy",
    "ShadowPolicy",
    "ShadowReport",
    "Status",
    "SystemFigures",
    "TensorSpec",
    "Waiting",
    "announce_payload",
    "announce_topic",
    "bundle_target_path",
    "check_name",
    "check_shadow_policy",
    "check_version",
    "desired_target_path",
    "device_bucket",
    "device_buckets",
    "device_topic",
    "device_topic_filter",
    "event_payload",
    "parse_desired_state",
    "parse_device_topic",
    "parse_drift",
    "parse_event",
    "parse_manifest",
    "parse_shadow_policy",
    "parse_shadow_report",
    "parse_status",
    "parse_telemetry",
    "parse_waiting",
    "resolve_release",
    "status_payload",
    "telemetry_payload",
    "version_key",
    "waiting_doc",
]
