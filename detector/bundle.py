"""Guard bundle on disk (ARCHITECTURE.md "Formats"): a directory read and written without pickle.

    bundle.json              manifest: model spec + weights hash, input shape, normalisation note,
                             tapped layers, labels, signature settings, sha256 of every file
    model.safetensors        the model's weights (safetensors.torch.save_model)
    words.safetensors        label word vectors (C, d) (the similarity space's source)
    reference.safetensors    detector.reference bank
    flagger.json             detector.flagger
    mahalanobis.safetensors  detector.mahalanobis, when the flagger uses its scores

The model is rebuilt through the one model factory (models.factory.create_model) from bundle.json's
"model" (a ModelSpec: builder, JSON kwargs checked against the builder's allow-list, registering
module), then model.safetensors is loaded into it. An entry-point model (a user's code) is refused
unless the caller passes `trust_model_code=True` (`semguard serve --trust-model-code`).
"""
from __future__ import annotations

import json
import os
import pwd
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from semguard.detector.flagger import Flagger
from semguard.detector.mahalanobis import MahalanobisDetector, load_mahalanobis, save_mahalanobis
from semguard.detector.reference import ReferenceBank, load_bank, save_bank, word_similarity
from semguard.files import check_safetensors, chmod_like_open, read_json, sha256_file, write_atomic
from semguard.models.factory import ModelSpec, UntrustedModelCode, create_model

BUNDLE_FORMAT = "semguard.bundle/1"
FILES = {
    "model": "model.safetensors",
    "words": "words.safetensors",
    "reference": "reference.safetensors",
    "flagger": "flagger.json",
    "mahalanobis": "mahalanobis.safetensors",
}


