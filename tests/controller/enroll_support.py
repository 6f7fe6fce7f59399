"""What the enrollment tests share: the options every test device is added with, and
reading an enrollment archive's members."""

from __future__ import annotations

import io
import tarfile

from controller.identity.devices import EnrollOptions

OPTIONS = EnrollOptions(repository_url="https://updates.example.net/", mqtt_host="mq.example")


def archive_members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        out = {}
        for m in tar:
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out
