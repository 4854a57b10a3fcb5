"""Attackers who only have the API: black-box query attacks through `semguard serve`, and the query defence.

    python benchmarks/query_attacks.py [--images 3] [--max-queries 600] [--benign-clients 100]

The embedded world's bundle (runs/quickstart/bundle) served in this process on loopback ports (real gRPC,
tritonclient clients); correctly classified test images, seeded targets. Every attack query is a
ModelInfer request (attacks/query.py). Servers (conditions):

  bare             --policy annotate, query defence off; the attacker ignores the guard's FLAG
  guard annotate   same server; an answer the guard flags is a failure to the attacker (it wants both)
  guard block      --policy block: flagged images are refused
  defence          --policy annotate --query-defence block; the attacker ignores the FLAG (the query
                   defence alone)
  guard + defence  same server; the attacker must also evade the FLAG

Also: benign client streams through the defence (service/query_defence.py, the served code, without
gRPC): distinct images, retries, JPEG re-encodes, crops, video-like frames; adaptive attackers against
the defence (query blinding, queries spread over identities); the defence's cost per query and memory.
Writes runs/query_attacks/query_attacks.json and prints the tables (BENCHMARKS.md "Query attacks").
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import platform
import statistics
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semguard.evaluation.adaptive_eval import wilson_interval
from semguard.attacks.query import (QUERY_ATTACKS, Answer, Endpoint, QueryAttackParams, _Oracle, attack_one,
                                    plan_from_model, plan_images, run_query_attacks)
from semguard.config_flags import add_world_cache_flag
from semguard.service.config import QueryDefenceConfig, ServiceConfig
from semguard.service.query_defence import QueryDefence, digests, fingerprints
from semguard.service.server import create_server, load_guard
from semguard.world.inputs import load_world_inputs

KEY = "x-api-key"
BASE = ServiceConfig(grpc_port=0, metrics_port=None, max_queue_delay_ms=0.0, torch_threads=1,
                     query_client_key=KEY)
SERVERS = {"annotate": BASE, "block": replace(BASE, policy="block"),
           "defence": replace(BASE, query=QueryDefenceConfig(mode="block")),
           "adaptive": replace(BASE, query=QueryDefenceConfig(mode="block"))}  # its own index: no earlier runs' queries
CONDITIONS = {  # name -> (server, evade_guard)
    "bare": ("annotate", False), "guard annotate": ("annotate", True), "guard block": ("block", True),
    "defence": ("defence", False), "guard + defence": ("defence", True)}
RUNS = [("hopskipjump", False), ("hopskipjump", True), ("signopt", False), ("square", False), ("simba", False)]
SCORES = {"square", "simba"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="runs/quickstart/bundle")
    add_world_cache_flag(p, "the embedded world whose test images are attacked")
    p.add_argument("--images", type=int, default=3, help="attacked images per attack and condition")
    p.add_argument("--max-queries", type=int, default=600, help="query budget per attacked image (issue: 10k)")
    p.add_argument("--attacks", default=",".join(f"{a}{'+t' if t else ''}" for a, t in RUNS),
                   help="comma list; NAME+t = targeted")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="comma list of the attack table's conditions")
    p.add_argument("--adaptive", default=",".join(ADAPTIVE), help=f"comma list of adaptive attackers: {list(ADAPTIVE)}")
    p.add_argument("--defence", default="", help="k=v,... QueryDefenceConfig fields for the offline sections "
                   "(benign, progression), e.g. n_hashes=50,probe_hashes=50,match_threshold=25 (Blacklight's)")
    p.add_argument("--benign-clients", type=int, default=100, help="clients per benign stream (20 queries each)")
    p.add_argument("--cost-queries", default="100000,1000000", help="comma list: queries remembered for the cost "
                   "figures (time per check, memory per query)")
    p.add_argument("--sections", default="benign,progression,cost,latency,attacks,adaptive", help="comma list of what to run")
    p.add_argument("--out", default="runs/query_attacks/query_attacks.json")
    return p


def defence_overrides(text: str) -> dict:
    """--defence "n_hashes=50,match_threshold=25" -> {"n_hashes": 50, "match_threshold": 25}."""
    fields = {f.name: f.type for f in dataclasses.fields(QueryDefenceConfig)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in fields or key == "mode":
            raise SystemExit(f"--defence: unknown field {key!r}; known: {sorted(set(fields) - {'mode'})}")
        out[key] = float(value) if key == "ban_seconds" else int(value)
    return out


def rate(k: int, n: int) -> dict:
    return {"k": k, "n": n, "rate": k / n if n else None, "wilson95": wilson_interval(k, n) if n else None}


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def attack_table(servers: dict, model, world, runs, args, tmp: Path) -> list[dict]:
    rows = []
    for attack, targeted in runs:
        for condition, (server, evade) in CONDITIONS.items():
            if condition not in args.conditions.split(","):
                continue
            params = QueryAttackParams(attack=attack, targeted=targeted, max_queries=args.max_queries,
                                       answers="scores" if attack in SCORES else "label", evade_guard=evade,
                                       n_images=args.images, client_header=KEY,
                                       client_id=f"{attack}-{targeted}-{condition}")
            rows.append(run_condition(servers[server], model, world, params, condition, tmp))
            print_row(rows[-1])
    return rows


def run_condition(port: int, model, world, params: QueryAttackParams, condition: str, tmp: Path,
                  label: str | None = None) -> dict:
    plan = plan_from_model(model, world.test_images, world.test_labels, params)
    inits = dict(zip(plan.inits, plan_images(world.test_images, [i for i in plan.inits if i >= 0])))
    endpoint = Endpoint(f"127.0.0.1:{port}", "worldnet", KEY)
    start = time.perf_counter()
    try:
        result = run_query_attacks(endpoint, plan_images(world.test_images, plan.indices), plan, params,
                                   Path(tempfile.mkdtemp(dir=tmp)), init_images=inits)
    finally:
        endpoint.close()
    r = result.rows
    wins = sum(x["success"] for x in r)
    return {"attack": params.attack, "targeted": params.targeted, "condition": condition, "variant": label,
            "success": rate(wins, len(r)),
            "median_queries_to_success": median(x["queries_to_success"] for x in r),
            "detected": rate(sum(x["queries_to_detection"] is not None for x in r), len(r)),
            "median_queries_to_detection": median(x["queries_to_detection"] for x in r),
            "queries": sum(x["queries"] for x in r), "refused": sum(x["refused"] for x in r),
            "final_flagged": sum(bool(x["final_flagged"]) for x in r),
            "seconds": round(time.perf_counter() - start, 1)}


def print_row(row: dict) -> None:
    s, d = row["success"], row["detected"]
    name = f"{row['attack']}{' targeted' if row['targeted'] else ''}{' ' + row['variant'] if row['variant'] else ''}"
    print(f"  {name:<34}{row['condition']:<16}success {s['k']}/{s['n']} [{s['wilson95'][0]:.2f}, "
          f"{s['wilson95'][1]:.2f}]  med q {row['median_queries_to_success']}  detected {d['k']}/{d['n']} "
          f"med q {row['median_queries_to_detection']}  ({row['queries']} queries, {row['refused']} refused, "
          f"{row['seconds']} s)", flush=True)


# ---- benign streams: the served defence code, without gRPC ------------------------------------------

def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray((x.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32).transpose(2, 0, 1) / 255


def _crop(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c, h, w = x.shape
    size = int(rng.integers(26, 31))
    top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    crop = (x[:, top:top + size, left:left + size].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255


def benign_stream(kind: str, images: np.ndarray, rng: np.random.Generator, n: int = 20) -> list[np.ndarray]:
    """One benign client's n queries (C, H, W) of `kind`, from its own distinct images."""
    if kind == "distinct":
        return list(images[:n])
    if kind == "video":  # one scene, 1-pixel pan per frame and slow brightness drift
        x = images[0]
        return [np.clip(np.roll(x, t, axis=2) * (1 + 0.005 * t), 0, 1).astype(np.float32) for t in range(n)]
    twin = {"retry": lambda x: x, "jpeg": lambda x: _jpeg(x, int(rng.choice([95, 90, 75]))),
            "crop": lambda x: _crop(x, rng)}[kind]
    return [v for x in images[:n // 2] for v in (x, twin(x))]  # each image, then its retry / re-encode / crop


def benign_rates(images: np.ndarray, clients: int, config: QueryDefenceConfig) -> list[dict]:
    """Per stream kind: clients ever suspected (one defence per kind, clients interleaved round-robin)."""
    out = []
    for kind in ("distinct", "retry", "jpeg", "crop", "video"):
        rng = np.random.default_rng(0)
        defence = QueryDefence(config, salt=1)
        per = 20 if kind in ("distinct", "video") else 10
        streams = [benign_stream(kind, images[rng.choice(len(images), per, replace=False)], rng)
                   for _ in range(clients)]
        flagged, matches = set(), 0
        for t in range(max(map(len, streams))):
            for c, stream in enumerate(streams):
                if t < len(stream):
                    v = defence.check(stream[t][None], f"client-{c}").verdicts[0]
                    matches += v.matched
                    if v.suspected:
                        flagged.add(c)
        out.append({"stream": kind, "queries_per_client": len(streams[0]),
                    "clients_flagged": rate(len(flagged), clients), "own_matches": matches})
        print(f"  benign {kind:<9} clients flagged {len(flagged)}/{clients}, own matches {matches}", flush=True)
    return out


class _LocalEndpoint:
    """The model in this process as an Endpoint (no guard, no defence): records every query, for replay."""

    def __init__(self, model, n_classes: int):
        self.model, self.n_classes, self.log = model, n_classes, []

    def ask(self, image: np.ndarray, client_id: str | None = None, scores: bool = False) -> Answer:
        self.log.append(image.copy())
        with torch.no_grad():
            p = torch.softmax(self.model(torch.from_numpy(image[None])), 1)[0].numpy()
        return Answer(int(p.argmax()), p if scores else None, False, False, False)


def _match_pattern(frames: list[np.ndarray], config: QueryDefenceConfig) -> tuple[list[int], list[int]]:
    """Per frame after the first: how many earlier frames it matches (exact, by fingerprints; an exact
    repeat of a frame is no match, as in the defence), and the overlap with its closest earlier frame."""
    fps, dig = fingerprints(np.stack(frames), config, salt=1), digests(np.stack(frames))
    n, best = [], []
    for t in range(1, len(fps)):
        shared = [np.intersect1d(fps[j][-config.n_hashes:], fps[t]).size if dig[j] != dig[t] else 0
                  for j in range(t)]
        n.append(sum(k >= config.match_threshold for k in shared))
        best.append(max(shared))
    return n, best


def _queries_to_detection(frames: list[np.ndarray], config: QueryDefenceConfig) -> int | None:
    defence = QueryDefence(replace(config, mode="annotate"), salt=1)
    return next((t + 1 for t, x in enumerate(frames) if defence.check(x[None], "a").verdicts[0].flagged), None)


def progression(model, world, clean: np.ndarray, config: QueryDefenceConfig, n: int = 20, record: int = 40) -> dict:
    """How matches progress over a client's first n queries: benign video-like streams (100 clients) vs
    the attacks (3 images each, recorded through the model in this process, the same queries they send
    through the service until the defence first answers). Can a rule on the pattern tell them apart?
    Also each recorded attack's queries to detection (its first `record` queries replayed through the
    defence), so fingerprint settings can be compared without the service."""
    out, detection = {}, {}
    rng = np.random.default_rng(0)
    video = [_match_pattern(benign_stream("video", clean[rng.choice(len(clean), 20, replace=False)], rng, n), config)
             for _ in range(100)]
    out["video"] = video
    for attack, targeted in RUNS:
        params = QueryAttackParams(attack=attack, targeted=targeted, max_queries=record, n_images=3, evade_guard=False,
                                   answers="scores" if attack in SCORES else "label")
        plan = plan_from_model(model, world.test_images, world.test_labels, params)
        images = plan_images(world.test_images, plan.indices)
        runs = []
        for j in range(3):
            endpoint = _LocalEndpoint(model, int(model(torch.from_numpy(images[:1])).shape[1]))
            init = plan_images(world.test_images, [plan.inits[j]])[0] if targeted else None
            with _never_succeeds():
                attack_one(endpoint, params, images[j], plan.labels[j], plan.targets[j], init,
                           np.random.default_rng(j))
            runs.append(_match_pattern(endpoint.log[:n], config))
            detection.setdefault(f"{attack}{' targeted' if targeted else ''}", []).append(
                _queries_to_detection(endpoint.log, config))
        out[f"{attack}{' targeted' if targeted else ''}"] = runs
    summary = {}
    for name, runs in out.items():
        counts = np.array([c for r in runs for c in r[0]])
        summary[name] = {"mean_earlier_matched": float(counts.mean()),
                         "share_matching_2plus_earlier": float((counts >= 2).mean()),
                         "clients_with_3_frames_matching_2plus": sum(sum(c >= 2 for c in r[0]) >= 3 for r in runs),
                         "clients": len(runs),
                         "median_best_overlap_by_query": [float(np.median([r[1][t] for r in runs]))
                                                          for t in range(n - 1)]}
        s = summary[name]
        s["queries_to_detection"] = detection.get(name)
        print(f"  {name:<22} mean earlier queries matched {s['mean_earlier_matched']:.2f}, queries matching >= 2 "
              f"earlier {s['share_matching_2plus_earlier']:.2f}, clients with >= 3 such "
              f"{s['clients_with_3_frames_matching_2plus']}/{s['clients']}; median best overlap per query "
              f"{[int(v) for v in s['median_best_overlap_by_query'][:14]]}"
              + (f"; queries to detection {s['queries_to_detection']}" if name in detection else ""), flush=True)
    return summary


@contextlib.contextmanager
def _never_succeeds():
    """The oracle never counts an answer adversarial: the attack runs its whole budget (for recording)."""
    saved = _Oracle._adversarial
    _Oracle._adversarial = lambda self, a: False
    try:
        yield
    finally:
        _Oracle._adversarial = saved


def cost(images: np.ndarray, remembered: int, timed: int = 2000) -> dict:
    """A defence remembering `remembered` queries (history = remembered, filled with random fingerprints),
    then the check time per image (p50/p99) of `timed` distinct noisy images from 1000 clients. Memory:
    the index's arrays (fixed at start), and tracemalloc over building the defence and its first 10 k
    queries (the arrays, allocated at once, and nothing that grows)."""
    config = QueryDefenceConfig(mode="annotate", history=remembered)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    defence = QueryDefence(config, salt=1)
    for i in range(remembered):
        if i == 10_000:
            traced = tracemalloc.get_traced_memory()[0] - base
            tracemalloc.stop()
        defence.index.add(rng.integers(0, 2**64, config.n_hashes, dtype=np.uint64), i % 1000, i)
    if tracemalloc.is_tracing():
        traced = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    times = []
    for i in range(timed):
        x = np.clip(images[i % len(images)] + rng.uniform(-0.2, 0.2, images.shape[1:]), 0, 1).astype(np.float32)
        t0 = time.perf_counter()
        defence.check(x[None], f"c{i % 1000}")
        times.append(time.perf_counter() - t0)
    t = np.array(times) * 1e3
    return {"remembered": defence.remembered(), "check_ms_p50": float(np.percentile(t, 50)),
            "check_ms_p99": float(np.percentile(t, 99)), "index_nbytes": defence.index.nbytes,
            "bytes_per_query": defence.index.nbytes / remembered, "traced_bytes_per_query": traced / remembered,
            "gib_per_10m_queries": max(traced, defence.index.nbytes) / remembered * 1e7 / 2**30}


def latency(ports: dict, images: np.ndarray, n: int = 400) -> dict:
    """ModelInfer latency p50/p99 with the defence off vs on (block), distinct clean images, one client;
    requests alternate between the two servers, so both see the same load of the shared machine."""
    names = ("annotate", "defence")
    endpoints = {name: Endpoint(f"127.0.0.1:{ports[name]}", "worldnet", KEY) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        for name in names if i % 2 else names[::-1]:
            t0 = time.perf_counter()
            endpoints[name].ask(images[i % len(images)], "latency-client")
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name in names:
        endpoints[name].close()
        t = np.array(times[name][20:]) * 1e3
        out[name] = {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99))}
    out["added_p50_ms"] = out["defence"]["p50_ms"] - out["annotate"]["p50_ms"]
    out["added_p99_ms"] = out["defence"]["p99_ms"] - out["annotate"]["p99_ms"]
    print(f"  latency off p50 {out['annotate']['p50_ms']:.2f} ms p99 {out['annotate']['p99_ms']:.2f} ms | defence "
          f"p50 {out['defence']['p50_ms']:.2f} ms p99 {out['defence']['p99_ms']:.2f} ms", flush=True)
    return out


ADAPTIVE = {  # name -> (row label, attack, QueryAttackParams fields)
    "blinding4": ("blinding 4/255", "hopskipjump", {"blinding": 4 / 255}),
    "blinding16": ("blinding 16/255", "hopskipjump", {"blinding": 16 / 255}),
    "sybil100": ("sybil 100 ids", "hopskipjump", {"identities": 100}),
    "sybil1000": ("sybil 1000 ids", "hopskipjump", {"identities": 1000}),
    "oars": ("oars 10 tries", "hopskipjump", {"oars": 10}),
    "oars-square": ("oars 10 tries", "square", {"oars": 10}),
}


def adaptive(port: int, server, model, world, args, tmp: Path) -> list[dict]:
    """Attackers that know the defence, against it alone (they ignore the guard's FLAG, as in the "defence"
    condition): blinding, Sybil identities, OARS-style rejection sampling (attacks/query.py)."""
    rows = []
    for name in args.adaptive.split(","):
        label, attack, extra = ADAPTIVE[name]
        before = server.metrics.query_matches.labels("cross_client")._value.get()
        params = QueryAttackParams(attack=attack, max_queries=args.max_queries, n_images=args.images,
                                   answers="scores" if attack in SCORES else "label", evade_guard=False,
                                   client_header=KEY, client_id=f"adaptive-{name}", **extra)
        row = run_condition(port, model, world, params, "defence", tmp, label)
        row["cross_client_matches"] = server.metrics.query_matches.labels("cross_client")._value.get() - before
        rows.append(row)
        print_row(row)
        print(f"    cross-client matches seen by the operator: {row['cross_client_matches']:.0f}", flush=True)
    return rows


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    inputs = load_world_inputs(cache_dir=args.world_cache, progress=False)
    world, model = inputs.world, inputs.model.eval()
    runs = [(a.removesuffix("+t"), a.endswith("+t")) for a in args.attacks.split(",") if a]
    for attack, _ in runs:
        if attack not in QUERY_ATTACKS:
            raise SystemExit(f"--attacks: unknown attack {attack!r}; known: {sorted(QUERY_ATTACKS)}")
    print(f"{platform.processor() or platform.machine()}, shared 2-core machine, torch threads 1; "
          f"{args.images} images per cell, budget {args.max_queries} queries", flush=True)
    sections = set(args.sections.split(","))
    if unknown := set(args.adaptive.split(",")) - set(ADAPTIVE):
        raise SystemExit(f"--adaptive: unknown {sorted(unknown)}; known: {list(ADAPTIVE)}")
    if unknown := set(args.conditions.split(",")) - set(CONDITIONS):
        raise SystemExit(f"--conditions: unknown {sorted(unknown)}; known: {list(CONDITIONS)}")
    clean = plan_images(world.test_images, np.arange(min(4000, len(world.test_labels))))
    report = {"machine": platform.processor() or platform.machine(), "args": vars(args),
              "defence": dataclasses.asdict(QueryDefenceConfig(mode="block"))}
    offline = QueryDefenceConfig(mode="block", **defence_overrides(args.defence))
    report["offline_defence"] = dataclasses.asdict(offline)
    if "benign" in sections:
        print(f"benign streams (defence {args.defence or 'defaults'}):", flush=True)
        report["benign"] = benign_rates(clean, args.benign_clients, offline)
    if "progression" in sections:
        print(f"how matches progress over a client's first 20 queries (defence {args.defence or 'defaults'}):",
              flush=True)
        report["progression"] = progression(model, world, clean, offline)
    if "cost" in sections:
        report["cost"] = []
        for n in map(int, args.cost_queries.split(",")):
            report["cost"].append(c := cost(clean, n))
            print(f"  cost at {n} remembered: check p50 {c['check_ms_p50']:.3f} ms p99 {c['check_ms_p99']:.3f} ms; "
                  f"arrays {c['bytes_per_query']:.1f} B/query, traced {c['traced_bytes_per_query']:.1f} B/query = "
                  f"{c['gib_per_10m_queries']:.3f} GiB per 10M", flush=True)
    guard = load_guard(args.bundle)
    servers = {name: create_server(config, guard) for name, config in SERVERS.items()}
    for created in servers.values():
        created.server.start()
    ports = {name: created.port for name, created in servers.items()}
    try:
        if "latency" in sections:
            report["latency"] = latency(ports, clean)
        with tempfile.TemporaryDirectory() as tmp:
            if "attacks" in sections:
                print("attacks:", flush=True)
                report["attacks"] = attack_table(ports, model, world, runs, args, Path(tmp))
            if "adaptive" in sections:
                print("adaptive attackers vs the defence:", flush=True)
                report["adaptive"] = adaptive(ports["adaptive"], servers["adaptive"].server, model, world, args,
                                              Path(tmp))
    finally:
        for created in servers.values():
            created.server.stop(0).wait(10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
