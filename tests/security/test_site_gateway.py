"""A site gateway's bridge dials the central broker as its own identity, and the central
ACL lets it speak only for its own site's devices.

Real parts: the central mosquitto runs `edgectl broker config`'s output (TLS, client
certificates, CRL, ACL); `edgectl gateway enroll` issues the bridge's certificate;
`edgectl gateway config --identity` writes the site broker, which a real mosquitto runs
and which bridges to the central one over TLS. A client on the site LAN (plain MQTT, as
a closed site LAN allows) plays a site device, and a compromised one: it forges
telemetry for a device of another site and for a device behind no gateway. The central
broker drops those (the bridge has no ACL line for them), delivers the site's own
devices' telemetry, and relays down only the announcements and repository answers of
the site's devices. After `edgectl gateway revoke` and a reload, the bridge's
certificate is refused (and ``openssl verify`` against the CRL says why).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import announce_topic, device_topic
from agent.contracts.chunks import response_topic
from tests.e2e_support import wait_until
from tests.helpers import free_port, mosquitto_binary, stop_process, wait_for_port
from tests.test_broker_acl import Client, _start_mosquitto, tls_broker

SITE = "plant-7"
DEVICES = {"a1": "north", "a2": "south", "b1": "north", "c1": "east"}
# a1 and a2 are behind this site's gateway; b1 behind another site's; c1 behind none.
SITES = {"a1": SITE, "a2": SITE, "b1": "plant-9"}

pytestmark = pytest.mark.timeout(120)


class SiteClient:
    """A plain MQTT client on the site LAN: what it receives, and QoS 1 publishes."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="site-lan-client")
        client.on_message = self._on_message
        client.connect("127.0.0.1", port, keepalive=10)
        client.loop_start()
        self.client = client

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload))

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.messages]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def edgectl(*args: str | Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "controller.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.device_attack("other_site")
def test_a_site_bridge_speaks_only_for_its_own_devices(tmp_path: Path) -> None:
    with tls_broker(tmp_path, DEVICES, SITES) as (s, central):
        out = edgectl("gateway", "enroll", SITE, "--repo", s.repo, "-o", tmp_path / "gw-id")
        assert "devices it may relay: a1, a2" in out, out
        acl = (s.broker_dir / "acl").read_text()
        block = acl.split(f"user gateway:{SITE}\n")[1].split("\n\n")[0]
        assert "devices/a1/telemetry" in block and "devices/a2/telemetry" in block
        assert "b1" not in block and "c1" not in block and "east" not in block
        assert oct((tmp_path / "gw-id" / "gateway.key").stat().st_mode & 0o777) == "0o600"
        os.kill(central.pid, signal.SIGHUP)  # as the command says: reload the broker

        site_port = free_port()
        edgectl(
            "gateway", "config", "--site", SITE, "--upstream", "http://127.0.0.1:1/",
            "--central-broker", f"localhost:{s.port}", "--identity", tmp_path / "gw-id",
            "--site-broker-port", str(site_port), "--site-broker-bind", "127.0.0.1",
            "-o", tmp_path / "gw",
        )  # fmt: skip
        site = _start_mosquitto(tmp_path / "gw" / "mosquitto.conf", tmp_path / "site.log")
        controller = Client("controller", s.port, s.ca, s.controller)
        lan: SiteClient | None = None
        try:
            wait_for_port(site_port)
            central_log = tmp_path / "mosquitto.log"
            wait_until(
                lambda: f"u'gateway:{SITE}'" in central_log.read_text(),
                30,
                "the bridge connected to the central broker as the gateway's identity",
            )
            assert controller.connect(), controller.connect_reason
            assert controller.subscribe("edgefleet/v1/fleets/+/devices/+/+") == 1

            # Down the bridge: announcements and repository answers of the site's devices.
            lan = SiteClient(site_port)
            down = [
                "edgefleet/v1/fleets/+/announce",
                "edgefleet/v1/fleets/+/devices/+/repo/response",
            ]
            lan.client.subscribe([(topic, 1) for topic in down])
            for fleet in ("east", "north", "south"):
                assert controller.publish(announce_topic(fleet), fleet.encode(), retain=True) == 0
            assert controller.publish(response_topic("north", "b1"), b"for b1") == 0
            assert controller.publish(response_topic("north", "a1"), b"for a1") == 0
            wanted = {
                announce_topic("north"),
                announce_topic("south"),
                response_topic("north", "a1"),
            }
            wait_until(lambda: wanted <= set(lan.topics()), 30, "the site's announcements")

            # Up the bridge: forged telemetry first, then the site's own devices' telemetry.
            forged = [
                device_topic("north", "b1", "telemetry"),
                device_topic("east", "c1", "status"),
            ]
            for topic in forged:
                lan.publish(topic, b'{"forged": true}')
            own = [device_topic("north", "a1", "telemetry"), device_topic("south", "a2", "events")]
            for topic in own:
                lan.publish(topic, b'{"own": true}')
            received = lambda: {t for t, _ in controller.messages}  # noqa: E731
            wait_until(lambda: set(own) <= received(), 30, "the site's devices' telemetry")
            # One more round through the same bridge session: anything forged before it
            # (published earlier on the same ordered connection) would be here by now.
            marker = device_topic("north", "a1", "status")
            lan.publish(marker, b'{"marker": true}')
            wait_until(lambda: marker in received(), 30, "the marker")
            assert not set(forged) & received(), "the bridge spoke for another site's device"
            assert announce_topic("east") not in lan.topics()
            assert response_topic("north", "b1") not in lan.topics()

            # Revoked: the ACL loses the gateway's block, the CRL gets its serial, and
            # after a reload the bridge's certificate no longer connects.
            out = edgectl("gateway", "revoke", SITE, "--repo", s.repo)
            assert f"revoked the gateway of site {SITE}" in out
            assert f"user gateway:{SITE}" not in (s.broker_dir / "acl").read_text()
            os.kill(central.pid, signal.SIGHUP)
            refused_before = central_log.read_text().count("OpenSSL Error")
            stop_process(site)  # its bridge dials again, with the revoked certificate
            with open(tmp_path / "site.log", "ab") as log:  # the config as first started
                site = subprocess.Popen(
                    [mosquitto_binary(), "-c", str(tmp_path / "gw" / "mosquitto.conf"), "-v"],
                    stdout=log,
                    stderr=log,
                )
            wait_until(
                lambda: central_log.read_text().count("OpenSSL Error") > refused_before,
                30,
                "the central broker refusing the revoked bridge certificate",
            )
            # The reason is the CRL (the same certificate connected before the revocation):
            # OpenSSL's own check says so.
            crl, cert = s.broker_dir / "crl.pem", tmp_path / "gw-id" / "gateway.crt"
            verify = subprocess.run(
                ["openssl", "verify", "-crl_check", "-CAfile", str(s.ca), "-CRLfile", str(crl),
                 str(cert)],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert "certificate revoked" in verify.stdout + verify.stderr, verify
        finally:
            if lan is not None:
                lan.close()
            controller.close()
            stop_process(site)
