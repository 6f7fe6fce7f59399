"""The Open Inference Protocol v2 as both ends speak it: request and response documents,
tensors, shared-memory regions; and TensorFlow Serving's REST dialect, translated to the
same input arrays (``tfs``, ``tfs_predict``). Server and client import it; it imports
contracts, base.
"""
