"""`semguard serve` needs only the base install: it runs, and answers, with the batch toolkit's
libraries (ART, gensim, matplotlib, scipy) and the stub generator (grpcio-tools) made unimportable."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.tiny_worldnet import IMAGE_SIZE, write_worldnet_bundle
from tests.service.subprocess_server import serving_port

NOT_FOR_SERVING = ("art", "gensim", "matplotlib", "scipy", "sklearn", "pandas", "grpc_tools")

SERVE = textwrap.dedent("""
    import atexit, sys
    BLOCKED = sys.argv[1].split(",")
    for name in BLOCKED:  # as if not installed: `import` raises ModuleNotFoundError, find_spec gives None
        sys.modules[name] = None
    loaded = lambda: sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None} & set(BLOCKED))
    atexit.register(lambda: print("LOADED", loaded(), flush=True))
    from semguard.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_worldnet_bundle(tmp_path_factory.mktemp("bundle"))


def test_serve_runs_and_answers_without_the_batch_toolkit(bundle):
    cmd = [sys.executable, "-c", SERVE, ",".join(NOT_FOR_SERVING), "serve", "--bundle", str(bundle),
           "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--torch-threads", "1", "--model-name", "tinyworld"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = serving_port(proc)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        images = np.random.default_rng(0).random((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        request = triton.InferInput("IMAGES", list(images.shape), "FP32")
        request.set_data_from_numpy(images)
        reply = client.infer("tinyworld", [request])
        assert reply.as_numpy("FLAG").shape == (2,) and np.isfinite(reply.as_numpy("SCORE")).all()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "LOADED []" in out, out
