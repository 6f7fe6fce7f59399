"""The device itself: its configuration, enrollment and the crash-safe install of its files,
its TLS identity on the broker, the systemd notification protocol, the liveness rule its
watchdog follows and the cadence of its periodic loops. Imports contracts and base.
"""
