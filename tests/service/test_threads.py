"""service.server.inference_threads: the guard's intra-op pool sized to the CPUs the process may use."""
import os

import pytest

from semguard.service.server import inference_threads


def test_a_requested_count_wins(tmp_path):
    assert inference_threads(3, tmp_path / "absent") == 3


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity mask on this platform")
@pytest.mark.parametrize("cpu_max,limit", [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1),
                                           ("garbage", None)])
def test_the_default_is_the_affinity_mask_capped_by_the_cgroup_quota(tmp_path, cpu_max, limit):
    (tmp_path / "cpu.max").write_text(cpu_max)
    cpus = len(os.sched_getaffinity(0))
    assert inference_threads(None, tmp_path / "cpu.max") == (cpus if limit is None else min(cpus, limit))
    assert inference_threads(None, tmp_path / "absent") == cpus
