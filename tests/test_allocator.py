"""semguard.allocator: with freed memory kept, a freed large block is reused instead of faulted in again."""
import subprocess
import sys

import pytest

from semguard.cli import build_parser
from semguard.commands.serve import config_from_args

PROBE = """
import resource, sys, torch
from semguard.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(20):  # a 64 MiB activation made, written and freed, as a forward pass does per layer
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20).fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[10:]))  # the first passes settle the heap (freed blocks coalesce)
"""


def minor_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


def test_kept_memory_is_reused_without_page_faults():
    kept, with_keep = minor_faults("keep")
    if kept != "True":
        pytest.skip("no glibc mallopt here: keep_freed_memory changes nothing")
    _, default = minor_faults("default")
    assert default > 10 * 16384 * 0.9  # 64 MiB in 4 KiB pages, faulted in again on each of the 10 passes
    assert with_keep < default / 10, (with_keep, default)


def test_serve_keeps_freed_memory_unless_told():
    parse = build_parser().parse_args
    assert config_from_args(parse(["serve"]), environ={}).return_freed_memory is False
    assert config_from_args(parse(["serve", "--return-freed-memory"]), environ={}).return_freed_memory is True
    assert config_from_args(parse(["serve"]), environ={"SEMGUARD_RETURN_FREED_MEMORY": "1"}).return_freed_memory is True
