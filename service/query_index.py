"""The query defence's memory: the last `history` queries' fingerprints, in a few fixed numpy arrays.

A set-associative hash table with no deletions. Each remembered query q gets a sequence number
seq(q) = 1, 2, 3, ... and a ring slot seq % history, which holds its owner and the digest of its exact
pixels (uint32 each). Each of its `n_hashes` stored hashes h has two buckets (two choices: h's low bits
and a multiplicative hash's, mod n_buckets) and goes to one as an entry (seq, 16 bits of h): 6 bytes, written
over the oldest entry of the two buckets; a lookup reads both. An entry is live while its query is
among the last `history` queries (0 <= newest seq - seq < history); nothing is ever deleted, so adding a
query costs n_hashes bucket writes and no eviction work, and the memory is fixed at start:

    bytes per remembered query = 8 (ring) + 6 x n_hashes x SLACK        (n_hashes 12: 104 B, 0.97 GiB per 10 M)

Lossy in two bounded ways, both measured against an exact reference in tests/service/test_query_index.py:
two buckets holding more than 2 x BUCKET live entries (mean BUCKET / SLACK each) lose their oldest early
(the oldest queries lose a hash now and then, the recent ones that an attack matches do not), and a lookup
can count a stranger's entry whose 16 check bits and bucket agree by chance (about 2**-16 per entry probed).
A flood of one hash (a flat window many images share) fills only its own bucket. The sequence number is
32-bit: after 2**32 - 1 queries the index starts afresh (at 10 k queries/s, every 5 days).
"""
from __future__ import annotations

import numpy as np

BUCKET = 16        # entries per bucket
SLACK = 4 / 3      # buckets x BUCKET = SLACK x history x n_hashes
_SEQ_LIMIT = 2**32 - 1


class QueryIndex:
    """Remember queries (their stored hashes, owner, digest) and find the remembered ones sharing hashes."""

    def __init__(self, history: int, n_hashes: int, slack: float = SLACK):
        self.history, self.n_hashes = history, n_hashes
        self.n_buckets = max(1, -(-int(history * n_hashes * slack) // BUCKET))
        self._clear()

    def _clear(self) -> None:
        self._seq = np.zeros((self.n_buckets, BUCKET), np.uint32)    # 0 = never written
        self._check = np.zeros((self.n_buckets, BUCKET), np.uint16)
        self._owner = np.zeros(self.history, np.uint32)
        self._digest = np.zeros(self.history, np.uint32)
        self.count = 0  # queries added (the newest one's seq)

    @property
    def nbytes(self) -> int:
        return self._seq.nbytes + self._check.nbytes + self._owner.nbytes + self._digest.nbytes

    def remembered(self) -> int:
        return min(self.count, self.history)

    def _entries(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(m,) uint64 hashes -> (m, 2) its two bucket rows, (m,) uint16 check bits."""
        nb = np.uint64(self.n_buckets)
        second = (hashes * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(16)  # other bits than the first's
        rows = np.stack([hashes % nb, second % nb], axis=1).astype(np.intp)
        return rows, (hashes >> np.uint64(32)).astype(np.uint16)  # bits 32-47: uniform even in a top-k

    def lookup(self, hashes: np.ndarray, owner: int, digest: int) -> tuple[int, int, bool]:
        """(most of a remembered query's stored hashes among `hashes` (m,) uint64 distinct, over this owner's
        queries that are not this exact image; the same over other owners' queries; whether this owner sent
        this exact image, a query with the same digest that shares hashes, before)."""
        rows, check = self._entries(hashes)
        seq = self._seq[rows].reshape(len(rows), -1)                 # (m, 2 x BUCKET)
        age = np.uint32(self.count % 2**32) - seq                    # uint32: wraps like the seqs
        hit = (self._check[rows].reshape(len(rows), -1) == check[:, None]) & (age < min(self.count, self.history))
        hit[:, BUCKET:] &= (rows[:, 0] != rows[:, 1])[:, None]       # one bucket twice: read it once
        if not hit.any():
            return 0, 0, False
        seqs, counts = np.unique(seq[hit], return_counts=True)
        slots = seqs % self.history
        own = self._owner[slots] == np.uint32(owner & 0xFFFFFFFF)
        repeat = own & (self._digest[slots] == np.uint32(digest & 0xFFFFFFFF))
        return (int(counts[own & ~repeat].max(initial=0)), int(counts[~own].max(initial=0)), bool(repeat.any()))

    def add(self, hashes: np.ndarray, owner: int, digest: int) -> None:
        """Remember one query: its stored hashes (n,) uint64 (n <= n_hashes), owner and digest."""
        if self.count >= _SEQ_LIMIT:
            self._clear()
        self.count += 1
        seq = np.uint32(self.count)
        slot = self.count % self.history
        self._owner[slot], self._digest[slot] = owner & 0xFFFFFFFF, digest & 0xFFFFFFFF
        rows, check = self._entries(hashes)
        for pair, c in zip(rows, check.tolist()):  # one at a time: two hashes may share a bucket
            at = int(np.argmax(seq - self._seq[pair]))  # the oldest entry of both (never written: seq 0, oldest)
            row, col = pair[at // BUCKET], at % BUCKET
            self._seq[row, col], self._check[row, col] = seq, c
