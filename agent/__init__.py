"""edge-agent: runs ONNX models on a device, updated through a signed TUF repository."""

__version__ = "0.1.0"
