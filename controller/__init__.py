"""edgectl: builds, signs and publishes bundles and runs the fleet's rollouts."""

import os

# ONNX Runtime's usage events stay off on the build host too (see agent/__init__.py).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
