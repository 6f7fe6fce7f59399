"""The device itself: its configuration, enrollment and the crash-safe install of its files,
its TLS identity on the broker, the systemd notification protocol and the liveness rule its
watchdog follows. Imports contracts and base.
"""
