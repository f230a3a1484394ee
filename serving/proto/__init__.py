"""The gRPC contract of the batch server (flaxserve.proto) and its generated modules.

Regenerate with `python -m serving.proto.build` after editing the .proto.
"""
