"""What the fleet reports: telemetry ingest from MQTT (admitting what the device registry
allows), its backlog, the telemetry store (SQLite, PostgreSQL) and device health. Imports
base and agent.contracts.
"""
