"""``edge-agent``: run the agent, or call a running agent's inference socket.

Exit codes (docs/cli.md has the table for both programs): 0 success, 1 failure (the
message says why), 2 bad usage or config, 130 interrupted (Ctrl-C).

Also home of :func:`completion_script`, the shell-completion generator both programs
use (``edgectl`` may import the agent; the agent never imports the controller).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import agent
from agent.base.completion import add_completion_parser, completion_script
from agent.base.errors import (
    AgentError,
    AgentUnreachableError,
    ConfigError,
    IncompatibleStateError,
)
from agent.device.config import InferenceConfig, load_config

if TYPE_CHECKING:
    import numpy as np

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Runs ONNX models on this device, updated from a signed edgefleet repository.",
        epilog="example: edge-agent run --config /etc/edge-agent/agent.toml\n"
        "exit codes: 0 ok, 1 failure, 2 usage, config or state error, 130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {agent.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run the agent (as systemd does)",
        description="Run the agent until SIGTERM.",
        epilog="example: edge-agent run --config /etc/edge-agent/agent.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, required=True, help="agent.toml")

    enroll = sub.add_parser(
        "enroll",
        help="install an enrollment archive from `edgectl device add`",
        description="Check an enrollment archive (certificate, key, TUF root, config) and "
        "install it under the config folder: device.key 0600, the rest 0644, owned by root. "
        "It holds an exclusive lock on the folder while it runs (another enroll or request "
        "waits for it, at most 30 s). Restart the agent afterwards.",
        epilog="example: edge-agent enroll enroll.tar && systemctl restart edge-agent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    enroll.add_argument("archive", type=Path, help="the .tar from `edgectl device add`")
    enroll.add_argument(
        "--config-dir", type=Path, default=Path("/etc/edge-agent"), help="default %(default)s"
    )
    enroll.add_argument("--force", action="store_true", help="replace another device's config")

    request = sub.add_parser(
        "request",
        help="make this device's key and a certificate request for `edgectl device add --csr`",
        description="Generate the device's private key (EC P-256) as device.key (0600) in "
        "the config folder and write a certificate signing request (CN = ID) for it. Send "
        "the request to the controller (`edgectl device add ID --csr FILE`), then install "
        "the archive it writes with `edge-agent enroll`: the key never leaves the device.",
        epilog="example: edge-agent request cam-0042 -o cam-0042.csr\n"
        "  then on the controller: edgectl device add cam-0042 --csr cam-0042.csr ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    request.add_argument("device_id", metavar="ID", help="this device's id")
    request.add_argument(
        "-o", "--output", metavar="FILE", help="where the request goes (default ID.csr; - stdout)"
    )
    request.add_argument(
        "--config-dir", type=Path, default=Path("/etc/edge-agent"), help="default %(default)s"
    )
    request.add_argument("--force", action="store_true", help="replace an existing device.key")
    request.add_argument(
        "--reuse-key",
        action="store_true",
        help="a request for the device.key already here, left unchanged (to renew its "
        "certificate: edgectl device renew ID --csr FILE)",
    )

    infer = sub.add_parser(
        "infer",
        help="run one inference through the local socket",
        description="Send one request to a running agent and print the outputs as JSON.",
        epilog=(
            "example: edge-agent infer digits --input sample.npy"
            " --socket /run/edge-agent/infer.sock\n"
            "Tensors travel as binary by default; --json sends JSON, --shm uses shared memory."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    infer.add_argument("model", help="model name")
    infer.add_argument("--input", type=Path, required=True, help="a .npy, .npz or .json file")
    infer.add_argument("--version", dest="model_version", help="require this model version")
    infer.add_argument("--output", action="append", dest="outputs", help="only this output")
    how = infer.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true", help="send JSON tensors, not binary")
    how.add_argument("--shm", action="store_true", help="pass tensors through shared memory")
    where = infer.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, help="the agent's inference socket")
    where.add_argument("--config", type=Path, help="read the socket path from agent.toml")

    status = sub.add_parser(
        "status",
        help="what a running agent says about itself: its broker connection, failed "
        "attempts and their cause, takeovers of its client id",
        description="Ask a running agent for its status through the local socket "
        "(GET /v2/health/agent) and print it: ready or not, the broker connection "
        "(connected since when, or failing since when, how many attempts, the last "
        "cause), the last lost connection, takeovers of the device's client id by "
        "another client, and what keeps the systemd watchdog from being fed.",
        epilog="example: edge-agent status --config /etc/edge-agent/agent.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, help="the agent's inference socket")
    where.add_argument("--config", type=Path, help="read the socket path from agent.toml")

    add_completion_parser(sub, "edge-agent")
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per HTTP request would drown what matters.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))


def _cmd_run(args: argparse.Namespace) -> int:
    import faulthandler
    import signal

    from agent.app import run_agent
    from agent.device.sdnotify import Notifier

    config = load_config(args.config)
    _configure_logging(config.log_level)
    # systemd's watchdog kills with SIGABRT: leave every thread's stack in the journal.
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    notifier = Notifier.from_environ()
    logging.getLogger(__name__).info(
        "edge-agent %s: device %s in fleet %s", agent.__version__, config.device_id, config.fleet
    )
    asyncio.run(run_agent(config, notifier))
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    from agent.device.enroll import enroll_from_file

    enrollment = enroll_from_file(args.archive, args.config_dir, force=args.force)
    print(f"enrolled {enrollment.device_id} in fleet {enrollment.fleet} under {args.config_dir}")
    print("  restart the agent: systemctl restart edge-agent")
    return 0


def _cmd_request(args: argparse.Namespace) -> int:
    from agent.base.fsutil import atomic_write
    from agent.device.enroll import request_enrollment, request_renewal

    if args.reuse_key and args.force:
        raise AgentError("--reuse-key keeps device.key and --force replaces it: pass one")
    output = args.output or f"{args.device_id}.csr"
    if output != "-" and not Path(output).resolve().parent.is_dir():
        # Checked before the key is made: a key without its request helps nobody.
        raise AgentError(f"cannot write {output}: its folder does not exist")
    if args.reuse_key:
        csr = request_renewal(args.device_id, args.config_dir)
    else:
        csr = request_enrollment(args.device_id, args.config_dir, force=args.force)
    key = args.config_dir / "device.key"
    wrote = f"used {key} as it is" if args.reuse_key else f"wrote {key} (0600)"
    if output == "-":
        sys.stdout.write(csr.decode())
        print(wrote, file=sys.stderr)
        return 0
    try:
        atomic_write(Path(output), csr, mode=0o644)
    except OSError as exc:
        again = "run it again" if args.reuse_key else "pass --force to make a new key and request"
        raise AgentError(
            f"cannot write {output}: {exc.strerror or exc} ({wrote}: {again})"
        ) from None
    command = "renew" if args.reuse_key else "add"
    print(f"{wrote}; the certificate request is {output}")
    print(
        f"  on the controller: edgectl device {command} {args.device_id} "
        f"--csr {Path(output).name} ..."
    )
    print("  then here: edge-agent enroll FILE && systemctl restart edge-agent")
    return 0


def _tensor_json(array: np.ndarray[Any, Any]) -> dict[str, Any]:
    data = array.astype(str) if array.dtype == object else array
    return {"shape": list(array.shape), "dtype": str(array.dtype), "data": data.tolist()}


def _socket_of(args: argparse.Namespace) -> tuple[Path, str]:
    """The agent's socket for ``infer`` and ``status``, and where that path came from."""
    if args.socket is not None:
        return args.socket, "given with --socket"
    if args.config is not None:
        return (
            load_config(args.config).inference.socket_path,
            f"[inference] socket_path in {args.config}",
        )
    return InferenceConfig().socket_path, "the default, no --socket or --config"


