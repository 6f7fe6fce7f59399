"""The parts of ``edgectl serve``: its config, the repository over HTTP and MQTT, the announcer,
the MQTT TLS client, the ``/metrics`` exposition. Imports rollout, repository, fleet, identity,
base, agent.contracts.
"""
