"""Pure tests of the shared contracts: names, versions, manifest, desired state, buckets."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from agent.base.errors import BundleError, DesiredStateError
from agent.contracts import (
    TOPIC_ROOT,
    DesiredState,
    Event,
    InvalidNameError,
    ModelRelease,
    PayloadError,
    ShadowPolicy,
    announce_topic,
    bundle_target_path,
    check_name,
    check_version,
    desired_target_path,
    device_bucket,
    device_topic,
    event_payload,
    parse_desired_state,
    parse_event,
    parse_manifest,
    resolve_release,
    version_key,
)
from agent.contracts.chunks import parse_request_topic


@pytest.mark.parametrize("name", ["lab", "fleet-1", "a.b_c", "X9"])
def test_valid_names(name: str) -> None:
    assert check_name("fleet", name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a+b", "a#", "é", "-x", "x" * 65])
def test_invalid_names_say_the_rule(name: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid fleet name"):
        check_name("fleet", name)


def test_semver_ordering() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-beta",
        "1.0.0-rc.1",
        "1.0.0",
        "1.2.0",
        "10.0.0",
    ]
    assert sorted(reversed(ordered), key=version_key) == ordered
    with pytest.raises(InvalidNameError, match="semantic version"):
        check_version("1.0")


# What a pattern anchored with ``$`` and applied with ``match`` lets through (``$`` also
# matches before a final newline), and whitespace or control characters around a name.
SUFFIXES = ["\n", "\r", "\r\n", " ", "\t", "\x00", "\n\n", "\u2028"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_names_and_versions_with_a_trailing_newline_or_space_are_refused(suffix: str) -> None:
    for kind in ("fleet", "model", "device"):
        with pytest.raises(InvalidNameError, match=f"invalid {kind} name"):
            check_name(kind, "dev1" + suffix)
        with pytest.raises(InvalidNameError):
            check_name(kind, suffix + "dev1")
    for version in ("1.0.0", "1.0.0-rc.1", "1.0.0+build.7"):
        with pytest.raises(InvalidNameError, match="invalid version"):
            check_version(version + suffix)
        with pytest.raises(InvalidNameError, match="invalid version"):
            version_key(version + suffix)
    # What is built from names refuses them too (topics, target paths).
    for build in (
        lambda: bundle_target_path("m" + suffix, "1.0.0"),
        lambda: bundle_target_path("m", "1.0.0" + suffix),
        lambda: desired_target_path("lab" + suffix),
        lambda: announce_topic("lab" + suffix),
        lambda: device_topic("lab", "dev1" + suffix, "events"),
    ):
        with pytest.raises(InvalidNameError):
            build()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_documents_naming_a_model_or_device_with_a_trailing_newline_are_refused(
    suffix: str,
) -> None:
    for change in (
        lambda d: d.update(name="m" + suffix),
        lambda d: d.update(version="1.0.0" + suffix),
    ):
        doc = _manifest_doc()
        change(doc)
        with pytest.raises(BundleError, match="invalid"):
            parse_manifest(json.dumps(doc).encode())
    state = json.loads(_desired().to_json_bytes())
    state["models"]["m" + suffix] = state["models"].pop("m")
    with pytest.raises(DesiredStateError, match="invalid model name"):
        parse_desired_state(json.dumps(state).encode(), "lab")
    event = Event(device="dev1", fleet="lab", stream="s", seq=1, at="", kind="agent_started")
    for bad in (
        replace(event, device="dev1" + suffix),
        replace(event, fleet="lab" + suffix),
        replace(event, kind="agent_started" + suffix),
    ):
        with pytest.raises(PayloadError):
            parse_event(event_payload(bad))
    with pytest.raises(ValueError, match="invalid device name"):
        parse_request_topic(f"{TOPIC_ROOT}/fleets/lab/devices/dev1{suffix}/repo/request")


def test_versions_are_ascii() -> None:
    """``\\d`` matches any Unicode digit: a version of Arabic-Indic digits is no semver."""
    for version in ("1\u0661.0.0", "1.1\u0662.0", "1.0.0-rc.1\u0663", "1.0.1\uff13"):
        with pytest.raises(InvalidNameError, match="invalid version"):
            check_version(version)


def test_target_paths() -> None:
    assert bundle_target_path("digits", "1.2.3") == "bundles/digits/1.2.3.bundle"
    assert desired_target_path("lab") == "fleets/lab/desired.json"
    with pytest.raises(InvalidNameError):
        bundle_target_path("../x", "1.0.0")


def _manifest_doc() -> dict[str, object]:
    return {
        "schema": "edgefleet.manifest/1",
        "name": "m",
        "version": "1.0.0",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
        "opset": 17,
        "min_ort_version": "1.17",
        "golden": {"cases": 2, "rtol": 1e-3, "atol": 1e-4},
        "members": {
            "model.onnx": {"size": 10, "sha256": "0" * 64},
            "golden.npz": {"size": 10, "sha256": "1" * 64},
        },
    }


def test_manifest_round_trip() -> None:
    manifest = parse_manifest(json.dumps(_manifest_doc()).encode())
    assert manifest.inputs[0].shape == (-1, 4)
    assert parse_manifest(manifest.to_json_bytes()) == manifest


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("inputs"), "missing field 'inputs'"),
        (lambda d: d.update(schema="edgefleet.manifest/9"), "schema expected"),
        (lambda d: d.update(version="one"), "invalid version"),
        (lambda d: d.update(opset="17"), "'opset' expected int, got str"),
        (
            lambda d: d["members"].update({"evil.sh": {"size": 1, "sha256": "2" * 64}}),
            "unexpected member",
        ),
        (lambda d: d["inputs"][0].update(datatype="FLOAT"), "unknown datatype"),
    ],
)
def test_manifest_errors_name_the_field(change, message: str) -> None:  # type: ignore[no-untyped-def]
    doc = _manifest_doc()
    change(doc)
    with pytest.raises(BundleError, match=message):
        parse_manifest(json.dumps(doc).encode())


def test_manifest_not_json() -> None:
    with pytest.raises(BundleError, match="not valid JSON"):
        parse_manifest(b"\xff{")


def _desired(**release: object) -> DesiredState:
    base = dict(version="2.0.0", target="bundles/m/2.0.0.bundle", rollout_id="r1")
    base.update(release)
    return DesiredState(fleet="lab", models={"m": ModelRelease(**base)})  # type: ignore[arg-type]


def test_desired_state_round_trip() -> None:
    state = _desired(previous="1.0.0", previous_target="bundles/m/1.0.0.bundle", canaries=("d1",))
    assert parse_desired_state(state.to_json_bytes(), "lab") == state


def test_desired_state_for_another_fleet_is_refused() -> None:
    with pytest.raises(DesiredStateError, match="fleet expected 'other'"):
        parse_desired_state(_desired().to_json_bytes(), "other")


def test_desired_state_target_must_match_version() -> None:
    raw = _desired(target="bundles/m/9.9.9.bundle").to_json_bytes()
    with pytest.raises(
        DesiredStateError, match=re.escape("target expected 'bundles/m/2.0.0.bundle'")
    ):
        parse_desired_state(raw, "lab")


def test_desired_state_carries_the_shadow_policy_and_an_old_one_gets_the_defaults() -> None:
    policy = ShadowPolicy(samples=7, sample_rate=0.5, min_cosine=0.99, max_abs_diff=None)
    state = _desired(shadow=policy)
    assert parse_desired_state(state.to_json_bytes(), "lab").models["m"].shadow == policy
    off = _desired(shadow=ShadowPolicy(enabled=False))
    assert not parse_desired_state(off.to_json_bytes(), "lab").models["m"].shadow.enabled
    doc = json.loads(_desired().to_json_bytes())
    del doc["models"]["m"]["shadow"]  # as a controller before shadows wrote it
    assert parse_desired_state(json.dumps(doc).encode(), "lab").models["m"].shadow == ShadowPolicy()


@pytest.mark.parametrize(
    ("shadow", "message"),
    [
        ([], "shadow expected an object, got list"),
        ({"samples": 0}, "samples expected at least 1"),
        ({"samples": 2.5}, "samples expected an integer"),
        ({"sample_rate": 0}, "sample_rate expected more than 0"),
        ({"sample_rate": 1.5}, "sample_rate expected 0..1, got 1.5"),
        ({"min_agreement": -0.1}, "min_agreement expected 0..1"),
        ({"max_latency_ratio": 0}, "max_latency_ratio expected more than 0"),
        ({"max_duration_s": -1}, "max_duration_s expected >= 0"),
        ({"enabled": "yes"}, "enabled expected true or false"),
        ({"min_cosine": 2}, "min_cosine expected -1..1"),
        ({"surprise": 1}, "shadow fields this agent does not know: ['surprise']"),
    ],
)
def test_a_bad_shadow_policy_is_refused_naming_the_field(shadow: object, message: str) -> None:
    doc = json.loads(_desired().to_json_bytes())
    doc["models"]["m"]["shadow"] = shadow
    with pytest.raises(DesiredStateError, match=re.escape(message)) as refused:
        parse_desired_state(json.dumps(doc).encode(), "lab")
    assert "models['m']" in str(refused.value)


def test_bucket_is_stable_and_roughly_uniform() -> None:
    assert device_bucket("r1", "dev-1") == device_bucket("r1", "dev-1")
    buckets = [device_bucket("r1", f"dev-{i}") for i in range(20_000)]
    below_10 = sum(b < 10 for b in buckets) / len(buckets)
    assert 0.09 < below_10 < 0.11
    assert all(0 <= b < 100 for b in buckets)


def test_resolve_release_percent_canaries_and_previous() -> None:
    rel = ModelRelease(
        version="2.0.0",
        target="bundles/m/2.0.0.bundle",
        rollout_id="r1",
        percent=0.0,
        previous="1.0.0",
        previous_target="bundles/m/1.0.0.bundle",
        canaries=("canary",),
    )
    assert resolve_release(rel, "canary") == ("2.0.0", "bundles/m/2.0.0.bundle")
    assert resolve_release(rel, "other") == ("1.0.0", "bundles/m/1.0.0.bundle")
    everyone = ModelRelease(version="2.0.0", target="bundles/m/2.0.0.bundle", rollout_id="r1")
    assert resolve_release(everyone, "other") == ("2.0.0", "bundles/m/2.0.0.bundle")
    nobody = ModelRelease(
        version="2.0.0", target="bundles/m/2.0.0.bundle", rollout_id="r", percent=0
    )
    assert resolve_release(nobody, "other") is None