def _cmd_infer(args: argparse.Namespace) -> int:
    from agent.client import InferenceClient, load_input_file

    socket_path, source = _socket_of(args)
    try:
        with InferenceClient(socket_path, binary=not args.json) as client:
            metadata = client.model_metadata(args.model)
            inputs = load_input_file(args.input, metadata)
            if args.shm:
                outputs = _infer_shm(client, args, inputs)
            else:
                outputs = client.infer(
                    args.model, inputs, version=args.model_version, outputs=args.outputs
                )
    except AgentUnreachableError as exc:
        raise AgentUnreachableError(f"{exc} ({_unreachable_hint(socket_path, source)})") from None
    print(json.dumps({name: _tensor_json(value) for name, value in outputs.items()}))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from agent.client import InferenceClient

    socket_path, source = _socket_of(args)
    try:
        with InferenceClient(socket_path, timeout_s=10.0) as client:
            doc = client.agent_status()
    except AgentUnreachableError as exc:
        raise AgentUnreachableError(f"{exc} ({_unreachable_hint(socket_path, source)})") from None
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(status_lines(doc)))
    return 0


def status_lines(doc: dict[str, Any]) -> list[str]:
    """``edge-agent status`` for a person: the agent, then its broker connection, the
    repository sources that failed in the last update check (mirrors, url)."""
    device = doc.get("device", "?")
    lines = [
        f"device {device} in fleet {doc.get('fleet', '?')} (edge-agent "
        f"{doc.get('agent_version', '?')}): {'ready' if doc.get('ready') else 'not ready'}"
    ]
    broker = doc.get("broker")
    if isinstance(broker, dict):
        where = f"broker {broker.get('address')} (client id {broker.get('client_id')})"
        if broker.get("connected"):
            lines.append(f"{where}: connected since {broker.get('since')}")
        else:
            lines.append(f"{where}: NOT connected since {broker.get('since')}")
        failed = broker.get("failed_attempts") or 0
        if failed:
            lines.append(
                f"  {failed} failed connection attempt{'s' if failed > 1 else ''} since "
                f"{broker.get('failing_since')}"
            )
        error = broker.get("last_error")
        if isinstance(error, dict):
            lines.append(f"  last failed attempt ({error.get('at')}): {error.get('cause')}")
        loss = broker.get("last_loss")
        if isinstance(loss, dict):
            lines.append(f"  last lost connection ({loss.get('at')}): {loss.get('reason')}")
        takeovers = broker.get("takeovers") or 0
        if takeovers:
            lines.append(
                f"  TAKEN OVER {takeovers} time{'s' if takeovers > 1 else ''} (last at "
                f"{broker.get('last_takeover_at')}): another client connects with this "
                "device's client id; is its config copied to another machine?"
            )
    repository = doc.get("repository")
    if isinstance(repository, dict):
        for failure in repository.get("failed_last_check") or ():
            lines.append(f"repository source failed in the last update check: {failure}")
    for problem in doc.get("problems") or ():
        lines.append(f"not feeding the watchdog: {problem}")
    return lines


