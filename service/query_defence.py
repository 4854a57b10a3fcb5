"""Stateful query defence: notice query-based black-box attacks by the near-duplicate queries they send.

A decision- or score-based attack (HopSkipJump, Square, SimBA, ...) learns the classifier's boundary
by sending thousands of images that differ from each other by small perturbations. Blacklight (Li et
al., USENIX Security 2022) catches them by fingerprinting every query and matching it against all
recent queries; this module follows it:

  fingerprint: pixels quantised to steps of `quant_step` of 255, flattened in (C, H, W) order, every
      run of `window` consecutive values hashed (salted, 64-bit); the `probe_hashes` largest distinct
      hashes are the query's probe, and the `n_hashes` largest of those its remembered fingerprint. The
      top hashes of a set are a bottom-k MinHash sketch of its windows: small perturbations leave most
      quantised windows unchanged, so an earlier near-copy's fingerprint lies mostly inside the probe (the
      longer probe keeps a hash that a few new windows push out of the top n_hashes); distinct images
      share none.
  match: a query matches when its probe holds >= `match_threshold` of an earlier query's fingerprint.

Why this design rather than a perceptual hash or an encoder's embedding (Chen, Carlini & Wagner 2020):
no model forward pass (a few numpy passes over the pixels: ~0.1 ms for 32x32), exact hash lookups in
an inverted index whose cost does not grow with the history (an embedding needs a nearest-neighbour
search), nothing differentiable to attack, and a per-server secret salt, so an attacker cannot compute
which windows decide the fingerprint (a public pHash can be steered).

Bounds (each query, each server): time O(probe_hashes) index work plus O(pixels) hashing; memory fixed
at start, about 104 bytes per remembered query with n_hashes 12 (service/query_index.py: fixed numpy arrays,
the last `history` queries, oldest forgotten), plus at most `max_clients` client states (least recently
seen evicted). Blacklight keeps 50 hashes per query; 12 keep 10 M queries within 1 GiB, and detect the
benchmark's attacks within the same number of queries (BENCHMARKS.md, "Query attacks", has the figures).

Answers never carry another client's state: a client's verdict counts only matches with its own
earlier queries. The index is shared, so matches across clients (the same attack spread over many
identities) are still found, but they reach only the operator (`QueryCheck.cross_client`, the
semguard_query_attack_matches_total{scope="cross_client"} metric): refusing or flagging on them would
tell a client whether someone else sent a near-copy of its image. Exact repeats of an image the client
sent before (a retry) are not matches: repeating a query teaches an attacker nothing.
"""
from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from semguard.service.config import QueryDefenceConfig
from semguard.service.query_index import QueryIndex



class QueryVerdict(NamedTuple):
    """What one image's answer may say: about this client's own queries only."""

    matched: bool        # shares >= match_threshold hashes with an earlier query of this client (not a repeat)
    overlap: int         # most of one own earlier query's fingerprint found in this probe (0..n_hashes)
    client_matches: int  # matches among this client's last suspect_window queries
    suspected: bool      # client_matches >= suspect_matches, or banned

    @property
    def flagged(self) -> bool:
        """Part of a suspected query attack: what block refuses, and the answers' QUERY_FLAG."""
        return self.matched and self.suspected


class QueryCheck(NamedTuple):
    verdicts: list[QueryVerdict]  # one per image
    refused: bool                 # the request is to be refused (block / ban)
    cross_client: int             # images matching another client's query: operator-only
    newly_suspected: bool         # this request made the client suspected
    newly_banned: bool


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014), elementwise on uint64: spreads the polynomial hash."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=16)
def _powers(base: int, n: int) -> np.ndarray:
    """(n,) uint64 base**0 .. base**(n-1) mod 2**64 (cached: one image size per server, read-only)."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    out = np.cumprod(out, dtype=np.uint64)
    out.flags.writeable = False
    return out


def hash_base(salt: int) -> int:
    """The salt's polynomial base: odd, hence invertible mod 2**64. A secret base, not a xor-ed salt,
    so that which windows make the top hashes cannot be computed without it."""
    return int(_splitmix64(np.array([salt], dtype=np.uint64))[0]) | 1


def window_hashes(images: np.ndarray, window: int, quant_step: int, salt: int) -> np.ndarray:
    """(B, L - window + 1) uint64 salted hashes of every window of the quantised, flattened images.

    images: (B, C, H, W) float in [0, 1], L = C*H*W. A polynomial rolling hash mod 2**64 with the
    salt's base P (Karp-Rabin), all windows at once: with G = cumsum(q_j * P^-j), window i is
    (G[i+w] - G[i]) * P^i = sum_t q_{i+t} P^-t, independent of where the window sits; then mixed.
    """
    base = hash_base(salt)
    flat = images.reshape(len(images), -1)
    if flat.shape[1] < window:
        raise ValueError(f"images have {flat.shape[1]} values, fewer than the hash window {window}")
    q = (np.clip(np.rint(flat * 255.0), 0, 255).astype(np.uint64) // np.uint64(quant_step)) + np.uint64(1)
    n = flat.shape[1]
    prefix = np.zeros((len(flat), n + 1), dtype=np.uint64)
    np.cumsum(q * _powers(pow(base, -1, 2**64), n), axis=1, dtype=np.uint64, out=prefix[:, 1:])
    h = (prefix[:, window:] - prefix[:, :-window]) * _powers(base, n - window + 1)
    return _splitmix64(h)


def fingerprints(images: np.ndarray, config: QueryDefenceConfig, salt: int) -> list[np.ndarray]:
    """Per image, its probe: the probe_hashes largest distinct window hashes, ascending (fewer for flat
    images); its last n_hashes are the fingerprint that is remembered."""
    hashes = window_hashes(images, config.window, config.quant_step, salt)
    n, out = config.probe_hashes, []
    for row in hashes:
        # a partial sort to 4n candidates is enough unless windows repeat a lot (flat images): then sort all
        top = np.unique(np.partition(row, len(row) - 4 * n)[-4 * n:]) if len(row) > 4 * n else np.unique(row)
        out.append(top[-n:] if len(top) >= n else np.unique(row)[-n:])
    return out


def digests(images: np.ndarray) -> list[int]:
    """64-bit digest of each image's exact pixels: a repeat (retry) has the same one."""
    return [int.from_bytes(hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=8).digest(), "little")
            for im in images]


