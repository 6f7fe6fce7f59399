"""The Python client of the local inference API and what ``edge-agent infer`` sends: requests,
transport, response decoding. Imports oip, contracts, base. ``InferenceClient`` is its face.
"""

from agent.client.inference import InferenceClient, load_input_file

__all__ = ["InferenceClient", "load_input_file"]
