"""Black-box query attacks through a live endpoint: the attacker has only the API (OIP v2, gRPC).

Every query of the attack is a ModelInfer request to the served model, sent with tritonclient; the
endpoint is wrapped as ART's black-box classifier, so ART's decision-based (HopSkipJump, Boundary,
Sign-OPT) and score-based (Square, SimBA) attacks run unchanged. What the attacker reads:

  answers="label"   the PREDICTION output only (one-hot to ART)
  answers="scores"  the PROBABILITIES output
  a refused request (the guard's --policy block, the query defence's block / ban) or, with
  evade_guard, an answer whose FLAG is set: "still the source class" (one-hot), since the attacker
  learns nothing from it that it can use.

The result is what the attacker holds: the least-distorted query the endpoint answered as adversarial
(targeted: the target class; untargeted: any other class), counted a success when its distortion is
within eps. The attack stops at the first success or when max_queries images have been sent.
run_query_attacks writes one row per image to results.jsonl (resumable: rows already there are kept).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from semguard.files import write_atomic, write_json_atomic

NORMS = ("l2", "linf")
ANSWERS = ("label", "scores")
FORMAT = "semguard.query_attack/1"
RESULTS_FILE = "results.jsonl"
PARAMS_FILE = "params.json"
REFUSED_CODES = ("StatusCode.PERMISSION_DENIED",)  # block policy and the query defence refuse with this


def _hopskipjump(clf, p: QueryAttackParams):
    from art.attacks.evasion import HopSkipJump
    return HopSkipJump(clf, batch_size=64, targeted=p.targeted, norm=2, max_iter=p.max_queries, max_eval=1000,
                       init_eval=100, init_size=100, verbose=False)


def _boundary(clf, p: QueryAttackParams):
    from art.attacks.evasion import BoundaryAttack
    return BoundaryAttack(clf, batch_size=64, targeted=p.targeted, max_iter=p.max_queries, verbose=False)


def _signopt(clf, p: QueryAttackParams):
    from art.attacks.evasion import SignOPTAttack
    return SignOPTAttack(clf, targeted=p.targeted, query_limit=p.max_queries, batch_size=64, verbose=False)


def _square(clf, p: QueryAttackParams):
    from art.attacks.evasion import SquareAttack
    return SquareAttack(clf, norm=np.inf, eps=p.radius, max_iter=p.max_queries, nb_restarts=1, batch_size=1,
                        verbose=False)


def _simba(clf, p: QueryAttackParams):
    from art.attacks.evasion import SimBA
    return SimBA(clf, attack="dct", max_iter=p.max_queries, epsilon=0.2, targeted=p.targeted, batch_size=1,
                 verbose=False)


class QueryAttackSpec(NamedTuple):
    build: Callable[[Any, QueryAttackParams], Any]
    norm: str          # the distortion the attack minimises, and success is measured in
    targeted: bool     # supports targeted
    init_kwarg: str | None  # generate() keyword of a target-class starting image (targeted)


QUERY_ATTACKS: dict[str, QueryAttackSpec] = {
    "hopskipjump": QueryAttackSpec(_hopskipjump, "l2", True, "x_adv_init"),  # Chen et al. 2020, decision
    "boundary": QueryAttackSpec(_boundary, "l2", True, "x_adv_init"),        # Brendel et al. 2018, decision
    "signopt": QueryAttackSpec(_signopt, "l2", True, "x_init"),              # Cheng et al. 2020, decision
    "square": QueryAttackSpec(_square, "linf", False, None),                 # Andriushchenko et al. 2020, score
    "simba": QueryAttackSpec(_simba, "l2", True, None),                      # Guo et al. 2019, score
}
# GeoDA (ART 1.20.1) is left out: it calls np.mat, which NumPy 2 removed.
DEFAULT_EPS = {"l2": 1.0, "linf": 8 / 255}  # on [0, 1] pixels; 32x32x3: L2 1.0 is ~4.6/255 RMS per value


@dataclass(frozen=True)
class QueryAttackParams:
    attack: str = "hopskipjump"
    targeted: bool = False
    max_queries: int = 10_000       # images sent per attacked image (the budget)
    answers: str = "label"          # what the attacker reads: PREDICTION (label) or PROBABILITIES (scores)
    eps: float | None = None        # success radius in the attack's norm; None = DEFAULT_EPS of that norm
    evade_guard: bool = True        # an answer the guard FLAGs counts as a failure (the attacker wants both)
    n_images: int = 10
    seed: int = 0                   # choice of images and targets, blinding noise
    client_header: str | None = None  # metadata key the server reads the client from (--query-client-key)
    client_id: str = "attacker"
    identities: int = 1             # Sybil: queries spread round-robin over this many client ids
    blinding: float = 0.0           # query blinding (Chen et al. 2020): each query + uniform noise in +-blinding
                                    # and a random shift of up to 2 pixels, so no two queries are near-copies
    oars: int = 0                   # OARS-style rejection sampling (Feng et al. 2023): a query the query defence
                                    # refuses is resampled, up to this many times, with noise it adapts

    def __post_init__(self) -> None:
        if self.attack not in QUERY_ATTACKS:
            raise ValueError(f"attack must be one of {sorted(QUERY_ATTACKS)}, got {self.attack!r}")
        if self.targeted and not QUERY_ATTACKS[self.attack].targeted:
            raise ValueError(f"attack {self.attack!r} is untargeted only (targeted: "
                             f"{sorted(n for n, s in QUERY_ATTACKS.items() if s.targeted)})")
        if self.answers not in ANSWERS:
            raise ValueError(f"answers must be one of {ANSWERS}, got {self.answers!r}")
        for name in ("max_queries", "n_images", "identities"):  # oars: 0 = off
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not 0 <= self.blinding < 1:
            raise ValueError(f"blinding must be in [0, 1), got {self.blinding}")
        if self.oars < 0:
            raise ValueError(f"oars must be >= 0, got {self.oars}")
        if self.identities > 1 and not self.client_header:
            raise ValueError("identities > 1 needs client_header (the metadata key the server tells clients by)")

    @property
    def norm(self) -> str:
        return QUERY_ATTACKS[self.attack].norm

    @property
    def radius(self) -> float:
        return self.eps if self.eps is not None else DEFAULT_EPS[self.norm]


class Answer(NamedTuple):
    """The endpoint's answer to one image, as the client reads it."""

    prediction: int                 # -1 when refused
    probabilities: np.ndarray | None  # (K,), when asked for and not refused
    flagged: bool                   # the guard's FLAG
    query_flagged: bool             # QUERY_FLAG (False when the server has no query defence)
    refused: bool