class _Client:
    __slots__ = ("recent", "banned_until", "suspected")

    def __init__(self, window: int):
        self.recent: deque[bool] = deque(maxlen=window)  # matched?, per query
        self.banned_until = 0.0
        self.suspected = False


class QueryDefence:
    """The defence of one server: `check(images, client)` fingerprints, matches, records, decides. Thread-safe."""

    def __init__(self, config: QueryDefenceConfig, salt: int | None = None, clock=time.monotonic):
        self.config, self.clock = config, clock
        self.salt = int.from_bytes(np.random.default_rng().bytes(8), "little") if salt is None else salt
        self.index = QueryIndex(config.history, config.n_hashes)
        self._clients: OrderedDict[int, _Client] = OrderedDict()
        self._lock = threading.Lock()
        self.n_suspected = 0  # clients whose recent queries make them suspected (the metrics gauge)

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    def check(self, images: np.ndarray, client: str) -> QueryCheck:
        """Verdicts for images (B, C, H, W) float32 in [0, 1] sent by `client`; each image is remembered."""
        fps, dig = fingerprints(images, self.config, self.salt), digests(images)  # outside the lock
        owner = client_key(client)
        with self._lock:
            state = self._client(owner)
            now = self.clock()
            if 0 < state.banned_until <= now:  # a ban served: the client starts afresh
                state.recent.clear()
                state.banned_until, self.n_suspected = 0.0, self.n_suspected - state.suspected
                state.suspected = False
            was_suspected, was_banned = state.suspected, state.banned_until > now
            verdicts, cross = [], 0
            for fp, d in zip(fps, dig):
                own, other, repeat = self.index.lookup(fp, owner, d)
                matched = own >= self.config.match_threshold
                cross += other >= self.config.match_threshold
                state.recent.append(matched)
                n = sum(state.recent)
                state.suspected = n >= self.config.suspect_matches
                if state.suspected and self.config.mode == "ban" and not state.banned_until > now:
                    state.banned_until = now + self.config.ban_seconds
                if not repeat:
                    self.index.add(fp[-self.config.n_hashes:], owner, d)
                verdicts.append(QueryVerdict(matched, own, n, state.suspected or state.banned_until > now))
            banned = state.banned_until > now
            self.n_suspected += int(state.suspected) - int(was_suspected)
        refused = (self.config.mode in ("block", "ban") and any(v.flagged for v in verdicts)) \
            or (self.config.mode == "ban" and banned)
        return QueryCheck(verdicts, refused, cross, state.suspected and not was_suspected,
                          banned and not was_banned)

    def _client(self, owner: int) -> _Client:
        state = self._clients.get(owner)
        if state is None:
            state = self._clients[owner] = _Client(self.config.suspect_window)
            if len(self._clients) > self.config.max_clients:
                self.n_suspected -= self._clients.popitem(last=False)[1].suspected
        else:
            self._clients.move_to_end(owner)
        return state

    def remembered(self) -> int:
        return self.index.remembered()


def client_key(client: str) -> int:
    """64-bit key of a client identity (the identity itself, an API key perhaps, is not kept)."""
    return int.from_bytes(hashlib.blake2b(client.encode(), digest_size=8).digest(), "little")


def client_identity(peer: str, metadata: Sequence[tuple[str, str | bytes]], peer_identities: Sequence[bytes] | None,
                    metadata_key: str | None) -> str:
    """Who sent a request: the operator's metadata key (an API key header) when set and present, else the
    mTLS client certificate's identity, else the peer's address without its port (each connection has
    its own port). Prefixed by the source, so a header can never pose as a certificate."""
    if metadata_key:
        for key, value in metadata:
            if key == metadata_key:
                return "key:" + (value.decode(errors="replace") if isinstance(value, bytes) else value)
    if peer_identities:
        return "cert:" + b",".join(peer_identities).decode(errors="replace")
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 or peer.startswith("ipv4:") else peer
    return "peer:" + host
