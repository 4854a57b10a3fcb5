"""Subprocess for the kill-and-resume test: python -m tests.attacks.generate_worker OUT LOG SLEEP.

Generates the tiny world's attack set into OUT, appending the number of every shard it
computes to LOG and sleeping SLEEP seconds after each, so the test can kill it mid-run.
"""
import sys
import time

from semguard.attacks.generate import GenerateParams, generate_attack_set
from tests.attacks.tiny import tiny_world

PARAMS = GenerateParams(n_sources=8, targets_per_source=6, batch_size=6, iterations=5)


def main(out: str, log: str, sleep: float) -> None:
    model, images, labels, names, vectors = tiny_world()

    def record(k: int) -> None:
        with open(log, "a") as f:
            f.write(f"{k}\n")
        time.sleep(sleep)

    generate_attack_set(model, images, labels, names, vectors, out, PARAMS, progress=False, on_shard=record)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
