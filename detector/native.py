"""The guard's native serving kernels: a small C file built at start-up (opt-in, `--native-kernels`).

Eager torch reads a tapped activation four to five times for the fast mode's count sketch (sign
multiply, fold, row mean) and the Mahalanobis member's float64 channel means (a float64 copy, then
the mean), and makes some 35 passes over the (L, B, M) float64 margins of the 1 vs 2 signature: on
resnet50 at batch 32 that is most of the guard's cost beyond its GEMMs. `native/reductions.c` reads
each activation row once, in memory order, for the sketch's fold (float32), the row sum and the
channel sums (float64), and computes the margins in one pass with the eager algebra's float64
operations in the eager order.

`load_kernels()` compiles that source, which ships inside the package, with the machine's C
compiler (`$CC`, else `cc`; `-O3 -march=native`) into a fresh private temporary folder and loads
it from there: nothing is read from a cache another process could have written, and the build
takes well under a second. No compiler: `NativeUnavailable`, naming what is missing.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib import resources

import torch

from semguard.detector.reference import LabelTerms
from semguard.detector.rsa import _ZERO_VARIANCE

SOURCE = "native/reductions.c"
# -ffp-contract=off: no fused multiply-adds, so the margins round as torch's float64 ops do
FLAGS = ("-O3", "-march=native", "-fno-fast-math", "-fopenmp-simd", "-ffp-contract=off", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120


class NativeUnavailable(RuntimeError):
    """The kernel could not be built here (no C compiler, or the build failed)."""


class NativeKernels:
    """The loaded kernels: `sketch_and_channel_means` (per activation) and `one_vs_two_margins` (per batch)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        self._sketch = library.semguard_sketch_channel_sums
        self._sketch.argtypes = [p, i, i, p, i, i, p, p, p]
        self._sketch.restype = None
        self._margins = library.semguard_one_vs_two_margins
        self._margins.argtypes = [p, p, p, p, i, i, i, i, i, p, p, p, p, p, p, d, p]
        self._margins.restype = None
        self._executor: ThreadPoolExecutor | None = None
        self._workers = 0  # the executor's thread count

    def map(self, fn, items: list) -> list:
        """[fn(item)] on torch's intra-op thread count: a kernel call releases the GIL (ctypes), so calls on
        different layers run side by side; each call's arithmetic is the same on any number of threads."""
        threads = torch.get_num_threads()
        if threads <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._workers != threads:  # first use, or torch's thread count changed
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._executor = ThreadPoolExecutor(threads, thread_name_prefix="semguard-native")
            self._workers = threads
        return list(self._executor.map(fn, items))

    def one_vs_two_margins(self, profiles: torch.Tensor, predicted: torch.Tensor, terms: LabelTerms,
                           alternatives: torch.Tensor) -> torch.Tensor:
        """`signature.one_vs_two_margins` in one pass over the (L, B, M) margins: the same float64 operations
        in the same order, so the same bits except where torch's vectorised sqrt is not correctly rounded
        (1 ulp, rarely); no gradient. Arguments as there, on the CPU."""
        tensors = (profiles, predicted, alternatives, *terms)
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError("the native margins take CPU tensors")
        i = profiles.double().contiguous()
        layers, b, k = i.shape
        c, m = terms.profiles.shape[0], alternatives.shape[1]
        if predicted.shape != (b,) or alternatives.shape[0] != b or terms.profiles.shape[1] != k:
            raise ValueError(f"profiles {tuple(i.shape)}, predicted {tuple(predicted.shape)}, alternatives "
                             f"{tuple(alternatives.shape)} and label profiles {tuple(terms.profiles.shape)} "
                             "do not match")
        if terms.padded.shape != (c, k + 1) or any(t.shape != (c,) for t in (terms.sums, terms.squares, terms.position)):
            raise ValueError(f"label terms must be D ({c}, {k}) padded to ({c}, {k + 1}) with ({c},) sums, squares and "
                             "positions (`reference.label_terms`)")
        if terms.position.numel() and (int(terms.position.min()) < 0 or int(terms.position.max()) > k):
            raise ValueError(f"label positions must lie in [0, {k}]")
        labels = torch.cat([predicted.reshape(-1), alternatives.reshape(-1)])
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):  # the C code indexes with them
            raise ValueError(f"predicted and alternative labels must lie in [0, {c})")
        g = (i @ terms.profiles.T).contiguous()  # (L, B, C), as the eager algebra makes it
        sums, squares = i.sum(-1).contiguous(), (i * i).sum(-1).contiguous()
        p, a = predicted.long().contiguous(), alternatives.long().contiguous()
        pos, dpad = terms.position.long().contiguous(), terms.padded.double().contiguous()
        dsum, dsq = terms.sums.double().contiguous(), terms.squares.double().contiguous()
        out = torch.empty(layers, b, m, dtype=torch.float64)

        def span(first_last: tuple[int, int]) -> None:  # layers [first, last): every array is layer-major
            first, last = first_last
            f8 = 8 * first * b  # bytes before the first layer's rows, per float64 per row-width
            self._margins(i.data_ptr() + f8 * k, sums.data_ptr() + f8, squares.data_ptr() + f8, g.data_ptr() + f8 * c,
                          last - first, b, k, c, m, p.data_ptr(), a.data_ptr(), pos.data_ptr(), dpad.data_ptr(),
                          dsum.data_ptr(), dsq.data_ptr(), _ZERO_VARIANCE, out.data_ptr() + f8 * m)
        parts = min(layers, torch.get_num_threads())
        bounds = [layers * j // parts for j in range(parts + 1)] if parts else [0, 0]
        self.map(span, [(bounds[j], bounds[j + 1]) for j in range(len(bounds) - 1)])
        return out

    def sketch_and_channel_means(self, acts: torch.Tensor, signs: torch.Tensor | None, dim: int,
                                 channels: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """acts (B, k) float32 on the CPU -> (fold (B, dim) float32 or None, row means (B,) float64,
        channel means (B, channels) float64 or None), in one read of acts.

        signs: (k,) float32 +-1 of the sketch, None for no sketch; channels: 0 for no channel means,
        else a divisor of k.
        """
        if acts.device.type != "cpu" or acts.dtype != torch.float32 or acts.ndim != 2:
            raise ValueError(f"the native pass takes (B, k) float32 CPU activations, "
                             f"got {acts.dtype} {tuple(acts.shape)} on {acts.device}")
        b, k = acts.shape
        if channels and k % channels:
            raise ValueError(f"channel_pool: {k} features do not split into {channels} channels")
        if signs is not None and (signs.dtype != torch.float32 or signs.shape != (k,) or signs.device.type != "cpu"
                                  or dim < 1):
            raise ValueError(f"sketch signs must be ({k},) float32 on the CPU with dim >= 1")
        x = acts.contiguous()
        fold = torch.empty(b, dim, dtype=torch.float32) if signs is not None else None  # what the C code writes
        sums = torch.empty(b, dtype=torch.float64)
        channel_sums = torch.empty(b, channels, dtype=torch.float64) if channels else None
        s = signs.contiguous() if signs is not None else None
        self._sketch(x.data_ptr(), b, k, s.data_ptr() if s is not None else None, dim, channels,
                     fold.data_ptr() if fold is not None else None, sums.data_ptr(),
                     channel_sums.data_ptr() if channel_sums is not None else None)
        return fold, sums / k, channel_sums / (k // channels) if channels else None


def compiler() -> list[str] | None:
    """The C compiler command `load_kernels` runs: $CC (which may carry arguments, e.g. "ccache gcc"), else
    `cc`; None if its program is not on PATH."""
    argv = shlex.split(os.environ.get("CC") or "cc")
    program = shutil.which(argv[0]) if argv else None
    return [program, *argv[1:]] if program else None


@lru_cache(maxsize=1)
def load_kernels() -> NativeKernels:
    """Build and load the kernels once per process (NativeUnavailable when they cannot be built or loaded)."""
    cc = compiler()
    if cc is None:
        raise NativeUnavailable(f"no C compiler: {os.environ.get('CC') or 'cc'!r} is not on PATH "
                                "(set CC, or serve without --native-kernels)")
    source = resources.files("semguard.detector").joinpath(SOURCE)
    try:
        with tempfile.TemporaryDirectory(prefix="semguard-native-") as folder:  # mode 0700: this process's alone
            c_file, library = os.path.join(folder, "reductions.c"), os.path.join(folder, "reductions.so")
            with open(c_file, "wb") as f:
                f.write(source.read_bytes())
            done = subprocess.run([*cc, *FLAGS, c_file, "-o", library, "-lm"], capture_output=True, text=True,
                                  errors="replace", timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                raise NativeUnavailable(f"{' '.join(cc)} could not build {SOURCE}: {done.stderr.strip()[-500:]}")
            return NativeKernels(ctypes.CDLL(library))  # the mapping outlives the deleted file
    except (OSError, subprocess.TimeoutExpired) as e:  # no temp space, a noexec mount, a foreign-architecture build
        raise NativeUnavailable(f"{' '.join(cc)}: the kernels of {SOURCE} could not be built and loaded: {e}") from None
