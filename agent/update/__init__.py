"""Following the fleet: the TUF check, fetchers (HTTP, MQTT), unpacking, the install journal,
lifecycle and probation, the models on disk. Imports runtime, device, contracts and base.
"""
