"""The parts of ``edgectl serve``: its config, the repository over HTTP and MQTT, the announcer,
the MQTT TLS client, the ``/metrics`` exposition. Imports repository, fleet, identity, base,
agent.contracts.
"""
