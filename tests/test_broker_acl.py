"""Per-device broker identity with a real mosquitto running `edgectl broker config`'s output.

Devices authenticate with client certificates from the device CA; the ACL's pattern rules
keep each on its own topics. MQTT 5 clients, so refusals come back as reason code 135
(Not authorized) instead of silence.
"""

from __future__ import annotations

import io
import json
import os
import signal
import ssl
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.contracts import announce_topic, device_topic
from agent.contracts.chunks import request_topic, response_topic
from agent.device.config import load_config
from agent.device.enroll import enroll_from_file
from agent.telemetry.mqtt import MqttLink
from controller.identity.broker import BrokerOptions, refresh_broker_files, write_broker_config
from controller.identity.devices import EnrollOptions, add_device, revoke_device
from controller.repository.repo import init_repository
from tests.e2e_support import wait_until
from tests.helpers import free_port, mosquitto_binary, wait_for_port

NOT_AUTHORIZED = 135


@dataclass
class Identity:
    cert: Path
    key: Path


@dataclass
class Setup:
    repo: Path
    broker_dir: Path
    port: int
    ca: Path
    controller: Identity
    devices: dict[str, Identity]
    archives: dict[str, Path]


class Client:
    """A paho MQTT 5 client over TLS that records what it receives and the broker's answers."""

    def __init__(self, name: str, port: int, ca: Path, identity: Identity | None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connect_reason: ReasonCode | None = None
        self.puback: dict[int, int] = {}
        self.suback: dict[int, list[int]] = {}
        self.connected = threading.Event()
        self.done = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-{name}", protocol=mqtt.MQTTv5
        )
        context = ssl.create_default_context(cafile=str(ca))
        if identity is not None:
            context.load_cert_chain(str(identity.cert), str(identity.key))
        client.tls_set_context(context)
        client.on_connect = self._on_connect
        client.on_connect_fail = lambda *_: self.done.set()
        client.on_disconnect = lambda *_: self.done.set()
        client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self.client = client
        self.port = port

    def _on_connect(
        self, _c: object, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        self.connect_reason = reason
        if not reason.is_failure:
            self.connected.set()
        self.done.set()

    def _on_publish(
        self, _c: object, _u: object, mid: int, reason: ReasonCode, _p: Properties
    ) -> None:
        self.puback[mid] = reason.value

    def _on_subscribe(
        self, _c: object, _u: object, mid: int, reasons: list[ReasonCode], _p: Properties
    ) -> None:
        self.suback[mid] = [r.value for r in reasons]

    def connect(self) -> bool:
        """Connect; True when the broker accepted the client."""
        try:
            self.client.connect("localhost", self.port, keepalive=10)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        self.done.wait(10)
        return self.connected.is_set()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return (
            wait_until(lambda: self.puback.get(info.mid, None) is not None, 10, "PUBACK")
            and (self.puback[info.mid])
        )

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        wait_until(lambda: mid in self.suback, 10, "SUBACK")
        return self.suback[mid][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _unpack(archive: Path, folder: Path) -> Identity:
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.read_bytes())) as tar:
        for name in ("device.crt", "device.key"):
            member = tar.extractfile(name)
            assert member is not None
            (folder / name).write_bytes(member.read())
    return Identity(folder / "device.crt", folder / "device.key")