def _unreachable_hint(socket_path: Path, source: str) -> str:
    """Which socket ``infer`` or ``status`` tried, where that path came from, and what to
    check."""
    where = f"tried {socket_path}: {source}"
    if not socket_path.exists():
        return (
            f"{where}; nothing is there: is the agent running (`systemctl status "
            "edge-agent`)? Otherwise pass the agent's socket with --socket PATH or its "
            "agent.toml with --config"
        )
    if not socket_path.is_socket():
        return f"{where}; that is not a socket: pass the agent's socket with --socket PATH"
    return (
        f"{where}; no agent answers there (a socket left by an agent that stopped?), or "
        "this user may not use it: check `systemctl status edge-agent` and the socket's "
        "group and mode (the agent's `socket_group`, `allowed_users`, `allowed_groups`)"
    )


def _infer_shm(client: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> dict[str, Any]:
    import os

    import numpy as np

    from agent.oip.shm import SharedMemoryRegion

    need = sum(np.asarray(v).nbytes for v in inputs.values())
    name = f"edge-agent-cli-{os.getpid()}"
    with SharedMemoryRegion(name, max(2 * need, 1 << 20)) as region:
        client.register_shared_memory(name, region)
        try:
            result: dict[str, Any] = client.infer(
                args.model, inputs, version=args.model_version, outputs=args.outputs, shm=region
            )
        finally:
            client.unregister_shared_memory(name)
    return result


# ------------------------------------------------------------------- shell completion


def _cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(_parser(), args.shell), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "run": _cmd_run,
        "infer": _cmd_infer,
        "enroll": _cmd_enroll,
        "request": _cmd_request,
        "status": _cmd_status,
        "completion": _cmd_completion,
    }
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"edge-agent: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except IncompatibleStateError as exc:
        # 2, like a config error: restarting cannot help (the unit's RestartPreventExitStatus).
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
