"""How ingestion's MQTT client reads its socket (``controller.fleet.ingest._IngestClient``):
one read takes what the socket holds, on TLS every record of it, up to ``CHUNK``.

A real TLS connection on loopback (a certificate made here); no broker: the bytes read
are checked, not parsed (``test_ingest_hot_path`` holds ``read_packets`` against paho,
and the ingest tests run the client against a real mosquitto, in plain MQTT and TLS).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import socket
import ssl
import struct
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from controller.fleet.ingest import _IngestClient
from tests.e2e_support import wait_until

RECORD = 8192  # the server sends this many bytes per write: one TLS record each
RECORDS = 40  # 320 KiB in all, less than CHUNK


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def _waiting_bytes(sock: socket.socket) -> int:
    """Bytes the kernel holds for ``sock`` to read (encrypted ones, on TLS)."""
    got = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", got)[0])


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """(client, server) ends of a TLS connection on loopback, the client non-blocking."""
    cert, key = _certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(cert)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[ssl.SSLSocket] = []

    def accept() -> None:
        conn, _ = listener.accept()
        accepted.append(server_context.wrap_socket(conn, server_side=True))

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # room for all RECORDS
    raw.settimeout(10)
    raw.connect(listener.getsockname())
    client = client_context.wrap_socket(raw, server_hostname="127.0.0.1")
    acceptor.join(timeout=10)
    listener.close()
    assert accepted, "the TLS handshake did not complete"
    client.setblocking(False)
    try:
        yield client, accepted[0]
    finally:
        client.close()
        accepted[0].close()


def _client_on(sock: socket.socket) -> _IngestClient:
    client = _IngestClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5)
    client._sock = sock  # what paho's connect sets; reading needs nothing else
    return client


def test_one_read_takes_every_tls_record_the_socket_holds(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client_end, server_end = tls_pair
    sent = bytes(range(256)) * (RECORD * RECORDS // 256)
    for at in range(0, len(sent), RECORD):
        server_end.sendall(sent[at : at + RECORD])
    # All of it in the client's kernel buffer (each record adds its header and tag).
    wait_until(
        lambda: _waiting_bytes(client_end) >= len(sent) + RECORDS * 21, 30, "every record sent"
    )
    client = _client_on(client_end)
    assert len(sent) < client.CHUNK
    # A TLS socket's recv returns one record: a read of one recv would take 8 KiB.
    assert client._recv_available() == sent
    with pytest.raises(BlockingIOError):  # nothing left
        client._recv_available()


def test_a_tls_read_stops_at_chunk_and_leaves_the_rest(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client_end, server_end = tls_pair
    client = _client_on(client_end)
    sent = b"x" * (client.CHUNK + 3 * RECORD)
    server_end.sendall(sent)  # records of 16 KiB; all fit in the client's buffer
    wait_until(lambda: _waiting_bytes(client_end) >= len(sent), 30, "every record sent")
    first = client._recv_available()
    assert first == sent[: client.CHUNK]  # more was waiting: the read stopped at CHUNK
    assert client._recv_available() == sent[client.CHUNK :]  # and the next took the rest


def test_the_end_of_a_tls_stream_reads_as_empty(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client_end, server_end = tls_pair
    server_end.sendall(b"last")
    server_end.close()  # the TCP end, without TLS's close_notify (a ragged end)
    client = _client_on(client_end)
    wait_until(lambda: _waiting_bytes(client_end) > 0, 30, "the last record")
    reads = []
    for _ in range(10_000):  # bounded: two reads are needed
        try:
            reads.append(client._recv_available())
        except BlockingIOError:  # the end not there yet
            wait_until(lambda: _waiting_bytes(client_end) >= 0, 30, "the end")
            continue
        if not reads[-1]:
            break
    assert reads == [b"last", b""]  # the bytes first, then the end (paho: connection lost)
