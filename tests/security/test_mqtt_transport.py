"""The repository over MQTT with a private mosquitto: the fetcher against the controller's
responder, then the whole update path of a device through ``edgectl serve``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadError, DownloadHTTPError

from agent.device.config import MqttConfig
from agent.update.fetcher import TransferLimits
from agent.update.journal import Phase
from agent.update.mqtt_fetcher import URL_PREFIX, MqttFetcher
from controller.base.fsio import repo_lock
from controller.repository.ceremony import rotate
from controller.repository.repo import Repository
from controller.serve.mqtt_repo import RepoResponder, ResponderLimits
from tests.e2e_support import Proc, paused, start_serve, tamper_stored_bundle
from tests.helpers import Broker, free_port
from tests.security.conftest import MODEL, Device, quick_repository, release
from tests.security.simulator import HostileMirror

LIMITS = TransferLimits(connect_timeout_s=5.0, read_timeout_s=1.0, deadline_s=20.0)


@pytest.fixture
def responder(repo: Repository, broker: Broker) -> Iterator[RepoResponder]:
    r = RepoResponder(
        repo.path, broker.host, broker.port, "test-responder", limits=ResponderLimits(2, 8, 2)
    )
    r.start()
    yield r
    r.stop()


def _fetcher(broker: Broker, **kw: int) -> MqttFetcher:
    config = MqttConfig(host=broker.host, port=broker.port)
    return MqttFetcher(config, "lab", "dev-1", LIMITS, **kw)


def test_fetcher_reads_chunks_in_order_resumes_and_maps_not_found(
    repo: Repository, broker: Broker, responder: RepoResponder, bundles: dict[str, Path]
) -> None:
    release(repo, bundles["1.0.0"])
    (stored,) = (repo.targets_dir / "bundles" / MODEL).glob("*.bundle")
    data = stored.read_bytes()
    url = URL_PREFIX + str(stored.relative_to(repo.path))
    # Small chunks, a window of 4, and a responder allowing 2 per device: it answers
    # "busy" (503) to some requests, which the fetcher asks again.
    fetcher = _fetcher(broker, chunk_bytes=1000, window=4)
    try:
        assert b"".join(fetcher.fetch(url)) == data
        start, body = fetcher.fetch_from(url, 2500)
        assert start == 2500 and b"".join(body) == data[2500:]
        with pytest.raises(DownloadHTTPError) as missing:
            list(fetcher.fetch(URL_PREFIX + "metadata/99.root.json"))
        assert missing.value.status_code == 404
        for hostile in ("metadata/../keys/root.pem", "targets/../edgectl.json"):
            with pytest.raises(DownloadHTTPError):  # never served: not found
                list(fetcher.fetch(URL_PREFIX + hostile))
    finally:
        fetcher.close()
    assert len(data) > 4000 and responder.answered > len(data) // 1000


def test_fetcher_without_a_responder_hits_its_limits(broker: Broker) -> None:
    fetcher = _fetcher(broker)
    try:
        with pytest.raises(DownloadError, match="no answer over MQTT"):
            list(fetcher.fetch(URL_PREFIX + "metadata/timestamp.json"))
    finally:
        fetcher.close()


def test_fetcher_with_no_broker_is_a_download_error() -> None:
    fetcher = MqttFetcher(MqttConfig(host="127.0.0.1", port=free_port()), "lab", "dev-1", LIMITS)
    with pytest.raises(DownloadError, match="cannot reach MQTT broker"):
        list(fetcher.fetch(URL_PREFIX + "metadata/timestamp.json"))


@pytest.fixture
def served(tmp_path: Path, repo: Repository, broker: Broker) -> Iterator[Proc]:
    proc, _url = start_serve(repo.path, broker.address, tmp_path / "serve.log")
    yield proc
    proc.stop()


def _mqtt_device(tmp: Path, repo: Repository, broker: Broker, **repository: object) -> Device:
    return Device(
        tmp,
        repo.metadata_dir / "1.root.json",
        quick_repository(repository.pop("url", ""), transport="mqtt", **repository),  # type: ignore[arg-type]
        MqttConfig(host=broker.host, port=broker.port),
    )


def test_the_whole_update_path_over_mqtt(
    tmp_path: Path,
    repo: Repository,
    broker: Broker,
    served: Proc,
    bundles: dict[str, Path],
) -> None:
    """Install, update, follow a key rotation and refuse tampered bytes, all through the
    broker: the device has no HTTP URL at all."""
    release(repo, bundles["1.0.0"])
    device = _mqtt_device(tmp_path / "dev", repo, broker, mqtt_chunk_bytes=4096)
    try:
        assert device.check().installed == {MODEL: "1.0.0"}
        release(repo, bundles["2.0.0"])
        with repo_lock(repo.path):
            rotate(repo, "timestamp")  # a new root version, fetched over MQTT too
        assert device.check().installed == {MODEL: "2.0.0"}
        assert device.trusted_version("root") == 2

        with paused(served):  # tamper while nobody reads
            release(repo, bundles["3.0.0"])
            tamper_stored_bundle(repo.path, MODEL, "3.0.0")
        result = device.check()
        assert "length or hash mismatch" in result.refused[MODEL]
        assert device.phase() == (Phase.IDLE, "2.0.0")  # put back: fetched again next time
        assert device.serving() == "2.0.0"
    finally:
        device.close()
    assert "answering repository requests" in served.text()


def test_auto_falls_back_to_mqtt_when_http_is_unreachable(
    tmp_path: Path,
    repo: Repository,
    broker: Broker,
    served: Proc,
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    release(repo, bundles["1.0.0"])
    dead = f"http://127.0.0.1:{free_port()}"
    device = Device(
        tmp_path / "dev",
        repo.metadata_dir / "1.root.json",
        quick_repository(dead, transport="auto"),
        MqttConfig(host=broker.host, port=broker.port),
    )
    try:
        assert device.check().installed == {MODEL: "1.0.0"}
    finally:
        device.close()
    assert "falling back to MQTT" in caplog.text


def test_auto_with_mirrors_tries_mqtt_last_after_every_http_source(
    tmp_path: Path,
    repo: Repository,
    broker: Broker,
    served: Proc,
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``auto`` with mirrors (issue 24): a mirror altering the bundle, then an unreachable
    url, then MQTT, the last resort: the genuine bundle arrives over the broker."""
    release(repo, bundles["1.0.0"])
    dead = f"http://127.0.0.1:{free_port()}"
    mirror = HostileMirror(repo.path)
    mirror.tamper_prefix = "/targets/bundles/"
    device = Device(
        tmp_path / "dev",
        repo.metadata_dir / "1.root.json",
        quick_repository(dead, transport="auto", mirrors=(mirror.url,)),
        MqttConfig(host=broker.host, port=broker.port),
    )
    try:
        result = device.check()
        assert result.installed == {MODEL: "1.0.0"}, result
        (failure,) = result.source_failures
        assert failure.startswith(mirror.url) and "length or hash mismatch" in failure
        assert device.serving() == "1.0.0"
    finally:
        device.close()
        mirror.close()
    assert "falling back to MQTT" in caplog.text


