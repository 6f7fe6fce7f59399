"""From an ONNX model to a bundle file: checking, pruning, quantizing, evaluating against the
original, golden vectors, the bundle file. Imports base, agent.contracts and agent.base.
"""
