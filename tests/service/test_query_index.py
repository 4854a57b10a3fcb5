"""service/query_index.py against an exact, slow reference on random query streams."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from semguard.service.query_index import BUCKET, SLACK, QueryIndex


class Reference:
    """The last `history` queries in a list; a lookup compares against every one of them."""

    def __init__(self, history: int):
        self.queries: deque[tuple[int, int, set[int]]] = deque(maxlen=history)

    def lookup(self, probe: np.ndarray, owner: int, digest: int) -> tuple[int, int, bool]:
        own = other = 0
        repeat = False
        probe_set = set(probe.tolist())
        for q_owner, q_digest, stored in self.queries:
            shared = len(stored & probe_set)
            if not shared:
                continue
            if q_owner != owner:
                other = max(other, shared)
            elif q_digest == digest:
                repeat = True
            else:
                own = max(own, shared)
        return own, other, repeat

    def add(self, stored: np.ndarray, owner: int, digest: int) -> None:
        self.queries.append((owner, digest, set(stored.tolist())))


def random_stream(seed: int, n: int, n_bases: int = 6, probe: int = 48):
    """n queries (probe (probe,) uint64 ascending, owner, digest): near-copies of n_bases bases (some hashes
    swapped for fresh ones), distinct queries, and exact repeats, from 4 owners."""
    rng = np.random.default_rng(seed)
    bases = [rng.integers(0, 2**64, probe, dtype=np.uint64) for _ in range(n_bases)]
    previous: list[tuple[np.ndarray, int, int]] = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.1 and previous:
            yield previous[int(rng.integers(len(previous)))]
            continue
        hashes = bases[int(rng.integers(len(bases)))].copy() if kind < 0.8 else \
            rng.integers(0, 2**64, probe, dtype=np.uint64)
        swap = rng.random(probe) < rng.uniform(0, 0.8)
        hashes[swap] = rng.integers(0, 2**64, int(swap.sum()), dtype=np.uint64)
        query = (np.unique(hashes), int(rng.integers(4)), int(rng.integers(2**32)))
        previous.append(query)
        yield query


def replay(index: QueryIndex, reference: Reference, stream) -> tuple[list, list]:
    got, want = [], []
    for probe, owner, digest in stream:
        got.append(index.lookup(probe, owner, digest))
        want.append(reference.lookup(probe, owner, digest))
        if not want[-1][2]:
            index.add(probe[-index.n_hashes:], owner, digest)
            reference.add(probe[-index.n_hashes:], owner, digest)
    return got, want


@pytest.mark.parametrize("seed", range(3))
def test_with_room_in_every_bucket_lookups_equal_the_reference(seed):
    history = 40
    index = QueryIndex(history, 12, slack=BUCKET * 8)  # buckets never fill: no early loss
    got, want = replay(index, Reference(history), random_stream(seed, 600))
    for side in (0, 1):  # match counts
        assert sum(g[side] >= 6 for g in got) == sum(w[side] >= 6 for w in want)
    # a stranger's entry with the same 16 check bits in a probed bucket adds 1 now and then (~2**-16 per entry)
    assert sum(g != w for g, w in zip(got, want)) <= 0.01 * len(want)
    assert sum(w[0] >= 6 for w in want) > 100 and sum(w[1] >= 6 for w in want) > 100 and sum(w[2] for w in want) > 10
    assert index.remembered() == history


def test_at_the_served_size_match_counts_equal_the_reference():
    """Default slack: a bucket that overflows (Poisson) loses its oldest entries, which may drop a hash of an
    old query now and then; whether a query matches (6 of 12 shared) agrees with the reference on nearly
    every query, when no hash floods the index (many bases, each a few times in the history)."""
    history = 1000
    index = QueryIndex(history, 12)
    assert index.n_buckets * BUCKET == pytest.approx(history * 12 * SLACK, abs=BUCKET)
    got, want = replay(index, Reference(history), random_stream(7, 3000, n_bases=300))
    for side in (0, 1):
        matches = [g[side] >= 6 for g in got], [w[side] >= 6 for w in want]
        assert sum(matches[1]) > 300
        assert sum(a != b for a, b in zip(*matches)) <= 0.01 * sum(matches[1])
    assert [g[2] for g in got] == [w[2] for w in want]


def test_memory_is_fixed_at_start_and_about_104_bytes_per_remembered_query():
    index = QueryIndex(100_000, 12)
    before = index.nbytes
    assert before / 100_000 == pytest.approx(8 + 6 * 12 * SLACK, rel=0.01)
    rng = np.random.default_rng(0)
    for i in range(2000):
        index.add(rng.integers(0, 2**64, 12, dtype=np.uint64), i % 7, i)
    assert index.nbytes == before


def test_the_oldest_queries_are_forgotten():
    index = QueryIndex(5, 4, slack=BUCKET * 8)
    old = np.arange(1, 5, dtype=np.uint64) * np.uint64(2**40 + 12345)
    index.add(old, owner=1, digest=1)
    assert index.lookup(old, owner=1, digest=2) == (4, 0, False)
    assert index.lookup(old, owner=2, digest=2) == (0, 4, False)
    assert index.lookup(old, owner=1, digest=1) == (0, 0, True)
    for i in range(5):
        index.add(np.arange(10, 14, dtype=np.uint64) + np.uint64(i * 100), owner=1, digest=10 + i)
    assert index.lookup(old, owner=1, digest=2) == (0, 0, False)


def test_a_flooded_hash_keeps_its_latest_queries():
    """One hash in every query (a flat window many images share): its two buckets hold the latest 2 x BUCKET."""
    index = QueryIndex(1000, 2, slack=BUCKET * 8)
    flood = np.uint64(2**63 + 5)
    for i in range(100):
        index.add(np.array([flood, np.uint64(i + 1)], np.uint64), owner=i, digest=i)
    found = [index.lookup(np.array([flood, np.uint64(i + 1)], np.uint64), owner=1000, digest=0)[1]
             for i in range(100)]
    assert found == [1] * (100 - 2 * BUCKET) + [2] * (2 * BUCKET)