def _start_mosquitto(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    # Started as root, mosquitto drops to its own user, which cannot enter pytest's 0700
    # temporary folders; on a real broker the folder is readable by that user's group.
    if os.geteuid() == 0:
        conf.write_text("user root\n" + conf.read_text())
    with open(log, "ab") as out:
        return subprocess.Popen([mosquitto_binary(), "-c", str(conf), "-v"], stdout=out, stderr=out)


@contextmanager
def tls_broker(
    tmp_path: Path, devices: Mapping[str, str], sites: Mapping[str, str] | None = None
) -> Iterator[tuple[Setup, subprocess.Popen[bytes]]]:
    """A real mosquitto running `edgectl broker config`'s output for a new repository, with
    ``devices`` (id -> fleet) enrolled as `edgectl device add` does (behind the site
    gateway ``sites`` names, if any); stopped afterwards."""
    repo = tmp_path / "repo"
    init_repository(repo)
    port = free_port()
    broker_dir = tmp_path / "broker"
    write_broker_config(
        repo,
        broker_dir,
        BrokerOptions(hosts=("localhost", "127.0.0.1"), port=port, bind="127.0.0.1"),
    )
    options = EnrollOptions(
        repository_url="http://127.0.0.1:1/", mqtt_host="localhost", mqtt_port=port
    )
    identities: dict[str, Identity] = {}
    archives: dict[str, Path] = {}
    for device, fleet in devices.items():
        _, archive = add_device(repo, device, fleet, options, site=(sites or {}).get(device))
        archives[device] = tmp_path / f"{device}.tar"
        archives[device].write_bytes(archive)
        identities[device] = _unpack(archives[device], tmp_path / "ids" / device)
    # As `edgectl device add` does: the broker folder's ACL gets the device's lines.
    refresh_broker_files(repo)
    controller = Identity(broker_dir / "controller.crt", broker_dir / "controller.key")
    s = Setup(repo, broker_dir, port, broker_dir / "ca.crt", controller, identities, archives)
    proc = _start_mosquitto(broker_dir / "mosquitto.conf", tmp_path / "mosquitto.log")
    try:
        wait_for_port(port)
        yield s, proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Setup, subprocess.Popen[bytes]]]:
    with tls_broker(tmp_path, {"cam-1": "north", "cam-2": "north", "cam-3": "south"}) as started:
        acl = (started[0].broker_dir / "acl").read_text()
        assert "user cam-3\ntopic read edgefleet/v1/fleets/south/announce" in acl
        yield started


def test_a_device_publishes_only_as_itself_and_reads_only_its_fleet(
    setup: tuple[Setup, subprocess.Popen[bytes]],
) -> None:
    s, _ = setup
    controller = Client("controller", s.port, s.ca, s.controller)
    cam1 = Client("cam-1", s.port, s.ca, s.devices["cam-1"])
    try:
        assert controller.connect(), controller.connect_reason
        assert controller.subscribe("edgefleet/v1/fleets/+/devices/+/+") == 1
        assert cam1.connect(), cam1.connect_reason

        own = device_topic("north", "cam-1", "telemetry")
        assert cam1.publish(own, b'{"n": 1}') == 0
        wait_until(lambda: (own, b'{"n": 1}') in controller.messages, 10, "own telemetry")

        other = device_topic("north", "cam-2", "telemetry")
        assert cam1.publish(other, b'{"forged": true}') == NOT_AUTHORIZED
        assert cam1.publish(device_topic("north", "cam-2", "status"), b"{}") == NOT_AUTHORIZED
        # A device cannot announce releases either.
        assert cam1.publish(announce_topic("north"), b"{}") == NOT_AUTHORIZED

        # Its own fleet's announcement: yes; another fleet's, or other devices' topics: no.
        # mosquitto 2.0's ACL file grants every SUBSCRIBE and checks "read" on delivery,
        # so what a device may not read is never delivered to it.
        for topic in (
            announce_topic("north"),
            announce_topic("south"),
            "edgefleet/v1/fleets/+/devices/+/telemetry",
        ):
            cam1.subscribe(topic)
        assert controller.publish(announce_topic("north"), b'{"a": "north"}', retain=True) == 0
        assert controller.publish(announce_topic("south"), b'{"a": "south"}', retain=True) == 0
        cam2 = Client("cam-2", s.port, s.ca, s.devices["cam-2"])
        try:
            assert cam2.connect()
            theirs = device_topic("north", "cam-2", "telemetry")
            assert cam2.publish(theirs, b'{"cam-2": 1}') == 0
            wait_until(lambda: (theirs, b'{"cam-2": 1}') in controller.messages, 10, "cam-2")
        finally:
            cam2.close()
        wait_until(
            lambda: (announce_topic("north"), b'{"a": "north"}') in cam1.messages, 10, "announce"
        )
        time.sleep(0.5)  # what was forged or refused would have arrived by now
        assert (other, b'{"forged": true}') not in controller.messages
        assert [t for t, _ in cam1.messages] == [announce_topic("north")]
    finally:
        controller.close()
        cam1.close()


