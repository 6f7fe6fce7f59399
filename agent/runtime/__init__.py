"""Models in memory: ONNX Runtime sessions and the registry of live versions, each version's
request statistics, and giving memory back after a swap. Imports contracts and base.
"""