class BundleError(ValueError):
    """A bundle that is incomplete, corrupt, or does not belong to its model."""


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class BundleManifest:
    model_name: str
    model: ModelSpec
    input_shape: tuple[int, int, int]  # (C, H, W)
    layers: tuple[str, ...]
    labels: tuple[str, ...]
    normalisation: str = "inside the model: images (B, C, H, W) float32 in [0, 1]"
    source_weights: str | None = None  # provenance only; the bundle's own copy is model.safetensors
    n_alternatives: int | None = None  # signature settings (None: every other label)
    signature_seed: int = 0
    files: dict[str, str] = field(default_factory=dict)  # role -> file name in the bundle
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> hex digest

    def to_json(self) -> dict:
        d = asdict(self)
        d["input_shape"], d["layers"], d["labels"] = list(self.input_shape), list(self.layers), list(self.labels)
        return {"format": BUNDLE_FORMAT, **d}

    @classmethod
    def from_json(cls, d: dict) -> "BundleManifest":
        if d.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"bundle.json: format {d.get('format')!r} is not {BUNDLE_FORMAT!r}")
        try:
            d = {k: v for k, v in d.items() if k != "format"}
            d["model"] = ModelSpec(**d["model"])
            d["input_shape"] = tuple(int(v) for v in d["input_shape"])
            d["layers"], d["labels"] = tuple(d["layers"]), tuple(d["labels"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise BundleError(f"bundle.json: malformed manifest ({e})") from None


# ----------------------------------------------------------------------------- write / read


@dataclass(frozen=True)
class Bundle:
    manifest: BundleManifest
    model: nn.Module
    words: np.ndarray  # (C, d) float32
    bank: ReferenceBank
    flagger: Flagger
    mahalanobis: MahalanobisDetector | None


def write_bundle(
    out_dir: str | Path,
    manifest: BundleManifest,
    model: nn.Module,
    words: np.ndarray,
    bank: ReferenceBank,
    flagger: Flagger,
    mahalanobis: MahalanobisDetector | None = None,
) -> Path:
    """Write every file, then bundle.json (last, with their hashes: a bundle without it is incomplete)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bundle.json").unlink(missing_ok=True)
    save_model(model, str(out / FILES["model"]))
    save_file({"vectors": torch.from_numpy(np.ascontiguousarray(words, dtype=np.float32))}, str(out / FILES["words"]),
              metadata={"labels": json.dumps(list(manifest.labels))})
    save_bank(bank, out / FILES["reference"])
    flagger.save(out / FILES["flagger"])
    roles = ["model", "words", "reference", "flagger"]
    if mahalanobis is not None:
        save_mahalanobis(mahalanobis, out / FILES["mahalanobis"])
        roles.append("mahalanobis")
    files = {r: FILES[r] for r in roles}
    for name in files.values():  # safetensors writes 0600: the serving user (another uid in a container) must read them
        chmod_like_open(out / name)
    hashes = {name: sha256_file(out / name) for name in files.values()}
    final = BundleManifest(**{**asdict(manifest), "model": manifest.model, "files": files, "sha256": hashes})
    write_atomic(out / "bundle.json", json.dumps(final.to_json(), indent=1))
    return out


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:  # a container's numeric user with no passwd entry
        return f"uid {uid}"


def check_readable(path: Path, access: int = os.R_OK) -> None:
    """BundleError naming the file, its mode and owner and this process's user when `access` is denied
    (a bundle written 0600 by one user and served by another, the container's uid 10001)."""
    if os.access(path, access):
        return
    st = path.stat()
    raise BundleError(f"{path}: not readable by {_user()}: mode {st.st_mode & 0o7777:04o}, owner uid {st.st_uid} "
                      "(make the bundle readable by the serving user: chmod -R a+rX)")


def _file(root: Path, manifest: BundleManifest, role: str) -> Path:
    name = manifest.files.get(role)
    if name is None:
        raise BundleError(f"bundle.json lists no {role} file")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise BundleError(f"bundle.json: field files.{role} must be a file name inside the bundle, got {name!r}")
    path = root / name
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"bundle.json: field files.{role}: {name} is a symlink out of the bundle "
                          f"(to {path.resolve()})")
    if not path.is_file():
        raise BundleError(f"bundle {str(root)!r} is missing {name}")
    check_readable(path)
    if sha256_file(path) != manifest.sha256.get(name):
        raise BundleError(f"{name}: sha256 does not match bundle.json (a file from another bundle or corrupted)")
    if name.endswith(".safetensors"):
        try:
            check_safetensors(path)
        except ValueError as e:
            raise BundleError(str(e)) from None
    return path


def read_bundle(bundle_dir: str | Path, *, trust_model_code: bool = False) -> Bundle:
    """Load and cross-check a bundle; every inconsistency is a BundleError (a ValueError).
    trust_model_code: see models.factory.create_model (an entry-point model is refused without it)."""
    root = Path(bundle_dir)
    if root.is_dir():
        check_readable(root, os.R_OK | os.X_OK)
    if not (root / "bundle.json").is_file():
        raise BundleError(f"bundle_dir: {str(root)!r} has no bundle.json (not a guard bundle, or incomplete)")
    check_readable(root / "bundle.json")
    try:
        manifest = BundleManifest.from_json(read_json(root / "bundle.json"))
    except BundleError:
        raise
    except ValueError as e:
        raise BundleError(str(e)) from None
    try:
        model = create_model(manifest.model, trust_model_code=trust_model_code)
    except UntrustedModelCode as e:
        raise UntrustedModelCode(f"{root / 'bundle.json'}: {e}") from None
    except ValueError as e:  # the file named
        raise BundleError(f"{root / 'bundle.json'}: {e}") from None
    fits = f"model.safetensors does not fit builder {manifest.model.builder!r} with kwargs {manifest.model.kwargs}"
    try:
        missing, unexpected = load_model(model, str(_file(root, manifest, "model")), strict=False)
    except RuntimeError as e:  # shape mismatches: weights of another architecture
        raise BundleError(f"{fits}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise BundleError(f"{fits}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    words_path = _file(root, manifest, "words")
    with safe_open(str(words_path), framework="pt") as f:
        words = f.get_tensor("vectors").numpy()
    bank = load_bank(_file(root, manifest, "reference"))
    flagger = Flagger.load(_file(root, manifest, "flagger"))
    maha = load_mahalanobis(_file(root, manifest, "mahalanobis")) if "mahalanobis" in manifest.files else None
    bundle = Bundle(manifest, model.eval(), words, bank, flagger, maha)
    check_consistency(bundle)
    return bundle


def check_consistency(bundle: Bundle) -> None:
    """Layers, labels and words agree across the bundle's parts."""
    m, bank = bundle.manifest, bundle.bank
    c = len(m.labels)
    if bank.layers != m.layers:
        raise BundleError(f"reference bank layers {list(bank.layers)[:3]}... differ from bundle.json layers {list(m.layers)[:3]}...")
    if bank.num_labels != c or len(bundle.words) != c:
        raise BundleError(f"label count mismatch: bundle.json {c}, reference bank {bank.num_labels}, words {len(bundle.words)}")
    if bank.space == "words" and not np.allclose(word_similarity(bundle.words)[:, bank.concepts], bank.label_profiles, atol=1e-5):
        raise BundleError("words.safetensors does not match the reference bank's word profiles")
    used = {n.split("/", 1)[1] for n in bundle.flagger.feature_names} | set(bundle.flagger.explain_layers)
    known = set(m.layers) | set(bundle.mahalanobis.layers if bundle.mahalanobis else ())
    if not used <= known:
        raise BundleError(f"flagger uses layers not in the bundle: {sorted(used - known)[:5]}")
    if any(n.startswith("mahalanobis/") for n in bundle.flagger.feature_names) and bundle.mahalanobis is None:
        raise BundleError("flagger uses Mahalanobis scores but the bundle has no mahalanobis file")
