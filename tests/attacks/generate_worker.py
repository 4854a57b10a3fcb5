"""Subprocess for the kill-and-resume tests: python -m tests.attacks.generate_worker OUT LOG SLEEP [RAY_ADDRESS].

Generates the tiny world's attack set into OUT, appending the number of every shard it
computes to LOG and sleeping SLEEP seconds after each, so the test can kill it mid-run.
With RAY_ADDRESS, the shards are attacked on that Ray cluster (attacks.distributed).
"""
import sys
import time

from semguard.attacks.generate import GenerateParams, generate_attack_set
from tests.attacks.tiny import tiny_world

PARAMS = GenerateParams(n_sources=8, targets_per_source=6, batch_size=6, iterations=5)


def main(out: str, log: str, sleep: float, ray_address: str | None = None) -> None:
    model, images, labels, names, vectors = tiny_world()

    def record(k: int) -> None:
        with open(log, "a") as f:
            f.write(f"{k}\n")
        time.sleep(sleep)

    if ray_address is None:
        generate_attack_set(model, images, labels, names, vectors, out, PARAMS, progress=False, on_shard=record)
    else:
        from semguard.attacks.distributed import RayParams, generate_attack_set_ray

        generate_attack_set_ray(model, images, labels, names, vectors, out, PARAMS, RayParams(ray_address, actors=2),
                                progress=False, on_shard=record)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), *sys.argv[4:5])


def start_and_kill(out, log, *extra: str) -> tuple[set[str], dict[str, int]]:
    """Run this worker in a subprocess and kill -9 it once a shard is in place and logged; returns the finished
    shards' file names and their modification times (a resumed run must not touch them)."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    from semguard.attacks.store import MANIFEST_FILE, SHARD_DIR, load_attack_set

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "tests.attacks.generate_worker", str(out), str(log), "0.4", *extra]
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        deadline = time.monotonic() + 120
        # a shard's manifest row is written before its number reaches the log: wait for both
        while not (out / MANIFEST_FILE).exists() or not (out / MANIFEST_FILE).read_text().count("\n") \
                or not Path(log).exists() or not Path(log).read_text().strip():
            assert proc.poll() is None, "worker exited before its first shard"
            assert time.monotonic() < deadline, "no shard within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    finished = {r.shard for r in load_attack_set(out)}
    n_shards = PARAMS.n_sources * PARAMS.targets_per_source // PARAMS.batch_size
    assert 1 <= len(finished) < n_shards, "the kill must land mid-run"
    return finished, {name: (out / SHARD_DIR / name).stat().st_mtime_ns for name in finished}
