"""The agent's ground floor: the error tree, durable file writes, blocking-socket helpers
and shell completion. It imports nothing of ours; every other package may import it.
"""
