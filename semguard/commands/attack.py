"""`semguard attack generate` builds an attack set (paper section 4); `semguard attack analyze` runs the
paper's 1 vs 2 analyses on it and on the misclassified test images (Figures 4-6).

Only argparse and subject checks here: flags fill GenerateParams, the subject loads (the embedded world's
model, test images and word vectors unless the subject flags name others), and the library does the work
(attacks.generate, analysis). A set records its subject (params.json "subject", paths absolute), so
`attack analyze` needs only the set; a resumed set must name the same subject.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from semguard.config_flags import Flag, add_world_cache_flag, config_from_flags, defer_config_flags
from semguard.subject.flags import add_subject_flags, subject_spec_from_args

if TYPE_CHECKING:
    import numpy as np

    from semguard.attacks.generate import GenerateParams
    from semguard.subject.core import Subject, SubjectSpec


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


def register(subparsers: argparse._SubParsersAction) -> None:
    """`semguard attack generate|analyze|query`."""
    attack = subparsers.add_parser("attack", help="build and analyse adversarial attack sets")
    commands = attack.add_subparsers(dest="attack_command", required=True)
    _add_generate_command(commands)
    _add_analyze_command(commands)
    _add_query_command(commands)


def _add_generate_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="targeted MI-FGSM attack set: sources x targets by word similarity")
    p.add_argument("--out", type=Path, required=True, help="attack-set directory (resumed when it exists)")
    add_world_cache_flag(p, "embedded world cache: its model, test images and word vectors are attacked")
    add_subject_flags(p)
    defer_config_flags(p, "semguard.attacks.generate:GenerateParams", generate_flags)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="attack the shards on Ray actors (needs semguard[ray]); ADDRESS: auto (the running "
                        "cluster), ray://HOST:10001, or none to start Ray on this machine; this process writes")
    p.add_argument("--ray-actors", type=int, default=0, metavar="N",
                   help="with --ray: actors, one model each (default: one per GPU, else one per CPU)")
    p.set_defaults(func=run_generate)


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
        Flag("--oars", "oars", "OARS-style adaptive attacker: resample a refused query up to this many times with "
             "stronger blinding (0: off)"),
    )


def _add_query_command(commands: argparse._SubParsersAction) -> None:
    """`attack query`: a black-box attack through a live endpoint (attacks/query.py)."""
    p = commands.add_parser("query", help="black-box query attack (HopSkipJump, Square, ...) through a live OIP "
                            "endpoint, e.g. `semguard serve`")
    add_world_cache_flag(p, "embedded world cache: its test images are attacked")
    add_subject_flags(p, without=("model",))  # --model names the served model; a subject's own: --subject FILE
    p.add_argument("--address", required=True, help="HOST:PORT of the OIP v2 gRPC endpoint")
    p.add_argument("--model", dest="served_model", required=True, help="model name on the endpoint")
    p.add_argument("--out", type=Path, required=True, help="results directory (resumed when it exists)")
    defer_config_flags(p, "semguard.attacks.query:QueryAttackParams", query_flags)
    p.set_defaults(func=run_query)


def run_query(args: argparse.Namespace) -> int:
    from semguard.attacks.query import (Endpoint, QueryAttackParams, plan_from_model, plan_images,
                                        run_query_attacks, summary_line)
    from semguard.subject.core import load_subject

    try:
        params = config_from_flags(args, QueryAttackParams(), query_flags())
        spec = subject_spec_from_args(args, world_cache=args.world_cache)
        subject = load_subject(spec)
        model, images, labels = subject.model, subject.images, subject.images.labels
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


def checked_subject_record(out_dir: Path, spec: SubjectSpec) -> dict | None:
    """The subject record this run writes, checked against an attack set already in out_dir before anything
    is loaded (semguard.subject.core.resumed_subject_record)."""
    from semguard.attacks.store import PARAMS_FILE
    from semguard.subject.core import resumed_subject_record, subject_record

    try:
        existing = json.loads((Path(out_dir) / PARAMS_FILE).read_text()).get("subject", False)
    except (OSError, ValueError, AttributeError):
        return subject_record(spec)  # no set there (or a damaged one: open_attack_set says so)
    return resumed_subject_record(existing, spec, f"out_dir {out_dir}")


def attack_vectors(subject: Subject) -> np.ndarray:
    """The subject's word vectors (C, d) float64 with NaN rows for classes without one: attacks.generate makes
    those neither source nor target."""
    import numpy as np

    vectors = np.asarray(subject.word_vectors, np.float64).copy()
    vectors[~subject.matched] = np.nan
    return vectors


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from semguard.attacks.generate import generate_attack_set
    from semguard.subject.core import load_subject
    from semguard.subject.header import render_subject_header, subject_header

    params = params_from_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        spec = subject_spec_from_args(args, world_cache=args.world_cache)
        record = checked_subject_record(args.out, spec)  # a resumed set names the same subject
        subject = load_subject(spec, not args.quiet)
        inputs = (subject.model, subject.images, subject.images.labels, list(subject.classes), attack_vectors(subject))
        if args.ray is None:
            result = generate_attack_set(*inputs, args.out, params, device=device, progress=not args.quiet,
                                         subject=record)
        else:  # the only place that imports ray
            from semguard.attacks.distributed import RayParams, generate_attack_set_ray

            result = generate_attack_set_ray(*inputs, args.out, params,
                                             RayParams(address=args.ray, actors=args.ray_actors), device=device,
                                             progress=not args.quiet, subject=record)
    except ValueError as err:
        raise SystemExit(f"semguard attack generate: {err}") from None
    print("\n".join(render_subject_header(subject_header(subject))))  # accuracy: `attack analyze` measures it
    print(f"{result.out_dir}: {result.n_success}/{result.n_examples} attacks succeeded "
          f"({len(result.computed)} shards computed, {len(result.skipped)} already done)")
    return 0


def _add_analyze_command(commands: argparse._SubParsersAction) -> None:
    """`semguard attack analyze`: the paper's 1 vs 2 analyses of an attack set and of natural mistakes."""
    p = commands.add_parser(
        "analyze",
        help="1 vs 2 by layer for an attack set (by target rank) and for misclassified test images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--attack-set", type=Path, required=True, help="directory written by `semguard attack generate`")
    p.add_argument("--out", type=Path, required=True, help="where analysis.json and the figures go")
    add_world_cache_flag(p, "the embedded world's cache (for sets that record no subject)")
    add_subject_flags(p)  # default: the subject the set records
    p.add_argument("--trust-model-code", action="store_true",
                   help="allow a recorded subject whose model is user code (model_entry) to be imported and run")
    p.add_argument("--permutations", type=int, default=1000, help="permutations per layer (paper: 1000)")
    p.add_argument("--reference-size", type=int, default=100, help="reference concepts (paper: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="read at most N test images for the misclassified study and the references "
                        "(stratified over the classes with a word vector; default: all)")
    p.add_argument("--memory-budget", type=float, default=4.0, metavar="GIB",
                   help="GiB of activations one tapped pass holds (images per pass follow from it)")
    p.set_defaults(func=run_attack_analyze)


