"""What the fleet reports: telemetry ingest from MQTT (admitting what the device registry
allows), its backlog, the telemetry store (SQLite, PostgreSQL), device health, and which
`edgectl serve` leads (the lease in the store). Imports base and agent.contracts.
"""