class Endpoint:
    """A served model over OIP v2 (tritonclient): one image per ModelInfer request."""

    def __init__(self, address: str, model: str, client_header: str | None = None, timeout_s: float = 60.0):
        import tritonclient.grpc as triton
        self._triton, self.model, self.client_header, self.timeout_s = triton, model, client_header, timeout_s
        self.client = triton.InferenceServerClient(address)
        meta = self.client.get_model_metadata(model)
        self.outputs = [o.name for o in meta.outputs]
        self.input_name = meta.inputs[0].name if meta.inputs else "IMAGE"
        probs = next((o for o in meta.outputs if o.name == "PROBABILITIES"), None)
        self.n_classes = int(probs.shape[-1]) if probs is not None else 0

    def ask(self, image: np.ndarray, client_id: str | None = None, scores: bool = False) -> Answer:
        """image (C, H, W) float32 in [0, 1]."""
        from tritonclient.utils import InferenceServerException
        t = self._triton
        inp = t.InferInput(self.input_name, [1, *image.shape], "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(image[None], dtype=np.float32))
        names = ["PREDICTION", "FLAG"] + (["PROBABILITIES"] if scores else []) + \
            (["QUERY_FLAG"] if "QUERY_FLAG" in self.outputs else [])
        headers = {self.client_header: client_id} if self.client_header and client_id else None
        try:
            r = self.client.infer(self.model, [inp], outputs=[t.InferRequestedOutput(n) for n in names],
                                  headers=headers, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            if exc.status() in REFUSED_CODES:
                return Answer(-1, None, "blocked by policy" in (exc.message() or ""), False, True)
            raise
        return Answer(int(r.as_numpy("PREDICTION")[0]), r.as_numpy("PROBABILITIES")[0] if scores else None,
                      bool(r.as_numpy("FLAG")[0]),
                      bool(r.as_numpy("QUERY_FLAG")[0]) if "QUERY_FLAG" in names else False, False)

    def close(self) -> None:
        self.client.close()


class _Stop(Exception):
    """Raised inside ART's loop: the budget is spent, or the attack has succeeded."""


def distortion(a: np.ndarray, b: np.ndarray, norm: str) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64)).ravel()
    return float(np.linalg.norm(d) if norm == "l2" else np.abs(d).max())


