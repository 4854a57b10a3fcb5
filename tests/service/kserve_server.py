"""A real third-party OIP v2 server for the upstream tests: KServe's Python model server (its gRPC
servicer, data plane, model repository and interceptors, as `kserve.ModelServer` wires them),
serving a small numpy model. Runs in KServe's own environment (scripts/test.sh: .venv-kserve).

    python kserve_server.py --name kworld[,other names] [--port 0] [--outputs output-0,CLASS,LABEL]

Prints `port N` once serving on 127.0.0.1:N (ModelServer itself binds [::] on a fixed port and
starts a REST server too; the tests need neither). The model: input `input-0` FP32 [-1, 3, H, W];
outputs `output-0` FP32 [-1, 3] (per-channel means), `CLASS` INT64 [-1] (the brightest channel),
`LABEL` BYTES [-1] (its name), and any other name asked with --outputs as FP32 [-1] zeros (to
make a clash). A request parameter `sleep_s` delays the answer (a frozen upstream).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent import futures

import numpy as np

sys.argv[1:], ARGS = [], sys.argv[1:]  # kserve.model_server parses sys.argv when imported
from grpc import aio  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse, Model  # noqa: E402
from kserve.model_repository import ModelRepository  # noqa: E402
from kserve.protocol.dataplane import DataPlane  # noqa: E402
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc  # noqa: E402
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor  # noqa: E402
from kserve.protocol.grpc.servicer import InferenceServicer  # noqa: E402
from kserve.protocol.infer_type import to_http_parameters  # noqa: E402
from kserve.protocol.model_repository_extension import ModelRepositoryExtension  # noqa: E402

CHANNELS = [b"red", b"green", b"blue"]


class ChannelModel(Model):
    def __init__(self, name: str, outputs: list[str]):
        super().__init__(name)
        self.outputs = outputs
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [{"name": "input-0", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]

    def get_output_types(self) -> list[dict]:
        known = {"output-0": ("FP32", [-1, 3]), "CLASS": ("INT64", [-1]), "LABEL": ("BYTES", [-1])}
        return [{"name": n, "datatype": known.get(n, ("FP32",))[0], "shape": known.get(n, (None, [-1]))[1]}
                for n in self.outputs]

    async def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        delay = float(to_http_parameters(payload.parameters or {}).get("sleep_s", 0))
        if delay:
            await asyncio.sleep(delay)
        images = payload.inputs[0].as_numpy()                   # (B, 3, H, W)
        means = images.mean(axis=(2, 3)).astype(np.float32)     # (B, 3)
        values = {"output-0": means, "CLASS": means.argmax(1).astype(np.int64),
                  "LABEL": np.array([CHANNELS[i] for i in means.argmax(1)], dtype=np.object_)}
        outputs = []
        for name in self.outputs:
            value = values.get(name, np.zeros(len(images), np.float32))
            datatype = {"output-0": "FP32", "CLASS": "INT64", "LABEL": "BYTES"}.get(name, "FP32")
            out = InferOutput(name, list(value.shape), datatype)
            out.set_data_from_numpy(value)
            outputs.append(out)
        return InferResponse(payload.id, self.name, outputs, from_grpc=True)


async def serve(names: list[str], port: int, outputs: list[str]) -> None:
    repository = ModelRepository()
    model = ChannelModel(names[0], outputs)
    for name in names:
        repository.update(model, name=name)
    server = aio.server(futures.ThreadPoolExecutor(max_workers=4),
                        interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()))
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(DataPlane(repository), ModelRepositoryExtension(repository)), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"port {bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="kworld")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--outputs", default="output-0,CLASS,LABEL")
    args = p.parse_args(ARGS)
    asyncio.run(serve(args.name.split(","), args.port, args.outputs.split(",")))


if __name__ == "__main__":
    main()
