"""Run several real agents in one process: ``python -m tests.fleet_agents CONFIG...``.

Each agent is a full ``agent.app.AgentApp`` (inference socket, MQTT link, update service,
probation, heartbeats, outbox) with its own config and state folder; they share the
process's event loop, imports and ONNX Runtime, which is what lets a test run a fleet of
twenty-odd agents on two cores. SIGTERM or SIGINT stops them all.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from agent.app import AgentApp
from agent.device.config import load_config


async def run(configs: list[Path]) -> None:
    apps = [AgentApp(load_config(path)) for path in configs]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for app in apps:
            app.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await asyncio.gather(*(app.run() for app in apps))


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    asyncio.run(run([Path(p) for p in sys.argv[1:]]))


if __name__ == "__main__":
    main()
