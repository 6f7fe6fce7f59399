"""A hostile local user's attacks on the agent's socket, for
tests/security/test_local_adversary.py, which runs this as another uid (setpriv):

    python -m tests.security.local_attacker MODE SOCKET [ARG]

Each mode sets its attack up, prints one JSON line (what it got: statuses, connections
held), keeps the attack going until a line arrives on stdin (or its own deadline), then
releases it and prints a last JSON line (what it saw in the end). Only the standard
library and this tree: the attacker is a plain local user with a socket.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

MAX_CONNECTIONS = 256  # tries at most this many: more than any share in the tests
HOLD_S = 60.0  # an attack is released after this even without a line on stdin


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def answer(sock: socket.socket) -> tuple[int, str]:
    """The status and body of the next response on ``sock`` (0, "": none came).
    A ``100 Continue`` is an answer too (its body is empty)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return 0, ""
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, rest[:length].decode("utf-8", "replace")
    except (OSError, ValueError, IndexError):
        return 0, ""


def send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
    except OSError:  # refused and closed already: its answer is still to be read
        return False
    return True


def post_head(path: str, length: int, *, expect: bool) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: agent", f"Content-Length: {length}"]
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def wait_for_release() -> None:
    """Until the test writes a line (or closes stdin), at most HOLD_S."""
    done = threading.Event()

    def read() -> None:
        sys.stdin.readline()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(HOLD_S)


def report(doc: dict[str, Any]) -> None:
    print(json.dumps(doc), flush=True)


# ---------------------------------------------------------------------------- attacks


def header_only(path: str, body_bytes: str) -> None:
    """Heads announcing the largest body, and not one byte of it, on every connection
    this user may open: each used to allocate (and zero) the whole body at once."""
    head = post_head("/v2/models/linear/infer", int(body_bytes), expect=True)
    held: list[socket.socket] = []
    statuses: Counter[int] = Counter()
    for _ in range(MAX_CONNECTIONS):
        sock = connect(path)
        held.append(sock)
        send(sock, head)
        status, body = answer(sock)
        statuses[status] += 1
        if status == 503 and "too many connections" in body:
            break  # this user's share of the connections is taken
    report({"statuses": statuses, "connections": len(held)})
    wait_for_release()
    for sock in held:
        sock.close()
    report({"released": len(held)})


def hoard(path: str) -> None:
    """Idle keep-alive connections, as many as the agent lets this user open."""
    held: list[socket.socket] = []
    refusal = (0, "")
    for _ in range(MAX_CONNECTIONS):
        sock = connect(path)
        send(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: agent\r\n\r\n")
        status, body = answer(sock)
        if status != 200:
            refusal = (status, body)
            sock.close()
            break
        held.append(sock)
    report({"held": len(held), "refusal": refusal})
    wait_for_release()
    for sock in held:
        sock.close()
    report({"released": len(held)})


def slow(path: str, body_bytes: str) -> None:
    """Senders below every rate: 8 drip a head a byte at a time, 16 announce the largest
    body, send 256 KiB of it at once, then drip the rest."""
    stop = threading.Event()
    statuses: list[int] = []
    lock = threading.Lock()

    def drip(prefix: bytes, tail: bytes) -> None:
        status = 0
        try:
            with connect(path) as sock:
                if send(sock, prefix):
                    for byte in tail:
                        if stop.wait(0.05) or not send(sock, bytes([byte])):
                            break
                status = answer(sock)[0]
        except OSError:
            pass
        with lock:
            statuses.append(status)

    head = b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: agent\r\nContent-Length: 99\r\n\r\n"
    big = post_head("/v2/models/linear/infer", int(body_bytes), expect=False)
    threads = [threading.Thread(target=drip, args=(b"", head)) for _ in range(8)]
    threads += [
        threading.Thread(target=drip, args=(big + b"\0" * 256 * 1024, b"\0" * 4096))
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    report({"senders": len(threads)})
    _release_when(lambda: len(statuses) == len(threads))
    stop.set()
    for thread in threads:
        thread.join(15)
    report({"statuses": Counter(statuses)})


def _release_when(finished: Callable[[], bool]) -> None:
    """Until the test says so, or ``finished`` (checked every 0.05 s)."""
    released = threading.Event()
    threading.Thread(target=lambda: (wait_for_release(), released.set()), daemon=True).start()
    deadline = time.monotonic() + HOLD_S
    while not released.wait(0.05) and not finished() and time.monotonic() < deadline:
        pass


def json_bomb(path: str, body_bytes: str) -> None:
    """Infer and register requests whose JSON is as large as a body may be: parsing
    takes ~12 times its size, several at once. Holds (reports) once every body is sent,
    while the agent would still be parsing them; reports the answers when released."""
    count = (int(body_bytes) - 100) // 16 * 4  # values: 4 bytes each, rows of 4, under the limit
    numbers = b"[" + b"1.5," * (count - 1) + b"1.5]"
    doc = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[%d,4],"data":%s}]}' % (
        count // 4,
        numbers,
    )
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()
    sent = threading.Semaphore(0)

    def bomb(url: str, body: bytes) -> None:
        got = (0, "")
        try:
            with connect(path) as sock:
                sock.settimeout(60)
                send(sock, post_head(url, len(body), expect=False) + body)
                sent.release()
                got = answer(sock)
        except OSError:
            sent.release()
        with lock:
            answers.append((got[0], got[1][:160]))

    targets = ["/v2/models/linear/infer"] * 6 + ["/v2/systemsharedmemory/region/r/register"]
    threads = [threading.Thread(target=bomb, args=(url, doc)) for url in targets]
    for thread in threads:
        thread.start()
    for _ in threads:
        sent.acquire(timeout=60)
    report({"sent": len(threads)})
    wait_for_release()
    for thread in threads:
        thread.join(60)
    report({"answers": answers})


def intruder(path: str, owners_key: str) -> None:
    """Everything the single region namespace let any local user do to another's region
    "cam0" (``tests.agent._serving.intrude``)."""
    from tests.agent._serving import intrude

    report(intrude(path, owners_key))
    wait_for_release()
    report({"released": True})


MODES: dict[str, Callable[..., None]] = {
    "header_only": header_only,
    "hoard": hoard,
    "slow": slow,
    "json_bomb": json_bomb,
    "intruder": intruder,
}

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        MODES[sys.argv[1]](*sys.argv[2:])
