"""Private nginx servers for the static-repository and site-gateway tests.

``static_repository_conf`` is the server block docs/operations.md shows ("The repository
on any static server"), inside a config whose every path lies in the test's folder: a
private prefix, pid file, error log, access log and temp folders, a free loopback port,
``daemon off`` (the test owns the process). As root, the workers run as root too (the
test's folders are not readable by nginx's default user).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port, stop_process, wait_for_port

# One line per request: what the access-log assertions read.
LOG_FORMAT = (
    'log_format edgefleet \'$remote_addr [$time_local] "$request" $status '
    '$body_bytes_sent cache=$upstream_cache_status range="$http_range" $request_time\';'
)
_LINE = re.compile(
    r'"(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'cache=(?P<cache>\S*) range="(?P<range>[^"]*)"'
)


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise RuntimeError("nginx is not installed: run `make system-deps` (apt-get install nginx)")
    return found


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    bytes: int
    cache: str
    range: str


@dataclass
class Nginx:
    port: int
    prefix: Path
    process: subprocess.Popen[bytes]
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[Request]:
        """Every request logged so far, oldest first."""
        if not self.access_log.exists():
            return []
        found = []
        for line in self.access_log.read_text().splitlines():
            m = _LINE.search(line)
            if m:
                found.append(
                    Request(
                        m["method"],
                        m["path"],
                        int(m["status"]),
                        int(m["bytes"]),
                        m["cache"],
                        m["range"],
                    )
                )
        return found

    def stop(self) -> None:
        stop_process(self.process, timeout_s=5)


def _main_context(prefix: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
    )


def _http_context(prefix: Path) -> str:
    tmp = prefix / "tmp"
    return (
        f"    {LOG_FORMAT}\n"
        f"    access_log {prefix / 'access.log'} edgefleet;\n"
        + "".join(
            f"    {kind}_temp_path {tmp / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + "    types { application/json json; }\n    default_type application/octet-stream;\n"
    )


def static_repository_conf(prefix: Path, repo: Path, port: int, limit_rate: str = "") -> str:
    """nginx serving ``repo``'s metadata/ and targets/ on 127.0.0.1:``port`` (the server
    block of docs/operations.md); ``limit_rate`` slows each target download."""
    throttle = f"        limit_rate {limit_rate};\n" if limit_rate else ""
    return (
        _main_context(prefix) + "http {\n" + _http_context(prefix) + "    server {\n"
        f"    listen 127.0.0.1:{port};\n"
        f"    root {repo};\n"
        "    disable_symlinks on;\n"
        "    location ~ /\\. { return 404; }\n"
        "    location /targets/ {\n"
        '        add_header Cache-Control "public, max-age=31536000, immutable";\n'
        f"{throttle}"
        "    }\n"
        '    location ~ "^/metadata/[0-9]+\\.[^/]+\\.json$" {\n'
        '        add_header Cache-Control "public, max-age=31536000, immutable";\n'
        "    }\n"
        "    location /metadata/ {\n"
        '        add_header Cache-Control "no-cache";\n'
        "    }\n"
        "    location / { return 404; }\n"
        "    }\n"
        "}\n"
    )


def start_nginx(prefix: Path, conf_text: str | None, port: int, conf: Path | None = None) -> Nginx:
    """Start nginx with ``conf_text`` (written to ``prefix/nginx.conf``) or an existing
    ``conf``; wait until it listens on ``port``."""
    prefix.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    args = [nginx_binary(), "-p", str(prefix), "-e", str(prefix / "error.log")]
    if conf is None:
        conf = prefix / "nginx.conf"
        assert conf_text is not None
        conf.write_text(conf_text)
    else:
        args += ["-g", "daemon off;"]
    log = open(prefix / "nginx.out", "ab")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([*args, "-c", str(conf)], stdout=log, stderr=log)
    try:
        wait_for_port(port)
    except TimeoutError:
        process.kill()
        raise AssertionError(
            f"nginx did not listen on {port}:\n{(prefix / 'error.log').read_text(errors='replace')}"
        ) from None
    access = prefix / "access.log"
    if conf_text is None:  # a gateway's config: its own log folder
        access = conf.parent / "logs" / "access.log"
    return Nginx(port=port, prefix=prefix, process=process, access_log=access)


def start_static_repository(prefix: Path, repo: Path, limit_rate: str = "") -> Nginx:
    port = free_port()
    return start_nginx(prefix, static_repository_conf(prefix, repo, port, limit_rate), port)


def counting_proxy_conf(prefix: Path, port: int, upstream: str) -> str:
    """nginx in front of ``upstream`` (`edgectl serve`'s URL), caching nothing: its access
    log counts every byte the controller's repository serves."""
    return (
        _main_context(prefix) + "http {\n" + _http_context(prefix) + "    server {\n"
        f"    listen 127.0.0.1:{port};\n"
        "    location / {\n"
        f"        proxy_pass {upstream};\n"
        "        proxy_buffering off;\n"
        "    }\n"
        "    }\n"
        "}\n"
    )


def start_counting_proxy(prefix: Path, upstream: str) -> Nginx:
    port = free_port()
    return start_nginx(prefix, counting_proxy_conf(prefix, port, upstream), port)


def start_gateway_nginx(folder: Path, port: int) -> Nginx:
    """nginx on the config `edgectl gateway config` wrote into ``folder``."""
    return start_nginx(folder, None, port, conf=folder / "nginx.conf")
