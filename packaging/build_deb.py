"""Build the agent's Debian package (``make deb``) and the tarball for other distributions.

Usage: python packaging/build_deb.py [--output build] [--wheels DIR]

The package carries a wheelhouse (the agent and its runtime dependencies, built here with
``pip wheel``) and builds the virtual environment at install time, in ``postinst``, with
the device's own ``python3``: a venv made on the build machine would point at the build
machine's interpreter. So the package is tied to the Python minor version and the
architecture its wheels were built for (``Depends: python3 (>= 3.11), python3 (<< 3.12)``).

Layout installed::

    /opt/edge-agent/wheels/         the wheelhouse (postinst: pip install --no-index)
    /opt/edge-agent/venv/           made by postinst, removed by postrm
    /opt/edge-agent/share/          operations.md, agent.toml.example
    /usr/bin/edge-agent             -> /opt/edge-agent/venv/bin/edge-agent
    /lib/systemd/system/edge-agent.service
    /etc/edge-agent/agent.toml.example  (conffile; `edge-agent enroll` writes agent.toml)

Also written: ``edge-agent-<version>-<arch>.tar.gz`` with the same wheelhouse, the unit
and ``install.sh`` for distributions without dpkg.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "packaging"
PACKAGE = "edge-agent"


def _clean_env() -> dict[str, str]:
    """The environment without PIP_* (a host's find-links or index must not leak in)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}


def project_version() -> str:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return str(doc["project"]["version"])


def build_wheels(wheels: Path) -> None:
    """The project's wheel and its runtime dependencies' wheels into ``wheels``."""
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("edgefleet-*.whl"):
        old.unlink()  # always the tree as it is now
    env = _clean_env()
    if "PIP_CERT" in os.environ:  # the host's trust store for PyPI, if it set one
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(wheels),
            "--find-links",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        env=env,
    )


def _arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _control(version: str, arch: str, installed_kib: int) -> str:
    return (
        f"Package: {PACKAGE}\n"
        f"Version: {version}\n"
        f"Architecture: {arch}\n"
        "Maintainer: edgefleet maintainers <maintainers@edgefleet.invalid>\n"
        f"Installed-Size: {installed_kib}\n"
        "Depends: python3 (>= 3.11), python3 (<< 3.12), python3-venv, systemd, passwd\n"
        "Section: misc\n"
        "Priority: optional\n"
        "Homepage: https://github.com/edgefleet/edgefleet\n"
        "Description: edgefleet agent: ONNX inference and signed model updates\n"
        " Runs ONNX models on this device behind a local Open Inference Protocol socket,\n"
        " updated from a signed (TUF) edgefleet repository, as a hardened systemd service.\n"
        " Enroll with: edge-agent enroll enroll.tar\n"
    )


def stage(tree: Path, wheels: Path, version: str, arch: str) -> None:
    """Lay out the package's files and control scripts under ``tree``."""
    if tree.exists():
        shutil.rmtree(tree)
    opt = tree / "opt" / PACKAGE
    shutil.copytree(wheels, opt / "wheels")
    share = opt / "share" / "doc"
    share.mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "operations.md", share / "operations.md")
    shutil.copy(HERE / "agent.toml.example", opt / "share" / "agent.toml.example")
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / PACKAGE).symlink_to(f"/opt/{PACKAGE}/venv/bin/{PACKAGE}")
    units = tree / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(ROOT / "systemd" / "edge-agent.service", units / "edge-agent.service")
    etc = tree / "etc" / PACKAGE
    etc.mkdir(parents=True)
    shutil.copy(HERE / "agent.toml.example", etc / "agent.toml.example")
    debian = tree / "DEBIAN"
    debian.mkdir()
    size_kib = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) // 1024
    (debian / "control").write_text(_control(version, arch, size_kib))
    (debian / "conffiles").write_text(f"/etc/{PACKAGE}/agent.toml.example\n")
    for script in ("postinst", "prerm", "postrm"):
        shutil.copy(HERE / "debian" / script, debian / script)
        (debian / script).chmod(0o755)
    for path in tree.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path.parent == debian else 0o644)
    for script in ("postinst", "prerm", "postrm"):
        (debian / script).chmod(0o755)


def build_deb(tree: Path, output: Path) -> None:
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zzstd", "--build", str(tree), str(output)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def build_tarball(wheels: Path, output: Path, version: str) -> None:
    prefix = f"{PACKAGE}-{version}"
    with tarfile.open(output, "w:gz") as tar:
        tar.add(wheels, f"{prefix}/wheels")
        tar.add(ROOT / "systemd" / "edge-agent.service", f"{prefix}/edge-agent.service")
        tar.add(HERE / "agent.toml.example", f"{prefix}/agent.toml.example")
        tar.add(ROOT / "docs" / "operations.md", f"{prefix}/operations.md")
        tar.add(HERE / "install.sh", f"{prefix}/install.sh")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "build")
    parser.add_argument(
        "--wheels", type=Path, help="wheelhouse to build into and reuse (default OUTPUT/wheels)"
    )
    args = parser.parse_args(argv)
    output: Path = args.output.resolve()
    wheels: Path = (args.wheels or output / "wheels").resolve()
    version = project_version()
    arch = _arch()
    started = time.monotonic()
    build_wheels(wheels)
    tree = output / "deb-tree"
    stage(tree, wheels, version, arch)
    deb = output / f"{PACKAGE}_{version}_{arch}.deb"
    build_deb(tree, deb)
    shutil.rmtree(tree)
    tarball = output / f"{PACKAGE}-{version}-{arch}.tar.gz"
    build_tarball(wheels, tarball, version)
    print(f"built {deb} ({deb.stat().st_size // 1024} KiB) in {time.monotonic() - started:.1f} s")
    print(f"built {tarball} (install.sh for distributions without dpkg)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
