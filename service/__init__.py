"""The guard service: gRPC servicers (Open Inference Protocol + semguard.v1), dynamic batcher, metrics."""
