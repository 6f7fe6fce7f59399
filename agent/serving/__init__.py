"""The local inference server (OIP v2, and TensorFlow Serving's REST dialect, on a Unix
socket): transport, routes, repeats, admission, peers and their shares, /metrics. Imports
runtime, oip, device (its config), contracts, base; never update or telemetry.
"""