def test_a_delta_moves_over_mqtt_too(
    tmp_path: Path,
    repo: Repository,
    broker: Broker,
    responder: RepoResponder,
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The chunk transport carries a delta like any target; the device rebuilds 2.0.0 from
    its installed 1.0.0 and never asks for the full bundle."""
    release(repo, bundles["1.0.0"])
    device = _mqtt_device(tmp_path / "dev", repo, broker, mqtt_chunk_bytes=4096)
    try:
        assert device.check().installed == {MODEL: "1.0.0"}
        release(repo, bundles["2.0.0"], delta_from=2)
        with caplog.at_level(logging.INFO, logger="agent.update.updater"):
            assert device.check().installed == {MODEL: "2.0.0"}
        assert f"rebuilt from bundles/{MODEL}/2.0.0.from-1.0.0.delta" in caplog.text
        assert f"from bundles/{MODEL}/2.0.0.bundle" not in caplog.text
        assert device.serving() == "2.0.0"
    finally:
        device.close()


def test_responders_of_several_serve_on_a_shared_group_answer_each_request_once(
    repo: Repository, broker: Broker, bundles: dict[str, Path]
) -> None:
    """Several `edgectl serve` (controllers that fail over, issue 24) share the requests."""
    release(repo, bundles["1.0.0"])
    responders = [
        RepoResponder(repo.path, broker.host, broker.port, f"r-{i}", shared_group="ctl")
        for i in range(3)
    ]
    for r in responders:
        r.start()
    fetcher = _fetcher(broker, chunk_bytes=1000, window=4)
    try:
        for r in responders:
            assert r.subscribed.wait(10)
        data = b"".join(fetcher.fetch(URL_PREFIX + "metadata/timestamp.json"))
        assert data == (repo.path / "metadata" / "timestamp.json").read_bytes()
        chunks = -(-len(data) // 1000)
        assert sum(r.answered for r in responders) == chunks
    finally:
        fetcher.close()
        for r in responders:
            r.stop()