def blind(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Query blinding: image (C, H, W) shifted by up to 2 pixels (wrapping) plus uniform noise in +-strength."""
    shifted = np.roll(image, tuple(rng.integers(-2, 3, size=2)), axis=(1, 2))
    return np.clip(shifted + rng.uniform(-strength, strength, image.shape), 0, 1).astype(np.float32)


class _Oracle:
    """The attacker's side of the endpoint for one image: counts queries, answers ART, keeps the best."""

    def __init__(self, endpoint: Endpoint, params: QueryAttackParams, source: np.ndarray, label: int,
                 target: int | None, rng: np.random.Generator):
        self.endpoint, self.params, self.source, self.label, self.target, self.rng = \
            endpoint, params, source, label, target, rng
        self.queries = self.refused = self.query_flagged = 0
        self.first_query_flag: int | None = None  # queries until the defence first flagged or refused one
        self.best: np.ndarray | None = None
        self.best_distortion = np.inf
        self.queries_to_success: int | None = None
        self.strength = 0.0  # the noise OARS adapts: up after a refusal, down after an answer

    def _client(self) -> str:
        p = self.params
        return p.client_id if p.identities == 1 else f"{p.client_id}-{self.queries % p.identities}"

    def _send(self, image: np.ndarray, resampled: bool = False) -> tuple[np.ndarray, Answer]:
        if resampled:
            sent = self._resample(image)
        else:
            sent = blind(image, self.params.blinding, self.rng) if self.params.blinding else image
        a = self.endpoint.ask(sent, self._client(), scores=self.params.answers == "scores")
        self.queries += 1
        self.refused += a.refused
        self.query_flagged += a.query_flagged
        if self.first_query_flag is None and (a.query_flagged or (a.refused and not a.flagged)):
            self.first_query_flag = self.queries
        return sent, a

    def _ask(self, image: np.ndarray) -> tuple[np.ndarray, Answer]:
        """One query of the attack; with oars, a query the defence refuses (or QUERY_FLAGs) is resampled with
        stronger noise until it passes, oars tries are spent, or the budget is: the attacker learns from the
        oracle's refusals how much noise slips by, and keeps the least that does (Feng et al. 2023)."""
        sent, a = self._send(image, resampled=self.strength > 0)
        for _ in range(self.params.oars):
            caught = a.query_flagged or (a.refused and not a.flagged)
            if not caught:
                self.strength *= 0.9  # answered: try a little less noise next time
                break
            if self.queries >= self.params.max_queries:
                break
            self.strength = min(0.5, max(2 / 255, self.strength * 1.5))
            sent, a = self._send(image, resampled=True)
        return sent, a

    def _resample(self, image: np.ndarray) -> np.ndarray:
        """OARS's sample: image + uniform noise of the adapted strength, kept within the success radius of the
        source (or within the image's own distance, when the attack is still farther): the noise never
        spends the attacker's distortion budget, so a success is still one."""
        sent = np.clip(image + self.rng.uniform(-self.strength, self.strength, image.shape), 0, 1)
        radius = max(self.params.radius, distortion(image, self.source, self.params.norm))
        d = sent.astype(np.float64) - self.source
        if self.params.norm == "linf":
            d = np.clip(d, -radius, radius)
        elif (n := np.linalg.norm(d)) > radius:
            d *= radius / n
        return np.clip(self.source + d, 0, 1).astype(np.float32)

    def _adversarial(self, a: Answer) -> bool:
        if a.refused or (self.params.evade_guard and a.flagged):
            return False
        return a.prediction == self.target if self.target is not None else a.prediction != self.label

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """ART's predict_fn: x (n, C, H, W) -> (n, K) scores or one-hot labels."""
        k = self.endpoint.n_classes
        out = np.zeros((len(x), k), np.float32)
        for i, image in enumerate(np.asarray(x, np.float32)):
            if self.queries >= self.params.max_queries or self.queries_to_success is not None:
                raise _Stop
            sent, a = self._ask(image)
            if self._adversarial(a):
                d = distortion(sent, self.source, self.params.norm)
                if d < self.best_distortion:
                    self.best, self.best_distortion = sent, d
                if d <= self.params.radius * (1 + 1e-5) and self.queries_to_success is None:  # float32 pixels
                    self.queries_to_success = self.queries
            if a.refused or (self.params.evade_guard and a.flagged) or a.prediction < 0:
                out[i, self.label] = 1.0  # "still the source class": nothing to learn from it
            elif a.probabilities is not None:
                out[i] = a.probabilities
            else:
                out[i, a.prediction] = 1.0
        return out


class QueryPlan(NamedTuple):
    """The images attacked: test-set indices, their labels, targets (-1 untargeted), target-class starts."""

    indices: list[int]
    labels: list[int]
    targets: list[int]
    inits: list[int]  # index of a test image of the target class (-1 untargeted)


def plan_query_attack(predicted: np.ndarray, labels: np.ndarray, n_images: int, targeted: bool,
                      seed: int) -> QueryPlan:
    """n_images correctly classified images in a seeded order; targeted: a random other class each, and a
    correctly classified image of it as the attack's start (an attacker has images of the class it wants)."""
    rng = np.random.default_rng(seed)
    correct = np.flatnonzero(predicted == labels)
    chosen = [int(i) for i in rng.permutation(correct)]
    classes = sorted({int(labels[i]) for i in correct})
    if targeted and len(classes) < 2:
        raise ValueError("a targeted attack needs correctly classified images of at least 2 classes")
    indices, targets, inits = [], [], []
    for i in chosen[:n_images]:
        indices.append(i)
        if targeted:
            t = int(rng.choice([c for c in classes if c != labels[i]]))
            targets.append(t)
            inits.append(int(correct[labels[correct] == t][0]))
        else:
            targets.append(-1)
            inits.append(-1)
    return QueryPlan(indices, [int(labels[i]) for i in indices], targets, inits)


def attack_one(endpoint: Endpoint, params: QueryAttackParams, source: np.ndarray, label: int, target: int,
               init: np.ndarray | None, rng: np.random.Generator) -> dict:
    """One image's attack: the result row (the best adversarial image under "image", not JSON)."""
    from art.estimators.classification.blackbox import BlackBoxClassifierNeuralNetwork

    spec = QUERY_ATTACKS[params.attack]
    oracle = _Oracle(endpoint, params, source, label, target if target >= 0 else None, rng)
    clf = BlackBoxClassifierNeuralNetwork(oracle, tuple(source.shape), endpoint.n_classes, channels_first=True,
                                          clip_values=(0.0, 1.0))
    attack = spec.build(clf, params)
    kwargs = {spec.init_kwarg: init[None]} if params.targeted and spec.init_kwarg and init is not None else {}
    y = np.eye(endpoint.n_classes, dtype=np.float32)[[target if params.targeted else label]]  # one-hot: all take it
    start = time.perf_counter()
    try:
        attack.generate(x=source[None], y=y, **kwargs)
    except _Stop:
        pass
    final = _final_check(endpoint, params, oracle.best)
    return {"success": oracle.queries_to_success is not None, "queries": oracle.queries,
            "queries_to_success": oracle.queries_to_success, "refused": oracle.refused,
            "query_flagged": oracle.query_flagged, "queries_to_detection": oracle.first_query_flag,
            "distortion": None if oracle.best is None else oracle.best_distortion, "norm": params.norm,
            "eps": params.radius, **final, "seconds": round(time.perf_counter() - start, 3), "image": oracle.best}


def _final_check(endpoint: Endpoint, params: QueryAttackParams, best: np.ndarray | None) -> dict:
    """The endpoint's answer to the final image, from an identity of its own (not the attacker's history)."""
    if best is None:
        return {"final_prediction": None, "final_flagged": None, "final_refused": None}
    a = endpoint.ask(best, f"semguard-eval-{uuid.uuid4().hex[:8]}")
    return {"final_prediction": a.prediction, "final_flagged": a.flagged, "final_refused": a.refused}


def _read_results(path: Path) -> list[dict]:
    """Rows of results.jsonl; a torn last line (a killed run) is dropped and cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return [json.loads(line) for line in data[:good].splitlines()]


def open_results(out_dir: Path, header: dict) -> list[dict]:
    """Create out_dir with params.json, or resume it: rows already written; ValueError if the header differs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    params_path = out_dir / PARAMS_FILE
    header = json.loads(json.dumps({"format": FORMAT, **header}))
    if params_path.exists():
        existing = json.loads(params_path.read_text())
        if existing != header:
            diffs = sorted(k for k in set(existing) | set(header) if existing.get(k) != header.get(k))
            raise ValueError(f"out_dir {out_dir} holds a query attack run with other parameters ({', '.join(diffs)}); "
                             "resume it with the same ones, or use another out dir")
    elif any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} is not empty and holds no {PARAMS_FILE}")
    else:
        write_json_atomic(params_path, header)
    return _read_results(out_dir / RESULTS_FILE)


