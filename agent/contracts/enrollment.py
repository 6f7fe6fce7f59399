"""The enrollment archive, ``enroll.tar``: what ``edgectl device add`` writes and
``edge-agent enroll`` reads.

The agent owns the contract, so both sides use the names below. The archive is a plain
tar with these regular-file members, at the top level, and no others:

    enroll.json   {"schema": "edgefleet.enroll/1", "device_id", "fleet"}
    agent.toml    the agent's config (paths relative to its folder)
    root.json     the fleet repository's TUF root: the agent's trust anchor
    ca.crt        the device CA: verifies the broker (and issued device.crt)
    device.crt    this device's client certificate, CN = device id
    device.key    its private key (the only secret); OPTIONAL: absent when the device
                  made its own key and sent a CSR

Invariants: members are packed in ``MEMBERS`` order with fixed modes (``device.key``
0600, the others 0644), so the same files give the same bytes; a reader refuses a member
larger than ``MAX_MEMBER_BYTES``. Checking and installing an archive is the device's side
(``agent.device.enroll``).
"""

from __future__ import annotations

import io
import tarfile
from typing import Final

ENROLL_SCHEMA: Final = "edgefleet.enroll/1"
INFO: Final = "enroll.json"
CONFIG: Final = "agent.toml"
ROOT: Final = "root.json"
CA_CERT: Final = "ca.crt"
DEVICE_CERT: Final = "device.crt"
DEVICE_KEY: Final = "device.key"
MEMBERS: Final = (INFO, CONFIG, ROOT, CA_CERT, DEVICE_CERT, DEVICE_KEY)
# Absent when the device made its own key (the CSR flow).
OPTIONAL_MEMBERS: Final = frozenset({DEVICE_KEY})
REQUIRED_MEMBERS: Final = tuple(m for m in MEMBERS if m not in OPTIONAL_MEMBERS)
SECRET_MEMBERS: Final = frozenset({DEVICE_KEY})
MAX_MEMBER_BYTES: Final = 1024 * 1024


def member_mode(name: str) -> int:
    return 0o600 if name in SECRET_MEMBERS else 0o644


def pack_enrollment(files: dict[str, bytes]) -> bytes:
    """The archive bytes for ``files``, deterministic order.

    ``files`` holds every name in REQUIRED_MEMBERS and may hold ``device.key``; raises
    ValueError otherwise.
    """
    missing = [m for m in REQUIRED_MEMBERS if m not in files]
    if missing or set(files) - set(MEMBERS):
        raise ValueError(
            f"enrollment members expected {REQUIRED_MEMBERS} (+ optional "
            f"{sorted(OPTIONAL_MEMBERS)}), got {sorted(files)}"
        )
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in (m for m in MEMBERS if m in files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = member_mode(name)
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()
