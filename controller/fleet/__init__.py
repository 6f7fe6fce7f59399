"""What the fleet reports: telemetry ingest from MQTT, its backlog, the telemetry store (SQLite,
PostgreSQL) and device health. Imports base and agent.contracts.
"""
