"""The Open Inference Protocol v2 as both ends speak it: request and response documents,
tensors, shared-memory regions. Server and client import it; it imports contracts, base.
"""
