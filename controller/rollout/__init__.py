"""Staged rollouts: the stage machine and the gates (pure), the service and its job, rollout
records on disk, and their views. Imports repository, fleet, base and agent.contracts.
"""
