"""Where the guard's time goes: torch.profiler over each stage of `Guard.inspect_arrays`.

Run: python benchmarks/profile_guard.py [--model resnet50|worldnet] [--mode fast|exact] [--batch 32] [--rows 12]
     python benchmarks/profile_guard.py --bundle DIR [--trust-model-code] [--batch 1]   (a trained bundle as written)

Builds the same synthetic bundle as benchmarks/bench_guard.py (random-init resnet50 or the world's
WorldNet), warms the guard up, then profiles one call with the stages marked by record_function
(forward / signature / flagger, from the guard's own stage boundaries) and prints, per stage, the
operators that took the most CPU time (self time, so a parent's children are not counted twice).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.profiler import ProfilerActivity, profile

from semguard.evaluation.detector_eval import DetectorEvalConfig
from semguard.config_flags import add_world_cache_flag
from semguard.detector.bundle import read_bundle
from semguard.detector.guard import Guard
from semguard.models.presets import preset_layers
from semguard.models.normalize import imagenet_classifier

from bench_guard import FAST_WIDTH, synthetic_bundle, world_model  # noqa: E402 (run from benchmarks/)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("resnet50", "worldnet"), default="resnet50")
    parser.add_argument("--mode", choices=("fast", "exact"), default="fast")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=12, help="operators listed per stage")
    parser.add_argument("--calls", type=int, default=1, help="profiled calls; times are per call (sum / calls)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--bundle", default=None, help="profile this bundle instead (--model, --mode ignored)")
    parser.add_argument("--trust-model-code", action="store_true", help="allow --bundle's entry-point model code")
    parser.add_argument("--native-kernels", action="store_true", help="the guard with the one-pass C kernel (semguard serve --native-kernels)")
    add_world_cache_flag(parser, "where a built world is read")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bundle:
        return profile_guard(Guard(read_bundle(args.bundle, trust_model_code=args.trust_model_code),
                                   native_kernels=args.native_kernels), args)
    if args.model == "worldnet":
        model, _, layers = world_model(args.world_cache)
        shape, classes = (3, 32, 32), 100
    else:
        model, layers, shape, classes = imagenet_classifier("resnet50").eval(), preset_layers("resnet50"), (3, 224, 224), 1000
    cfg = DetectorEvalConfig().detector
    if args.mode == "fast":
        cfg = dataclasses.replace(cfg, bank_max_width=FAST_WIDTH, bank_reduction="sketch")
    profile_guard(Guard(synthetic_bundle(model.eval(), layers, shape, classes, cfg), native_kernels=args.native_kernels), args)


def profile_guard(guard: Guard, args: argparse.Namespace) -> None:
    """Profile one warmed-up inspect_arrays call on random images; print the top operators per stage."""
    x = torch.rand(args.batch, *guard.info.input_shape, generator=torch.Generator().manual_seed(1))
    guard.inspect_arrays(x)  # warm-up: lazy caches
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(args.calls):  # more than one call: a shared machine's preemptions average out
            out = guard.inspect_arrays(x)
    what = args.bundle or f"{args.model} {args.mode}"
    print(f"{what} batch {args.batch}, torch threads {torch.get_num_threads()}; stage seconds "
          f"forward {out.timings.forward_s:.3f} signature {out.timings.signature_s:.3f} flagger {out.timings.flagger_s:.3f}")
    for stage in ("guard.forward", "guard.signature", "guard.density", "guard.flagger"):
        events = [e for e in prof.events() if _inside(e, stage)]
        total = sum(e.self_cpu_time_total for e in events) / args.calls
        by_name: dict[str, float] = {}
        for e in events:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.self_cpu_time_total / args.calls
        print(f"\n{stage}: {total / 1e3:.1f} ms self time per call ({args.calls} calls)")
        for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[: args.rows]:
            print(f"  {t / 1e3:9.2f} ms  {100 * t / max(total, 1e-9):5.1f}%  {name}")


def _inside(event, stage: str) -> bool:
    """Whether a profiler event ran inside the record_function range named `stage`."""
    parent = event
    while parent is not None:
        if parent.name == stage:
            return True
        parent = parent.cpu_parent
    return False


if __name__ == "__main__":
    main()
