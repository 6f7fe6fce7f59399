"""What the device tells its fleet: status and announcements over MQTT, heartbeats, events
through the outbox. Imports update (journal), runtime (stats), device, contracts, base.
"""
