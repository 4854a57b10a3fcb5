"""The guard's one pass over each tapped activation, as a small C kernel built at start-up (opt-in).

Eager torch reads a tapped activation four to five times for the fast mode's count sketch (sign
multiply, fold, row mean) and the Mahalanobis member's float64 channel means (a float64 copy, then
the mean): on resnet50 at batch 32 that is most of the guard's cost beyond its GEMMs. The kernel in
`native/reductions.c` reads each row once, in memory order, and gives the sketch's fold (float32,
each column summed in the eager fold's order), the row sum and the channel sums (float64).

`load_kernels()` compiles that source, which ships inside the package, with the machine's C
compiler (`$CC`, else `cc`; `-O3 -march=native`) into a fresh private temporary folder and loads
it from there: nothing is read from a cache another process could have written, and the build
takes well under a second. No compiler: `NativeUnavailable`, naming what is missing.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from importlib import resources

import torch

SOURCE = "native/reductions.c"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC")


class NativeUnavailable(RuntimeError):
    """The kernel could not be built here (no C compiler, or the build failed)."""


class NativeKernels:
    """The loaded kernel; `sketch_and_channel_means` is its one entry point."""

    def __init__(self, library: ctypes.CDLL) -> None:
        fn = library.semguard_sketch_channel_sums
        p, i = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i, i, p, i, i, p, p, p]
        fn.restype = None
        self._fn = fn

    def sketch_and_channel_means(self, acts: torch.Tensor, signs: torch.Tensor | None, dim: int,
                                 channels: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """acts (B, k) float32 on the CPU -> (fold (B, dim) float32 or None, row means (B,) float64,
        channel means (B, channels) float64 or None), in one read of acts.

        signs: (k,) float32 +-1 of the sketch, None for no sketch; channels: 0 for no channel means,
        else a divisor of k.
        """
        if acts.device.type != "cpu" or acts.dtype != torch.float32 or acts.ndim != 2:
            raise ValueError(f"the native pass takes (B, k) float32 CPU activations, got {acts.dtype} {tuple(acts.shape)} on {acts.device}")
        b, k = acts.shape
        if channels and k % channels:
            raise ValueError(f"channel_pool: {k} features do not split into {channels} channels")
        if signs is not None and (signs.dtype != torch.float32 or signs.shape != (k,) or dim < 1):
            raise ValueError(f"sketch signs must be ({k},) float32 with dim >= 1")
        x = acts.contiguous()
        fold = torch.empty(b, dim) if signs is not None else None
        sums = torch.empty(b, dtype=torch.float64)
        channel_sums = torch.empty(b, channels, dtype=torch.float64) if channels else None
        s = signs.contiguous() if signs is not None else None
        self._fn(x.data_ptr(), b, k, s.data_ptr() if s is not None else None, dim, channels,
                 fold.data_ptr() if fold is not None else None, sums.data_ptr(),
                 channel_sums.data_ptr() if channel_sums is not None else None)
        return fold, sums / k, channel_sums / (k // channels) if channels else None


def compiler() -> str | None:
    """The C compiler `load_kernels` uses: $CC, else `cc` on PATH; None if neither is found."""
    return shutil.which(os.environ.get("CC", "cc"))


@lru_cache(maxsize=1)
def load_kernels() -> NativeKernels:
    """Build and load the kernel once per process (NativeUnavailable when it cannot be built)."""
    cc = compiler()
    if cc is None:
        raise NativeUnavailable(f"no C compiler: {os.environ.get('CC', 'cc')!r} is not on PATH (set CC, or serve without --native-kernels)")
    source = resources.files("semguard.detector").joinpath(SOURCE)
    with tempfile.TemporaryDirectory(prefix="semguard-native-") as folder:  # mode 0700: this process's alone
        c_file, library = os.path.join(folder, "reductions.c"), os.path.join(folder, "reductions.so")
        with open(c_file, "wb") as f:
            f.write(source.read_bytes())
        done = subprocess.run([cc, *FLAGS, c_file, "-o", library], capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeUnavailable(f"{cc} could not build {SOURCE}: {done.stderr.strip()[-500:]}")
        return NativeKernels(ctypes.CDLL(library))  # the mapping outlives the deleted file
