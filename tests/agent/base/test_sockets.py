"""The blocking-socket helpers the server and client share, on real socket pairs."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from agent.base.sockets import poll_recv_into, send_parts


def _receive_all(sock: socket.socket, nbytes: int, into: bytearray) -> None:
    view = memoryview(into)
    got = 0
    while got < nbytes:
        n = sock.recv_into(view[got:])
        if not n:
            break
        got += n


def _wmem_max() -> int:
    return int(Path("/proc/sys/net/core/wmem_max").read_text())


def test_send_parts_sends_every_part_in_order_and_grows_a_unix_send_buffer() -> None:
    parts = [bytes([i]) * size for i, size in enumerate((100, 700_000, 0, 3, 1_000_000))]
    expected = b"".join(parts)
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with sender, receiver:
        received = bytearray(len(expected))
        reader = threading.Thread(target=_receive_all, args=(receiver, len(expected), received))
        reader.start()
        send_parts(sender, parts)
        reader.join(10)
        assert bytes(received) == expected
        grown = sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        # The kernel grants at most twice net.core.wmem_max (it doubles what is asked).
        assert grown >= min(len(expected), 2 * _wmem_max())


class _Asking(socket.socket):
    """A real socket that counts how often its send buffer's size is asked."""

    asked = 0

    def getsockopt(self, *args: int) -> int:  # type: ignore[override]
        self.asked += 1
        return super().getsockopt(*args)


def test_send_parts_asks_the_buffer_size_only_for_a_larger_message() -> None:
    first, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender = _Asking(fileno=first.detach())
    with sender, receiver:
        sized = 0
        steps = ((300_000, 300_000, 1), (300_000, 300_000, 1), (200_000, 300_000, 1),
                 (400_000, 400_000, 2), (100, 400_000, 2))  # fmt: skip
        for size, expected, asks in steps:
            received = bytearray(size)
            reader = threading.Thread(target=_receive_all, args=(receiver, size, received))
            reader.start()
            sized = send_parts(sender, [b"h", b"x" * (size - 1)], sized)
            reader.join(10)
            assert bytes(received) == b"h" + b"x" * (size - 1)
            assert (sized, sender.asked) == (expected, asks)


def test_send_parts_leaves_a_tcp_send_buffer_to_autotuning() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
        with sender, receiver:
            payload = b"x" * 2_000_000
            received = bytearray(len(payload))
            reader = threading.Thread(target=_receive_all, args=(receiver, len(payload), received))
            reader.start()
            send_parts(sender, [payload])
            reader.join(10)
            assert bytes(received) == payload
            # Not pinned to the message size: SO_SNDBUF set by hand would stop autotuning.
            assert sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) != len(payload) * 2


def test_poll_recv_into_gives_up_without_data_and_reads_what_came() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        buffer = bytearray(16)
        assert poll_recv_into(b, buffer, 0.001) is None
        a.sendall(b"hello")
        assert poll_recv_into(b, buffer, 1.0) == 5
        assert bytes(buffer[:5]) == b"hello"
        a.close()
        assert poll_recv_into(b, buffer, 1.0) == 0  # the peer closed
