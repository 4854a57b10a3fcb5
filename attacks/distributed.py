"""`semguard attack generate --ray`: an attack set's shards computed on a Ray cluster.

Workers only compute: a pool of Ray actors, one model each (one GPU each when the cluster has
GPUs, else one CPU), receives a shard's clean images and targets and returns the adversarial
images and the model's predictions on them. The driver stays the single writer: it plans the
set, opens it with attacks.store and writes every shard and its manifest rows itself, in shard
order. So a Ray run resumes a killed Ray or single-process run and vice versa, and gives the
same files as the single-process run (same code per shard: attacks.generate.attack_batch).

Why actors and not Ray Data's map_batches: the store's unit is a shard, written once, in order,
by one process. With Ray Data a shard would be one row holding a whole batch (its batches are
not shard-aligned otherwise), the results would cross Arrow tensor columns for nothing, and it
would add pyarrow and pandas to the install; an actor pool with a bounded window of shards in
flight gives the same streaming and back-pressure in a few lines.

Importing this module imports ray; nothing else in semguard imports it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn

from semguard.attacks.common import check_count, check_positive
from semguard.attacks.generate import (GenerateParams, GenerateResult, attack_batch, prepare_attack_set, progress_bar, shard_attacks, store_shard, take_images)
from semguard.attacks.registry import get_attack


@dataclass(frozen=True)
class RayParams:
    """Where and how wide to run; filled from `--ray [ADDRESS]` and `--ray-actors` at the CLI."""

    address: str = "local"  # "local": start a Ray on this machine; "auto": the running cluster; "ray://h:10001"
    actors: int = 0  # 0: one per GPU of the cluster, else one per CPU
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    in_flight_per_actor: int = 2  # shards queued per actor, so none waits while the driver writes

    def __post_init__(self) -> None:
        if self.actors != 0:
            check_count("actors", self.actors)
        check_positive("cpus_per_actor", self.cpus_per_actor)
        if self.gpus_per_actor is not None and not self.gpus_per_actor >= 0:
            raise ValueError(f"gpus_per_actor must be >= 0 or None, got {self.gpus_per_actor}")
        check_count("in_flight_per_actor", self.in_flight_per_actor)


class ShardAttacker:
    """A Ray actor: one model, attacks one shard per call (attacks.generate.attack_batch)."""

    def __init__(self, model: nn.Module, params: GenerateParams):
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.model, self.params = model.to(self.device).eval(), params

    def attack(self, source_images: np.ndarray, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return attack_batch(self.model, source_images, targets, self.params, self.device)


def connect_ray(address: str) -> bool:
    """Join or start Ray unless this process already did; True when this call did (and must shut it down)."""
    if ray.is_initialized():
        return False
    if address == "local":  # this machine only: no dashboard, no usage report
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address)
    return True


def put_model(model: nn.Module) -> ray.ObjectRef:
    """The model in Ray's object store, on the CPU (actors move it to their device); the caller's
    model stays on its device."""
    device = next(model.parameters()).device
    try:
        return ray.put(model.cpu())
    finally:
        model.to(device)


def actor_options(options: RayParams) -> tuple[int, dict]:
    """(number of actors, their resource request) from the cluster's resources."""
    resources = ray.cluster_resources()
    gpus = options.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    n = options.actors or max(1, int(resources.get("GPU", 0) // gpus if gpus
                                     else resources.get("CPU", 1) // options.cpus_per_actor))
    return n, {"num_cpus": options.cpus_per_actor, "num_gpus": gpus}


def generate_attack_set_ray(model: nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray,
                            label_names: Sequence[str], word_vectors: np.ndarray | Mapping, out_dir: str | Path,
                            params: GenerateParams = GenerateParams(), options: RayParams = RayParams(),
                            device: str | torch.device = "cpu", progress: bool = True,
                            on_shard: Callable[[int], None] | None = None, subject: Mapping | None = None) -> GenerateResult:
    """attacks.generate.generate_attack_set with the shards attacked by Ray actors; same arguments and files.

    device: where the driver predicts the test set to plan the attacks; the actors use a GPU
    when they hold one. The model is sent to the actors as a Python object, so its class must be
    importable on the cluster's workers (semguard installed there).
    """
    get_attack(params.attack)
    prepared = prepare_attack_set(model, images, labels, label_names, word_vectors, out_dir, params,
                                  torch.device(device), subject)
    writer = prepared.writer
    skipped, computed, pending = sorted(writer.done), [], writer.pending
    if not pending:
        return GenerateResult(Path(out_dir), len(prepared.plan), writer.n_success, computed, skipped)
    started = connect_ray(options.address)
    actors = []
    try:
        n_actors, resources = actor_options(options)
        model_ref = put_model(prepared.model)
        actors = [ray.remote(ShardAttacker).options(**resources).remote(model_ref, params)
                  for _ in range(min(n_actors, len(pending)))]
        window = len(actors) * options.in_flight_per_actor
        bar = progress_bar(prepared, params, progress, desc=f"{params.attack} {params.backend} ray x{len(actors)}")
        futures: dict[int, ray.ObjectRef] = {}
        for position, k in enumerate(pending):
            for j in range(position, min(position + window, len(pending))):  # `window` shards in flight
                if pending[j] not in futures:  # round robin: each actor gets every n-th shard
                    batch = shard_attacks(prepared, pending[j], params)
                    futures[pending[j]] = actors[j % len(actors)].attack.remote(
                        take_images(images, [a.source_image for a in batch]), [a.plan.target for a in batch])
            adversarial, hit = ray.get(futures.pop(k))  # write in shard order, as the single process does
            store_shard(writer, k, shard_attacks(prepared, k, params), adversarial, hit, label_names, params, bar,
                        on_shard)
            computed.append(k)
        bar.close()
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return GenerateResult(Path(out_dir), len(prepared.plan), writer.n_success, computed, skipped)
