"""Load test of the guard server: dynamic batching vs batch-1 serving, side by side.

    python benchmarks/bench_service.py [--clients 16] [--requests 800]
    python benchmarks/bench_service.py --upstream-comparison [--requests 160] [--kserve-python .venv-kserve/bin/python]
    python benchmarks/bench_service.py --bare-comparison --bundle DIR [--requests 160] [--trust-model-code]

Loopback only and bounded: the server runs in a child process (its own GIL, as in production),
N client threads in this process each send their share of M single-image ModelInfer requests with
tritonclient.grpc, then everything stops. Reports throughput, p50/p99 latency and errors (must be
0) for max_batch_size=B (dynamic batching) and max_batch_size=1, and the throughput ratio.

The guard here is a benchmark stand-in with the real cost profile of the service path: WorldNet
(models/worldnet.py, random init; the world's 32x32 residual CNN) forward pass plus a per-layer
mean-activation signature over its 3 stages; the real detector.guard.Guard adds its signature
and flagger work per batch, which batching amortises the same way. `--bundle DIR` benchmarks a
real bundle instead.

--upstream-comparison: p50 latency of the guard in front of an upstream OIP server (a second
semguard process serving model "classifier", or with --kserve-python KServe's Python model server;
the guard serves under the upstream model's name) vs
that upstream alone vs the guard alone, at 1 and --clients clients, with the ratios side by side;
and the guard in front of it at --delay-ms vs at 0 ms batching delay (an idle batcher does not wait
for company, so at one client the delay should cost nothing).

--bare-comparison: the bundle's guard vs its bare model served through the same path (same server,
batcher, decode and OIP response; the server has no guard-off switch, so the bare side is a
`BareModel` in the guard's place: the same input check, forward pass and top-5 as the guard, no
taps, signature or flagger; SCORE 0, FLAG false), at 1 and --clients clients, throughput and
p50/p99 side by side with the guard / bare ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semguard.detector.guard import GuardInfo, Verdict


class BenchGuard:
    """WorldNet forward + per-stage mean activations as signature (a benchmark stand-in, not a detector)."""

    def __init__(self) -> None:
        import torch
        from semguard.models.worldnet import WorldNet

        torch.manual_seed(0)
        self.model = WorldNet().eval()
        self.layers = ["stage1", "stage2", "stage3"]
        self.acts: dict[str, torch.Tensor] = {}
        for name in self.layers:
            getattr(self.model, name).register_forward_hook(
                lambda _m, _i, out, name=name: self.acts.__setitem__(name, out))
        k = self.model.config.num_classes
        self.info = GuardInfo("worldnet", [f"c{i}" for i in range(k)], self.layers, (3, 32, 32), 1.0, "bench")

    def inspect(self, images):
        import torch

        with torch.no_grad():
            logits = self.model(images)                                   # (B, K)
            sig = torch.stack([self.acts[n].mean(dim=(1, 2, 3)) for n in self.layers], 1)  # (B, L)
            probs = torch.softmax(logits, 1)
            top_p, top_i = probs.topk(5, 1)
        out = []
        for b in range(len(images)):
            pred = int(top_i[b, 0])
            out.append(Verdict(pred, self.info.labels[pred], list(zip(top_i[b].tolist(), top_p[b].tolist())),
                                logits[b].numpy(), sig[b].numpy(), float(sig[b].mean()), False, []))
        return out


class BareModel:
    """A bundle's model alone in the guard's place: Guard's input check, forward and top-5, nothing else."""

    def __init__(self, guard) -> None:
        self.guard, self.info = guard, guard.info

    def inspect(self, images):
        import torch

        x = self.guard.validate_images(images)
        with torch.no_grad():
            logits = self.guard.bundle.model(x)                              # (B, K)
            top = torch.softmax(logits.double(), 1).topk(min(5, logits.shape[1]), dim=1)
        none = np.zeros(len(self.info.layers))
        return [Verdict(int(i[0]), self.info.labels[int(i[0])], list(zip(i.tolist(), p.tolist())),
                        logits[b].numpy(), none, 0.0, False, [])
                for b, (i, p) in enumerate(zip(top.indices, top.values))]


def _serve(max_batch_size: int, delay_ms: float, bundle: str | None, torch_threads: int | None, conn,
           extra: dict | None = None, trust_model_code: bool = False, bare: bool = False) -> None:
    from semguard.service.config import ServiceConfig
    from semguard.service.server import create_server, load_guard

    config = ServiceConfig(**{"grpc_port": 0, "metrics_port": None, "max_batch_size": max_batch_size,
                              "max_queue_delay_ms": delay_ms, "max_workers": 64, "torch_threads": torch_threads,
                              **(extra or {})})
    guard = load_guard(bundle, trust_model_code, config.native_kernels) if bundle else BenchGuard()
    guard = BareModel(guard) if bare else guard
    created = create_server(config, guard)
    created.server.start()
    served_as = config.upstream_model or config.model_name or guard.info.model_name  # upstream mode: its model's name
    conn.send((created.port, served_as, tuple(guard.info.input_shape)))
    conn.recv()  # until the parent says stop
    created.server.stop(grace=5).wait(10)


