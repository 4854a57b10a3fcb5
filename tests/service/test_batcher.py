"""DynamicBatcher: merging, ordering, deadlines, load shedding, error isolation, drain on close."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from semguard.service.batcher import BatcherClosed, DeadlineExceeded, DynamicBatcher, QueueFull


def images(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1, 1, 1)  # value = image id


class Recorder:
    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[int] = []
        self.gate = gate

    def __call__(self, x: np.ndarray) -> list[float]:
        if self.gate is not None:
            self.gate.wait(10)
        if (x < 0).any():
            raise ValueError("negative image")
        self.batches.append(len(x))
        return [float(v) for v in x.ravel()]


def run_concurrently(batcher, requests):
    results = [None] * len(requests)

    def work(i):
        try:
            results[i] = batcher.infer(requests[i])
        except Exception as exc:
            results[i] = exc
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_requests_are_merged_and_answered_in_order():
    gate = threading.Event()
    rec = Recorder(gate)
    b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=0.2, max_queue_images=100)
    reqs = [images(2, 10 * i) for i in range(4)]
    timer = threading.Timer(0.3, gate.set)
    timer.start()
    results = run_concurrently(b, reqs)
    assert results == [[10.0 * i, 10.0 * i + 1] for i in range(4)]
    assert sum(rec.batches) == 8 and len(rec.batches) < 4  # at least one merge
    b.close()


def test_large_request_is_chunked_and_batch_size_one_never_merges():
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch_size=1, max_queue_delay_s=0.0, max_queue_images=100)
    assert b.infer(images(3)) == [0.0, 1.0, 2.0]
    assert rec.batches == [1, 1, 1]
    b.close()


def test_bad_request_does_not_fail_its_batch_mates():
    gate = threading.Event()
    b = DynamicBatcher(Recorder(gate), max_batch_size=8, max_queue_delay_s=0.2, max_queue_images=100)
    threading.Timer(0.3, gate.set).start()
    results = run_concurrently(b, [images(1, 5), -images(1, 1), images(1, 7)])
    assert results[0] == [5.0] and results[2] == [7.0] and isinstance(results[1], ValueError)
    b.close()


def test_deadline_queue_limit_and_close():
    gate = threading.Event()
    b = DynamicBatcher(Recorder(gate), max_batch_size=1, max_queue_delay_s=0.0, max_queue_images=3)
    blocker = threading.Thread(target=b.infer, args=(images(1),))
    blocker.start()  # occupies the worker until the gate opens
    time.sleep(0.1)
    with pytest.raises(DeadlineExceeded):
        b.infer(images(1), deadline=time.monotonic() + 0.05)
    with pytest.raises(QueueFull, match="queue full"):
        b.infer(images(4))
    gate.set()
    blocker.join(10)
    b.close()
    with pytest.raises(BatcherClosed):
        b.infer(images(1))


def test_observer_sees_batches_and_queue():
    seen: dict[str, list[float]] = {}
    b = DynamicBatcher(Recorder(), 4, 0.0, 10, observe=lambda e, v: seen.setdefault(e, []).append(v))
    b.infer(images(3))
    b.close()
    assert seen["batch_size"] == [3] and seen["queue_depth"][-1] == 0 and len(seen["queue_seconds"]) == 1


def test_an_idle_batcher_runs_at_once_a_busy_one_waits_for_company():
    gate = threading.Event()
    rec = Recorder(gate)
    b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=30.0, max_queue_images=100)
    gate.set()
    # alone on an idle batcher: not held for the 30 s delay (the deadline would expire first)
    assert b.infer(images(1), deadline=time.monotonic() + 5) == [0.0]
    gate.clear()
    first = threading.Thread(target=b.infer, args=(images(1),))
    first.start()  # runs at once, and holds the worker at the gate
    time.sleep(0.1)
    results = [None] * 2

    def later(i: int) -> None:
        results[i] = b.infer(images(4, 10 * (i + 1)))
    waiting = [threading.Thread(target=later, args=(i,)) for i in range(2)]
    for t in waiting:
        t.start()
    time.sleep(0.1)
    gate.set()  # the two that queued meanwhile fill a batch of 8 together rather than run at once
    for t in [first, *waiting]:
        t.join(10)
    assert rec.batches == [1, 1, 8] and results == [[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]]
    b.close()
