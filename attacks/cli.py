"""`semguard attack ...` subcommands: `attack generate` builds an attack set (paper section 4).

The CLI is the edge: it fills GenerateParams from flags, loads the subject (the embedded world's
model, test images and word vectors unless the subject flags name others) and calls
attacks.generate.generate_attack_set. The set records its subject (params.json "subject", paths
absolute), so `semguard attack analyze` needs only the set; a resumed set must name the same subject.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from semguard.config_flags import Flag, add_config_flags, add_world_cache_flag, config_from_flags, defer_arguments
from semguard.subject.flags import add_subject_flags, subject_spec_from_args

if TYPE_CHECKING:
    from semguard.attacks.generate import GenerateParams
    from semguard.subject.core import SubjectSpec


def generate_flags() -> tuple[Flag, ...]:
    """Types and defaults come from GenerateParams; choices from what it validates against (imported
    here: the attacks import torch, which `semguard serve` and `semguard --help` need not wait for)."""
    from semguard.attacks.generate import _ATTACK_ARGS
    from semguard.attacks.mifgsm import BACKENDS

    return (
        Flag("--attack", "attack", choices=tuple(_ATTACK_ARGS)),
        Flag("--sources", "n_sources", "source concepts (fewer if fewer exist)"),
        Flag("--targets-per-source", "targets_per_source"),
        Flag("--eps", "eps", "L-inf radius on the [0, 1] pixel scale"),
        Flag("--step", "step", "step per iteration on the [0, 1] pixel scale"),
        Flag("--decay", "decay", "momentum decay mu"),
        Flag("--iterations", "iterations"),
        Flag("--backend", "backend", choices=BACKENDS),
        Flag("--batch-size", "batch_size", "images per attacked batch (= per shard)"),
        Flag("--seed", "seed", "seed of the source-concept choice"),
    )


def _add_generate_flags(p: argparse.ArgumentParser) -> None:
    from semguard.attacks.generate import GenerateParams

    add_config_flags(p, GenerateParams, generate_flags())


def add_attack_commands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `attack` with its `generate` subcommand; returns the attack subparsers (for `attack analyze`)."""
    attack = subparsers.add_parser("attack", help="build and analyse adversarial attack sets")
    commands = attack.add_subparsers(dest="attack_command", required=True)
    p = commands.add_parser("generate", help="targeted MI-FGSM attack set: sources x targets by word similarity")
    p.add_argument("--out", type=Path, required=True, help="attack-set directory (resumed when it exists)")
    add_world_cache_flag(p, "embedded world cache: its model, test images and word vectors are attacked")
    add_subject_flags(p)
    defer_arguments(p, _add_generate_flags)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="attack the shards on Ray actors (needs semguard[ray]); ADDRESS: auto (the running "
                        "cluster), ray://HOST:10001, or none to start Ray on this machine; this process writes")
    p.add_argument("--ray-actors", type=int, default=0, metavar="N",
                   help="with --ray: actors, one model each (default: one per GPU, else one per CPU)")
    p.set_defaults(func=run_generate)
    add_query_command(commands)
    return commands


def query_flags() -> tuple[Flag, ...]:
    from semguard.attacks.query import ANSWERS, QUERY_ATTACKS

    return (
        Flag("--attack", "attack", choices=tuple(QUERY_ATTACKS)),
        Flag("--targeted", "targeted", "towards a random other class (default: untargeted)"),
        Flag("--max-queries", "max_queries", "images sent per attacked image"),
        Flag("--answers", "answers", "what the attacker reads: the predicted label, or the probabilities", ANSWERS),
        Flag("--eps", "eps", "success radius in the attack's norm (default: L2 1.0, L-inf 8/255)"),
        Flag("--ignore-guard-flag", "evade_guard", "count answers the guard flags as successes too"),
        Flag("--n-images", "n_images", "test images to attack"),
        Flag("--seed", "seed"),
        Flag("--client-header", "client_header", "metadata key the server tells clients by (serve --query-client-key)"),
        Flag("--client-id", "client_id", "the attacker's identity in that header"),
        Flag("--identities", "identities", "spread the queries over this many identities (Sybil)"),
        Flag("--blinding", "blinding", "query blinding: uniform noise of this amplitude and a random 2-pixel shift"),
    )


def add_query_command(commands: argparse._SubParsersAction) -> None:
    """`attack query`: a black-box attack through a live endpoint (attacks/query.py)."""
    from semguard.attacks.query import QueryAttackParams

    # conflict_handler: --model names the served model here; a subject's own model comes from --subject FILE
    p = commands.add_parser("query", help="black-box query attack (HopSkipJump, Square, ...) through a live OIP "
                            "endpoint, e.g. `semguard serve`", conflict_handler="resolve")
    add_world_cache_flag(p, "embedded world cache: its test images are attacked")
    add_subject_flags(p)
    p.add_argument("--address", required=True, help="HOST:PORT of the OIP v2 gRPC endpoint")
    p.add_argument("--model", dest="served_model", required=True, help="model name on the endpoint")
    p.add_argument("--out", type=Path, required=True, help="results directory (resumed when it exists)")
    add_config_flags(p, QueryAttackParams, query_flags())
    p.set_defaults(func=run_query)


