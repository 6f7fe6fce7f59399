"""Who belongs to the fleet: the device CA, the device registry, enrolling, renewing and
revoking devices, and the broker's per-device config. Imports base and agent.contracts.
"""