def test_a_device_cannot_publish_into_another_fleets_tree_even_as_itself(
    setup: tuple[Setup, subprocess.Popen[bytes]],
) -> None:
    """cam-3 is enrolled in south: north's tree is closed to it, its own id included
    (issue 18: the ACL bound the device id but not the fleet)."""
    s, _ = setup
    controller = Client("controller", s.port, s.ca, s.controller)
    cam3 = Client("cam-3", s.port, s.ca, s.devices["cam-3"])
    try:
        assert controller.connect(), controller.connect_reason
        assert controller.subscribe("edgefleet/v1/fleets/+/devices/+/#") == 1
        assert cam3.connect(), cam3.connect_reason
        for forged in (
            *(device_topic("north", "cam-3", kind) for kind in ("telemetry", "events", "status")),
            request_topic("north", "cam-3"),
        ):
            assert cam3.publish(forged, b'{"forged": true}') == NOT_AUTHORIZED, forged
        own = device_topic("south", "cam-3", "telemetry")
        assert cam3.publish(own, b'{"own": true}') == 0
        wait_until(lambda: (own, b'{"own": true}') in controller.messages, 10, "own telemetry")
        assert [t for t, _ in controller.messages] == [own]
        # Nor does it read its own id's answers in another fleet's tree.
        for fleet in ("north", "south"):
            cam3.subscribe(response_topic(fleet, "cam-3"))
        for fleet in ("north", "south"):
            assert controller.publish(response_topic(fleet, "cam-3"), fleet.encode()) == 0
        south = response_topic("south", "cam-3")
        wait_until(lambda: (south, b"south") in cam3.messages, 10, "its own answer")
        time.sleep(0.5)  # north's answer would have arrived by now
        assert cam3.messages == [(south, b"south")]
    finally:
        controller.close()
        cam3.close()