@dataclass(frozen=True)
class LoadResult:
    seconds: float
    latencies_ms: list[float]
    errors: int

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def _load(port: int, model: str, shape: tuple[int, int, int], clients: int, requests: int,
          outputs: tuple[str, ...] = ("PREDICTION", "SCORE", "FLAG")) -> LoadResult:
    import tritonclient.grpc as triton

    image = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_gate = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        c = triton.InferenceServerClient(f"127.0.0.1:{port}")
        inp = triton.InferInput("IMAGE", list(image.shape), "FP32")
        inp.set_data_from_numpy(image)
        outs = [triton.InferRequestedOutput(n) for n in outputs]
        for _ in range(3):  # warm-up, not timed
            c.infer(model, [inp], outputs=outs)
        start_gate.wait()
        for _ in range(requests // clients):
            t0 = time.perf_counter()
            try:
                c.infer(model, [inp], outputs=outs, client_timeout=30)
                latencies[i].append((time.perf_counter() - t0) * 1000)
            except Exception:
                errors[i] += 1
        c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(600)
    return LoadResult(time.perf_counter() - t0, [x for lat in latencies for x in lat], sum(errors))


@contextlib.contextmanager
def served(max_batch_size: int, args: argparse.Namespace, bare: bool = False, **extra):
    """A server in a child process (bare: the bundle's model alone); yields (port, model name, input shape)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(max_batch_size, args.delay_ms, args.bundle, args.torch_threads or None,
                                            child, extra, args.trust_model_code, bare), daemon=True)
    proc.start()
    try:
        yield parent.recv()
    finally:
        parent.send("stop")
        proc.join(30)


def run(max_batch_size: int, args: argparse.Namespace) -> LoadResult:
    with served(max_batch_size, args) as (port, model, shape):
        return _load(port, model, shape, args.clients, args.requests)


KSERVE_SERVER = Path(__file__).resolve().parent.parent / "tests" / "service" / "kserve_server.py"


@contextlib.contextmanager
def kserve_served(python: str):
    """KServe's Python model server (tests/service/kserve_server.py, numpy per-channel means) serving
    model "worldnet", the benchmark guard's own name; yields (port, model name, input shape)."""
    proc = subprocess.Popen([python, str(KSERVE_SERVER), "--name", "worldnet"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise SystemExit(f"--kserve-python {python}: KServe's model server did not start")
        yield int(line.split()[1]), "worldnet", (3, 32, 32)
    finally:
        proc.terminate()
        proc.wait(30)


def upstream_comparison(args: argparse.Namespace) -> None:
    """Guard in front of an upstream vs the upstream alone vs the guard alone, at 1 and N clients."""
    guard_outs = ("SEMGUARD_SCORE", "SEMGUARD_FLAG")
    rows: dict[int, dict[str, LoadResult]] = {}
    upstream = kserve_served(args.kserve_python) if args.kserve_python else \
        served(args.max_batch_size, args, model_name="classifier")
    up_out = "CLASS" if args.kserve_python else "PREDICTION"
    with upstream as (up_port, up_model, shape):
        for clients in (1, args.clients):
            n = max(args.requests // 2, 20) if clients == 1 else args.requests
            rows[clients] = {"upstream alone": _load(up_port, up_model, shape, clients, n, (up_out,))}
            with served(args.max_batch_size, args, output_prefix="SEMGUARD_") as (port, model, _):
                rows[clients]["guard alone"] = _load(port, model, shape, clients, n, guard_outs)
            with served(args.max_batch_size, args, output_prefix="SEMGUARD_", upstream=f"127.0.0.1:{up_port}",
                        upstream_model=up_model) as (port, model, _):
                rows[clients]["guard + upstream"] = _load(port, model, shape, clients, n, (up_out, *guard_outs))
            with served(args.max_batch_size, args, output_prefix="SEMGUARD_", upstream=f"127.0.0.1:{up_port}",
                        upstream_model=up_model, max_queue_delay_ms=0.0) as (port, model, _):
                rows[clients]["guard + up, delay 0"] = _load(port, model, shape, clients, n,
                                                             (up_out, *guard_outs))
    print(f"machine: {machine()}; upstream: {'KServe model server' if args.kserve_python else 'semguard'}; "
          f"1 image 3x32x32 FP32 per request, loopback, annotate policy (overlapped passes), "
          f"batching delay {args.delay_ms:g} ms")
    for clients, results in load_table(rows):
        both, up, guard = results["guard + upstream"], results["upstream alone"], results["guard alone"]
        print(f"{clients:7d} p50 ratios: guard+upstream / upstream {both.percentile(50) / up.percentile(50):.2f}x, "
              f"/ guard {both.percentile(50) / guard.percentile(50):.2f}x, "
              f"/ (upstream + guard) {both.percentile(50) / (up.percentile(50) + guard.percentile(50)):.2f}x, "
              f"/ itself at delay 0 {both.percentile(50) / results['guard + up, delay 0'].percentile(50):.2f}x")


def load_table(rows: dict[int, dict[str, LoadResult]]):
    """Print one line per (clients, mode) under a header; yields (clients, results) after each clients' lines
    so the caller can print its ratios there."""
    width = max(len(name) for results in rows.values() for name in results)
    print(f"{'clients':>7s} {'mode':{width}s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
    for clients, results in rows.items():
        for name, r in results.items():
            print(f"{clients:7d} {name:{width}s} {r.throughput:8.1f} {r.percentile(50):8.2f} {r.percentile(99):8.2f} "
                  f"{r.errors:7d}")
        yield clients, results


def bare_comparison(args: argparse.Namespace) -> None:
    """The bundle's guard vs its bare model, same server and path, at 1 and N clients, ratios side by side."""
    if not args.bundle:
        raise SystemExit("--bare-comparison needs --bundle DIR (the guard whose model is served bare)")
    rows: dict[int, dict[str, LoadResult]] = {}
    for clients in (1, args.clients):
        n = max(args.requests // 2, 20) if clients == 1 else args.requests
        rows[clients] = {}
        modes = [("bare model", True, False), ("guard + model", False, False)]
        modes += [("guard (native) + model", False, True)] if args.native_kernels else []
        for name, bare, native in modes:
            with served(args.max_batch_size, args, bare=bare, return_freed_memory=args.return_freed_memory,
                        native_kernels=native) as (port, model, shape):
                rows[clients][name] = _load(port, model, shape, clients, n)
    print(f"machine: {machine()}; bundle {args.bundle}, 1 image {'x'.join(map(str, shape))} FP32 per request, "
          f"loopback, max_batch_size {args.max_batch_size}, batching delay {args.delay_ms:g} ms, "
          f"server torch threads {args.torch_threads or 'default'}, freed memory "
          f"{'returned (--return-freed-memory)' if args.return_freed_memory else 'kept (the server default)'}")
    for clients, results in load_table(rows):
        b = results["bare model"]
        for name in (n for n in results if n.startswith("guard")):
            g = results[name]
            print(f"{clients:7d} {name.removesuffix(' + model')} / bare: p50 {g.percentile(50) / b.percentile(50):.2f}x, "
                  f"p99 {g.percentile(99) / b.percentile(99):.2f}x, throughput {g.throughput / b.throughput:.2f}x")
    if any(r.errors for results in rows.values() for r in results.values()):
        raise SystemExit("errors during the load test")


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} CPUs (nproc), {model}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=800, help="total requests per mode (1 image each)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--delay-ms", type=float, default=2.0, help="max queue delay of the dynamic batcher")
    # 1 by default: the 16 client threads share this machine's cores with the server, and
    # oversubscribed OpenMP threads stall batched forwards (measured: see BENCHMARKS.md).
    p.add_argument("--torch-threads", type=int, default=1,
                   help="server intra-op threads (0 = torch's default); the clients share these cores")
    p.add_argument("--bundle", default=None, help="benchmark a real guard bundle instead of the WorldNet stand-in")
    p.add_argument("--upstream-comparison", action="store_true",
                   help="guard in front of an upstream vs upstream alone vs guard alone, at 1 and --clients clients")
    p.add_argument("--bare-comparison", action="store_true",
                   help="--bundle's guard vs its bare model through the same server, at 1 and --clients clients")
    p.add_argument("--trust-model-code", action="store_true", help="allow --bundle's entry-point model code")
    p.add_argument("--native-kernels", action="store_true",
                   help="with --bare-comparison: also the guard with --native-kernels (needs a C compiler)")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="with --bare-comparison: servers give freed memory back at once (the C library's default)")
    p.add_argument("--kserve-python", default=None,
                   help="with --upstream-comparison: the upstream is KServe's model server, run by this Python "
                   "(scripts/test.sh makes .venv-kserve/bin/python); default: a second semguard process")
    args = p.parse_args()
    if args.upstream_comparison:
        return upstream_comparison(args)
    if args.bare_comparison:
        return bare_comparison(args)
    results = {f"dynamic (max_batch_size={args.max_batch_size})": run(args.max_batch_size, args),
               "batch-1 (max_batch_size=1)": run(1, args)}
    print(f"machine: {machine()}; {args.clients} clients x {args.requests // args.clients} requests, "
          f"1 image 3x32x32 FP32 each, loopback; server torch threads: {args.torch_threads or 'default'}")
    print(f"{'mode':32s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
    for name, r in results.items():
        print(f"{name:32s} {r.throughput:8.1f} {r.percentile(50):8.2f} {r.percentile(99):8.2f} {r.errors:7d}")
    dyn, one = results.values()
    print(f"throughput ratio dynamic / batch-1: {dyn.throughput / one.throughput:.2f}x")
    if dyn.errors or one.errors:
        raise SystemExit("errors during the load test")


if __name__ == "__main__":
    main()