def run_query(args: argparse.Namespace) -> int:
    from semguard.attacks.query import (Endpoint, QueryAttackParams, plan_from_model, plan_images,
                                        run_query_attacks, summary_line)

    try:
        params = config_from_flags(args, QueryAttackParams(), query_flags())
        spec = subject_spec_from_args(args, world_cache=args.world_cache)
        model, images, labels, _, _ = subject_inputs(spec)
        plan = plan_from_model(model, images, labels, params)
        inits = {i: x for i, x in zip(plan.inits, plan_images(images, [i for i in plan.inits if i >= 0]))}
        endpoint = Endpoint(args.address, args.served_model, params.client_header)
    except ValueError as err:
        raise SystemExit(f"semguard attack query: {err}") from None
    try:
        result = run_query_attacks(endpoint, plan_images(images, plan.indices), plan, params, args.out,
                                   subject=checked_subject_record(args.out, spec), init_images=inits)
    except ValueError as err:
        raise SystemExit(f"semguard attack query: {err}") from None
    finally:
        endpoint.close()
    print(f"{result.out_dir}: {summary_line(result.rows)} ({result.computed} attacked, {result.skipped} already done)")
    return 0


def params_from_args(args: argparse.Namespace) -> GenerateParams:
    """GenerateParams with the flags given; SystemExit with the message of a value it rejects."""
    try:
        from semguard.attacks.generate import GenerateParams

        return config_from_flags(args, GenerateParams(), generate_flags())
    except ValueError as err:
        raise SystemExit(f"semguard attack generate: {err}") from None


def _world_inputs(cache_dir: Path):
    """(model, test images, test labels, class names, word vectors (n_classes, d))."""
    from semguard.world.inputs import load_world_inputs

    inputs = load_world_inputs(cache_dir=cache_dir)
    w = inputs.world
    return inputs.model, w.test_images, w.test_labels, list(w.classes), inputs.word_vectors


def checked_subject_record(out_dir: Path, spec: SubjectSpec) -> dict | None:
    """The subject record this run writes, checked against an attack set already in out_dir (before
    anything is loaded): a set made on another subject is a ValueError naming what differs. On the
    embedded world, a set that records no subject (made before sets recorded one) keeps recording
    none, and another --world-cache alone is no mismatch: the set keeps the cache it recorded (the
    model fingerprint in params.json still tells whether it is the same world)."""
    import json

    from semguard.attacks.store import PARAMS_FILE
    from semguard.subject.core import subject_record

    record = subject_record(spec)
    try:
        existing = json.loads((Path(out_dir) / PARAMS_FILE).read_text()).get("subject", False)
    except (OSError, ValueError, AttributeError):
        return record  # no set there (or a damaged one: open_attack_set says so)
    if (existing is False or existing is None) and spec.is_world():
        return None
    if existing is False or existing is None or (_describe(existing) == "the embedded world" and not spec.is_world()):
        raise ValueError(f"out_dir {out_dir} holds an attack set made on the embedded world; this run names "
                         f"another subject ({_describe(record)}); use another out dir")
    if spec.is_world() and _describe(existing) == "the embedded world" and existing.get("world_seed") == spec.world_seed:
        return existing
    if existing != record:
        keys = sorted(set(existing) | set(record))
        diffs = [f"{k}: {existing.get(k)!r} there, {record.get(k)!r} now" for k in keys if existing.get(k) != record.get(k)]
        raise ValueError(f"out_dir {out_dir} holds an attack set made on another subject ({'; '.join(diffs)}); "
                         "resume it with the same subject, or use another out dir")
    return record


def _describe(record: dict) -> str:
    from semguard.subject.core import SPEC_FIELDS

    named = [f"{k}={record[k]}" for k in SPEC_FIELDS if record.get(k) is not None]
    return ", ".join(named) if named else "the embedded world"


def subject_inputs(spec: SubjectSpec):
    """(model, images (array or ImageSet), labels, class names, word vectors (C, d) with NaN rows for
    classes without one): the embedded world's arrays, or a subject's images read on demand."""
    import numpy as np

    if spec.is_world():
        return _world_inputs(spec.world_cache)
    from semguard.subject.core import load_subject

    subject = load_subject(spec)
    vectors = np.asarray(subject.word_vectors, np.float64).copy()
    vectors[~subject.matched] = np.nan  # attacks.generate: no vector, neither source nor target
    return subject.model, subject.images, subject.images.labels, list(subject.classes), vectors


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from semguard.attacks.generate import generate_attack_set

    params = params_from_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        spec = subject_spec_from_args(args, world_cache=args.world_cache)
        record = checked_subject_record(args.out, spec)  # a resumed set names the same subject
        model, images, labels, names, vectors = subject_inputs(spec)
        if args.ray is None:
            result = generate_attack_set(model, images, labels, names, vectors, args.out, params, device=device,
                                         subject=record)
        else:  # the only place that imports ray
            from semguard.attacks.distributed import RayParams, generate_attack_set_ray

            result = generate_attack_set_ray(model, images, labels, names, vectors, args.out, params,
                                             RayParams(address=args.ray, actors=args.ray_actors), device=device,
                                             subject=record)
    except ValueError as err:
        raise SystemExit(f"semguard attack generate: {err}") from None
    print(f"{result.out_dir}: {result.n_success}/{result.n_examples} attacks succeeded "
          f"({len(result.computed)} shards computed, {len(result.skipped)} already done)")
    return 0
