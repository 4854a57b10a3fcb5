"""The decompression-heavy request: refused from its headers (--max-request-pixels) vs decoded in full
(what the service did before the budget), side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_budget.py [--copies 20] [--repeats 3]

The request is COPIES PNG files of 4096 x 4096 black pixels (~16 kB each on the wire, 16.8 Mpx each
once decoded). `decode.encoded_images` with the default budget opens every header and refuses; with
no budget it decodes and resizes every image to the model input (3 x 32 x 32). Pure function calls,
no server: the handler thread's CPU per request, which the server pays times its worker count.
"""
from __future__ import annotations

import argparse
import io
import platform
import time

from PIL import Image

from semguard.service import decode
from semguard.service.config import ServiceConfig
from semguard.service.errors import OverBudget

SIDE, SHAPE = 4096, (3, 32, 32)


def _seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    buf = io.BytesIO()
    Image.new("L", (SIDE, SIDE)).save(buf, format="PNG")
    files = [buf.getvalue()] * args.copies
    config = ServiceConfig()

    def refused() -> None:
        try:
            decode.encoded_images(files, SHAPE, config.max_image_pixels, "bench", config.max_request_pixels)
        except OverBudget:
            return
        raise SystemExit("--copies too small: the request fits the budget")

    def decoded() -> None:
        decode.encoded_images(files, SHAPE, config.max_image_pixels, "bench", None)

    a, b = _seconds(refused, args.repeats), _seconds(decoded, args.repeats)
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}; request: "
          f"{args.copies} PNGs x {SIDE}x{SIDE} ({len(files[0]) * args.copies / 1e6:.2f} MB, "
          f"{args.copies * SIDE * SIDE / 1e6:.0f} Mpx); best of {args.repeats}")
    print(f"{'refused from headers':<24}{a * 1e3:10.2f} ms")
    print(f"{'decoded in full':<24}{b * 1e3:10.2f} ms")
    print(f"{'ratio':<24}{b / a:10.0f} x")


if __name__ == "__main__":
    main()
