"""edge-agent: runs ONNX models on a device, updated through a signed TUF repository."""

import os

# ONNX Runtime (1.32 on Linux) records usage events with a device id under
# ~/.cache/Microsoft/DeveloperTools and sends them to Microsoft unless ORT_DISABLE_TELEMETRY
# is set. A device (and a build host) must not phone home, nor write outside its state
# dir: off by default, before anything imports onnxruntime; an explicit setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
