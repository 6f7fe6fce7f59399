"""A local client of the agent for ``probe.sh``: stdlib only, run inside the container as
one of its local users (``runuser -u alice -- python3 /probe/probe_client.py ...``).

It speaks raw HTTP/1.1 on the Unix socket so that the probe sees exactly what the agent
answers (status and body), including the answer to a connection it refuses at once.

Commands (each prints one line):
  call METHOD PATH [BODY]     "<status> <body>", or "refused <error>" when connect fails
  region KEY                  create /dev/shm/KEY (0600, 4096 bytes) holding the input x
  infer IN OUT                an infer of the linear model: its input from region IN and its
                              output into region OUT ("-": inline JSON / in the response)
  large-infer ROWS            an infer whose binary body (ROWS x 4 float32) is large enough
                              to be charged to the agent's body quota
  read KEY                    the output y (3 float32) written at offset 64 of /dev/shm/KEY
  hoard BODIES IDLE STOP      open BODIES connections announcing 64 MiB bodies that never
                              come, then IDLE connections that send nothing; print what the
                              agent answered; hold the rest open until the file STOP exists
                              (at most 60 s)
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import struct
import sys
import time

SOCKET = "/run/edge-agent/infer.sock"
X = (0.5, -1.0, 2.0, 0.25)  # the probe's input.npy
X_BYTES = struct.pack("<4f", *X)
Y_OFFSET = 64
BODY_BYTES = 64 * 1024 * 1024  # [inference] max_body_bytes
INFER = "/v2/models/linear/infer"


def connect() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(SOCKET)
    return sock


def head(method: str, path: str, length: int, extra: str = "") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {length}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    ).encode()


def exchange(method: str, path: str, body: bytes = b"", extra: str = "") -> str:
    """Send one request; "<status> <body>" of the answer (read even when the agent
    answered at once and closed before taking the request)."""
    try:
        sock = connect()
    except OSError as exc:
        return f"refused {exc}"
    with sock:
        # Refused at connect: the send may fail, but the answer is already in our buffer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head(method, path, len(body), extra) + body)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while not is_whole(answer) and (chunk := sock.recv(65536)):
                answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    body_bytes = rest.partition(b"\r\n\r\n")[2]
    status = status_line.split(b" ")[1].decode() if b" " in status_line else "none"
    return f"{status} {body_bytes.decode(errors='replace')}"


def is_whole(answer: bytes) -> bool:
    """Whether ``answer`` holds a whole response: its head and Content-Length bytes."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False  # no length: read to the end


def infer_body(inp: str, out: str) -> bytes:
    if inp == "-":
        x: dict[str, object] = {"data": list(X)}
    else:
        x = {"parameters": {"shared_memory_region": inp, "shared_memory_byte_size": 16}}
    doc: dict[str, object] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], **x}]}
    if out != "-":
        doc["outputs"] = [
            {
                "name": "y",
                "parameters": {
                    "shared_memory_region": out,
                    "shared_memory_offset": Y_OFFSET,
                    "shared_memory_byte_size": 12,
                },
            }
        ]
    return json.dumps(doc).encode()


def make_region(key: str) -> None:
    fd = os.open(f"/dev/shm/{key}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 4096)
        os.pwrite(fd, X_BYTES, 0)
    finally:
        os.close(fd)


def read_y(key: str) -> list[float]:
    with open(f"/dev/shm/{key}", "rb") as f:
        f.seek(Y_OFFSET)
        return list(struct.unpack("<3f", f.read(12)))


def large_infer(rows: int) -> str:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [rows, 4],
                    "parameters": {"binary_data_size": rows * 16},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    extra = f"Inference-Header-Content-Length: {len(header)}\r\n"
    status, _, body = exchange("POST", INFER, header + X_BYTES * rows, extra).partition(" ")
    return f"{status} {len(body)} bytes"


def answered(socks: list[socket.socket], wait_s: float) -> dict[socket.socket, bytes]:
    """What each socket received within ``wait_s`` (sockets that got nothing are left out)."""
    got: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + wait_s
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                got[sock] = got.get(sock, b"") + chunk
                if not chunk or b"\r\n\r\n" in got[sock]:
                    selector.unregister(sock)
    return got


def hoard(bodies: int, idle: int, stop: str) -> None:
    """Connections that announce large bodies and never send them, then idle ones."""
    announcing = []
    for _ in range(bodies):
        sock = connect()
        sock.sendall(head("POST", INFER, BODY_BYTES, "Content-Type: application/json\r\n"))
        announcing.append(sock)
    refused = answered(announcing, 3.0)
    body_refusals = [a for a in refused.values() if a.startswith(b"HTTP/1.1 503")]
    for sock in refused:
        sock.close()
    held = [s for s in announcing if s not in refused]
    idlers = []
    for _ in range(idle):
        try:
            idlers.append(connect())
        except OSError:
            break
    refused = answered(idlers, 3.0)
    connection_refusals = [a for a in refused.values() if b"too many connections" in a]
    for sock in refused:
        sock.close()
    held += [s for s in idlers if s not in refused]
    sample = (body_refusals or [b""])[0].partition(b"\r\n\r\n")[2].decode(errors="replace")
    print(
        f"bodies held={bodies - len(body_refusals)} refused={len(body_refusals)}; "
        f"idle held={len(idlers) - len(connection_refusals)} "
        f"refused={len(connection_refusals)} (of {idle}); first body refusal: {sample}",
        flush=True,
    )
    deadline = time.monotonic() + 60
    while not os.path.exists(stop) and time.monotonic() < deadline:
        time.sleep(0.2)
    for sock in held:
        sock.close()


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "call":
        method, path = args[0], args[1]
        print(exchange(method, path, args[2].encode() if len(args) > 2 else b""))
    elif command == "region":
        make_region(args[0])
    elif command == "infer":
        print(exchange("POST", INFER, infer_body(args[0], args[1])))
    elif command == "large-infer":
        print(large_infer(int(args[0])))
    elif command == "read":
        print(json.dumps(read_y(args[0])))
    elif command == "hoard":
        hoard(int(args[0]), int(args[1]), args[2])
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