def test_no_certificate_and_revoked_devices_cannot_connect(
    setup: tuple[Setup, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    s, proc = setup
    anonymous = Client("anonymous", s.port, s.ca, None)
    assert not anonymous.connect()

    cam2 = Client("cam-2", s.port, s.ca, s.devices["cam-2"])
    assert cam2.connect()
    cam2.close()

    revoke_device(s.repo, "cam-2")
    refresh_broker_files(s.repo)  # as `edgectl device revoke` does
    acl = (s.broker_dir / "acl").read_text()
    assert "user cam-2" not in acl and "user cam-1" in acl
    os.kill(proc.pid, signal.SIGHUP)  # mosquitto reloads its config, ACL and CRL
    time.sleep(1)

    revoked = Client("cam-2-again", s.port, s.ca, s.devices["cam-2"])
    assert not revoked.connect(), "a revoked certificate still connects"
    still_fine = Client("cam-1", s.port, s.ca, s.devices["cam-1"])
    assert still_fine.connect()
    still_fine.close()


def test_a_device_revoked_while_connected_is_cut_off_by_the_reload(
    setup: tuple[Setup, subprocess.Popen[bytes]],
) -> None:
    """What mosquitto 2.0 does to a live connection when `edgectl device revoke` and a
    SIGHUP take the device's ACL lines away (issue 20, item 2): the connection stays
    open, but every publish of it is refused (QoS 1: PUBACK 135; QoS 0: dropped) and
    nothing is delivered to it any more, its subscriptions included; its next
    connection is refused by the CRL."""
    s, proc = setup
    controller = Client("controller", s.port, s.ca, s.controller)
    cam2 = Client("cam-2", s.port, s.ca, s.devices["cam-2"])
    try:
        assert controller.connect(), controller.connect_reason
        assert controller.subscribe("edgefleet/v1/fleets/+/devices/+/#") == 1
        assert cam2.connect(), cam2.connect_reason
        for topic in (announce_topic("north"), response_topic("north", "cam-2")):
            assert cam2.subscribe(topic) == 1
        own = device_topic("north", "cam-2", "telemetry")
        assert cam2.publish(own, b'{"before": 1}') == 0
        assert controller.publish(announce_topic("north"), b'{"a": 1}') == 0
        wait_until(lambda: len(cam2.messages) == 1, 10, "the announcement before")
        wait_until(lambda: (own, b'{"before": 1}') in controller.messages, 10, "telemetry")

        revoke_device(s.repo, "cam-2")
        refresh_broker_files(s.repo)  # as `edgectl device revoke` does
        os.kill(proc.pid, signal.SIGHUP)
        log = s.broker_dir.parent / "mosquitto.log"
        wait_until(lambda: "Reloading config" in log.read_text(), 10, "the broker's reload")

        # Still connected: the broker answers it, and only with refusals. Each QoS 1
        # answer below is also a barrier: mosquitto handles a connection's packets in
        # order and writes to a socket in order, so what it would have forwarded or
        # delivered before an acknowledgement arrives before that acknowledgement.
        cam2.client.publish(own, b'{"after": "qos0"}', qos=0)
        assert cam2.publish(own, b'{"after": 1}') == NOT_AUTHORIZED
        status = device_topic("north", "cam-2", "status")
        assert cam2.publish(status, b'{"online": true}') == NOT_AUTHORIZED
        assert cam2.client.is_connected()
        # Nothing reaches it any more: neither its fleet's announcement nor its answers.
        assert controller.publish(announce_topic("north"), b'{"a": 2}') == 0
        assert controller.publish(response_topic("north", "cam-2"), b"answer") == 0
        assert cam2.publish(own, b'{"after": 2}') == NOT_AUTHORIZED
        sent_by_cam2 = [p for t, p in controller.messages if "/devices/cam-2/" in t]
        assert sent_by_cam2 == [b'{"before": 1}']
        assert cam2.messages == [(announce_topic("north"), b'{"a": 1}')]
        assert cam2.client.is_connected(), "mosquitto closed the revoked device's connection"
        assert "Denied PUBLISH from test-cam-2" in log.read_text()

        again = Client("cam-2-again", s.port, s.ca, s.devices["cam-2"])
        assert not again.connect(), "a revoked certificate still connects"
    finally:
        controller.close()
        cam2.close()


def test_the_enrolled_agent_connects_over_tls_with_its_credential(
    setup: tuple[Setup, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The real agent link, configured by `edge-agent enroll`, the key as a systemd credential."""
    s, _ = setup
    etc = tmp_path / "etc-edge-agent"
    enroll_from_file(s.archives["cam-3"], etc)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (etc / "device.key").rename(credentials / "device.key")  # only the credential remains
    config = load_config(etc / "agent.toml", environ={})
    assert config.mqtt.tls
    controller = Client("controller", s.port, s.ca, s.controller)
    old = os.environ.get("CREDENTIALS_DIRECTORY")
    os.environ["CREDENTIALS_DIRECTORY"] = str(credentials)
    try:
        link = MqttLink(config, lambda _v: None, lambda: {"m": {"version": "1.0.0"}})
    finally:
        if old is None:
            del os.environ["CREDENTIALS_DIRECTORY"]
        else:
            os.environ["CREDENTIALS_DIRECTORY"] = old
    try:
        assert controller.connect()
        status = device_topic("south", "cam-3", "status")
        assert controller.subscribe(status) == 1
        link.start()
        wait_until(lambda: link.is_connected, 15, "the agent to connect over TLS")

        def online() -> bool:
            return any(
                t == status and json.loads(p).get("online") is True for t, p in controller.messages
            )

        wait_until(online, 10, "the agent's retained status")
    finally:
        link.stop()
        controller.close()
