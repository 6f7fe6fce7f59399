"""The local inference server (OIP v2 on a Unix socket): transport, routes, repeats, admission,
peers and their shares, /metrics. Imports runtime, oip, device (its config), contracts, base;
never update or telemetry.
"""
