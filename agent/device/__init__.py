"""The device itself: its configuration, enrollment and the crash-safe install of its files,
its TLS identity on the broker, and the systemd notification protocol. Imports contracts and base.
"""
