"""The gateway's caching mirror (nginx on `edgectl gateway config`'s nginx.conf) in front of a
static repository server, asked directly: what is cached, what is not, and Range requests.

The upstream is the static nginx of the repository-on-any-server test, serving a
repository folder with a real release; its access log says what reached it.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tests.e2e_support import edgectl, edgectl_bundles
from tests.gateway.servers import start_gateway_nginx, start_static_repository
from tests.helpers import free_port


def test_mirror_caches_what_never_changes_and_answers_ranges(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    bundles = edgectl_bundles(tmp_path, "linear", ["1.0.0"])
    edgectl("release", bundles["1.0.0"], "--fleet", "lab", "--repo", repo, "--no-shadow")
    (target,) = (repo / "targets" / "bundles" / "linear").glob("*.1.0.0.bundle")
    data = target.read_bytes()
    upstream = start_static_repository(tmp_path / "upstream", repo)
    port = free_port()
    gw = tmp_path / "gw"
    edgectl("gateway", "config", "--site", "s1", "--upstream", upstream.url + "/",
            "--central-broker", "127.0.0.1:1883", "--listen", f"127.0.0.1:{port}", "-o", gw,
            *(["--run-as", "root"] if os.geteuid() == 0 else []))  # fmt: skip
    mirror = start_gateway_nginx(gw, port)
    try:
        path = f"/targets/bundles/linear/{target.name}"
        with httpx.Client(base_url=mirror.url) as client:
            # A resume on a miss: answered 206 with the right bytes; upstream sent it whole.
            first = client.get(path, headers={"Range": "bytes=100-"})
            assert first.status_code == 206 and first.content == data[100:]
            assert first.headers["X-Cache-Status"] == "MISS"
            again = client.get(path, headers={"Range": "bytes=7-"})
            assert again.status_code == 206 and again.content == data[7:]
            assert again.headers["X-Cache-Status"] == "HIT"
            whole = client.get(path)
            assert whole.content == data and whole.headers["X-Cache-Status"] == "HIT"
            assert "immutable" in whole.headers["Cache-Control"]
            # timestamp.json: every request goes upstream; a 404 probe is not cached either.
            for _ in range(3):
                ts = client.get("/metadata/timestamp.json")
                assert ts.status_code == 200 and ts.headers["Cache-Control"] == "no-cache"
                assert client.get("/metadata/99.root.json").status_code == 404
            assert client.get("/metadata/1.root.json").status_code == 200
            assert client.get("/metadata/1.root.json").headers["X-Cache-Status"] == "HIT"
            assert client.get("/keys/").status_code == 404  # nothing else of the folder
        seen = upstream.requests()
        bundle_upstream = [r for r in seen if r.path == path]
        assert [(r.status, r.bytes, r.range) for r in bundle_upstream] == [(200, len(data), "-")]
        assert sum(r.path == "/metadata/timestamp.json" for r in seen) == 3
        assert sum(r.path == "/metadata/99.root.json" for r in seen) == 3
        assert sum(r.path == "/metadata/1.root.json" for r in seen) == 1
    finally:
        mirror.stop()
        upstream.stop()