def _append(path: Path, row: dict) -> None:
    with open(path, "ab") as f:
        f.write((json.dumps(row, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


class QueryRunResult(NamedTuple):
    out_dir: Path
    rows: list[dict]
    computed: int
    skipped: int


def run_query_attacks(endpoint: Endpoint, images: Sequence[np.ndarray] | np.ndarray, plan: QueryPlan,
                      params: QueryAttackParams, out_dir: str | Path, subject: dict | None = None,
                      init_images: dict[int, np.ndarray] | None = None,
                      on_image: Callable[[dict], None] | None = None) -> QueryRunResult:
    """Attack plan's images (images[j]: the plan's j-th source, (C, H, W) float32 in [0, 1]) through the
    endpoint; results.jsonl gets one row per image, images/img-<index>.npy the best adversarial image.
    init_images: test index -> (C, H, W) image, the targeted attacks' starts. Resumes: rows kept."""
    out = Path(out_dir)
    header = {"params": asdict(params), "model": endpoint.model, "plan": plan._asdict(), "subject": subject}
    rows = open_results(out, header)
    done = {r["index"] for r in rows}
    computed = 0
    for j, index in enumerate(plan.indices):
        if index in done:
            continue
        rng = np.random.default_rng([params.seed, index])
        init = (init_images or {}).get(plan.inits[j]) if plan.inits[j] >= 0 else None
        row = attack_one(endpoint, params, np.asarray(images[j], np.float32), plan.labels[j], plan.targets[j],
                         init, rng)
        best = row.pop("image")
        if best is not None:
            (out / "images").mkdir(exist_ok=True)
            path = out / "images" / f"img-{index:06d}.npy"
            write_atomic(path, _npy_bytes(best))
        row.update(index=index, label=plan.labels[j], target=plan.targets[j])
        _append(out / RESULTS_FILE, row)
        rows.append(row)
        computed += 1
        if on_image is not None:
            on_image(row)
    return QueryRunResult(out, rows, computed, len(done))


def _npy_bytes(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def plan_from_model(model, images, labels: np.ndarray, params: QueryAttackParams, batch_size: int = 64) -> QueryPlan:
    """plan_query_attack over a seeded sample of the test set (at least 512 images, or 8 per attacked image),
    judged correct by the experimenter's copy of the model (the attacker never sees it)."""
    import torch

    from semguard.attacks.generate import take_images
    from semguard.models.inputs import as_model_input

    labels = np.asarray(labels, np.int64)
    model = model.eval()
    sample = np.sort(np.random.default_rng([params.seed, 1]).permutation(len(labels))[:max(512, 8 * params.n_images)])
    with torch.no_grad():
        batches = (as_model_input(take_images(images, sample[i:i + batch_size]))
                   for i in range(0, len(sample), batch_size))
        predicted = np.concatenate([model(x).argmax(1).numpy() for x in batches])
    plan = plan_query_attack(predicted, labels[sample], params.n_images, params.targeted, params.seed)
    to_test = lambda js: [int(sample[j]) if j >= 0 else -1 for j in js]  # noqa: E731
    return QueryPlan(to_test(plan.indices), plan.labels, plan.targets, to_test(plan.inits))


def plan_images(images, indices: Sequence[int]) -> np.ndarray:
    """(n, C, H, W) float32 in [0, 1] of test images `indices` (any test-set format attacks.generate takes)."""
    from semguard.attacks.generate import take_images
    from semguard.models.inputs import as_model_input

    if not len(indices):
        return np.zeros((0,), np.float32)
    return as_model_input(take_images(images, list(indices))).numpy()


def summary_line(rows: Sequence[dict]) -> str:
    """'k/n succeeded, median m queries to success; d/n flagged by the query defence'."""
    wins = [r["queries_to_success"] for r in rows if r["success"]]
    detected = sum(r["queries_to_detection"] is not None for r in rows)
    median = f", median {int(np.median(wins))} queries to success" if wins else ""
    return f"{len(wins)}/{len(rows)} succeeded{median}; {detected}/{len(rows)} noticed by the query defence"