def attack_set_subject(args: argparse.Namespace, header: dict):
    """The subject to analyse a set on: the subject flags when they name assets, else what the set records
    (semguard.subject.core.recorded_subject)."""
    from semguard.subject.core import recorded_subject

    return recorded_subject(subject_spec_from_args(args, world_cache=args.world_cache), header.get("subject"),
                            f"{Path(args.attack_set) / 'params.json'}: subject",
                            trust_model_code=getattr(args, "trust_model_code", False))


def run_attack_analyze(args: argparse.Namespace) -> int:
    from semguard.analysis.attack_analysis import analyze_attacks
    from semguard.attacks.generate import model_fingerprint
    from semguard.attacks.store import load_attack_set
    from semguard.subject.core import load_subject

    try:
        if args.max_images is not None and args.max_images < 1:
            raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
        attack_set = load_attack_set(args.attack_set)
        subject = load_subject(attack_set_subject(args, attack_set.header), not args.quiet)
        if attack_set.header["model_sha256"] != model_fingerprint(subject.model):
            raise ValueError(f"{args.attack_set} was generated against another model than the subject's "
                             f"({subject.name})")
        result = analyze_attacks(subject, attack_set, args.out, args.reference_size, args.permutations, args.seed,
                                 max_images=args.max_images, memory_budget_gib=args.memory_budget)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"semguard attack analyze: {err}") from None
    from semguard.subject.header import render_subject_header

    adv, mis = result["adversarial_one_vs_two"], result["misclassified"]
    print("\n".join(render_subject_header(result["subject"]["header"])))
    print(json.dumps({
        "attacks": result["attacks"],
        "layers": adv["layers"],
        "one_vs_two_mean_over_ranks": [round(a, 3) for a in adv["accuracy"]],
        "misclassified_count": mis["count"],
        "misclassified_mean_cosine": None if mis["mean_cosine"] is None else round(mis["mean_cosine"], 3),
        **{f"{name}_skipped": section["skipped"] for name, section in (("adversarial", adv), ("misclassified", mis))
           if "skipped" in section},
    }, indent=2))
    print(f"figures and analysis.json in {args.out}")
    return 0
