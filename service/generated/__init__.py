"""Generated protobuf/gRPC stubs; regenerate with `python proto/generate.py`."""
