"""detector.reference: selection, prototypes, similarity spaces, reductions, safetensors round trip."""
import numpy as np
import pytest
import torch

from semguard.detector.reference import (
    Reduction, ReferenceBank, build_reference_bank, class_similarity, load_bank, save_bank, select_references,
    shuffled_word_similarity, word_similarity,
)


def pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    d = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if d < 1e-12 else float((x * y).sum() / d)


def test_select_references_only_correct_images():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    predicted = np.array([0, 0, 1, 1, 0, 0, 0, 3, 3, 3])  # concept 2 never correct
    sel = select_references(labels, predicted, k=10, per_concept=2, seed=0)
    assert sel.concepts.tolist() == [0, 1, 3]
    for c, idx in zip(sel.concepts, sel.images):
        assert len(idx) <= 2 and (labels[idx] == c).all() and (predicted[idx] == c).all()
    sub = select_references(np.repeat(np.arange(20), 2), np.repeat(np.arange(20), 2), k=5, seed=1)
    assert len(sub.concepts) == 5 and len(set(sub.concepts)) == 5
    np.testing.assert_array_equal(sub.concepts, select_references(np.repeat(np.arange(20), 2), np.repeat(np.arange(20), 2), k=5, seed=1).concepts)


def test_prototypes_are_means_and_profiles_are_similarity_columns():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 4)
    sel = select_references(labels, labels, k=4, per_concept=3, seed=2)
    chosen = np.concatenate(sel.images)
    acts = {"a": rng.normal(size=(len(labels), 5)), "b": rng.normal(size=(len(labels), 3))}
    vectors = rng.normal(size=(6, 10))
    bank = build_reference_bank({n: a[chosen] for n, a in acts.items()}, sel, word_similarity(vectors))
    for j, idx in enumerate(sel.images):
        np.testing.assert_allclose(bank.prototypes["a"][j], acts["a"][idx].mean(0), rtol=1e-6)
    want = np.array([[pearson(vectors[c], vectors[r]) for r in sel.concepts] for c in range(6)])
    np.testing.assert_allclose(bank.label_profiles, want, atol=1e-12)
    assert bank.bytes_per_layer() == {"a": 4 * 5 * 4, "b": 4 * 3 * 4}
    # profiles: Pearson of each image with each prototype
    x = torch.from_numpy(acts["a"][:3])
    got = bank.layer_profiles({"a": x, "b": torch.from_numpy(acts["b"][:3])}, dtype=torch.float64)
    want = np.array([[pearson(acts["a"][i], bank.prototypes["a"][j].astype(np.float64)) for j in range(4)] for i in range(3)])
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-12)


def test_similarity_spaces():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(7, 5))
    s = word_similarity(v)
    assert s.shape == (7, 7) and np.allclose(np.diag(s), 1)
    shuffled = shuffled_word_similarity(v, seed=3)
    perm = np.random.default_rng(3).permutation(7)
    np.testing.assert_allclose(shuffled, s[np.ix_(perm, perm)], atol=1e-12)
    np.testing.assert_allclose(class_similarity(v), s)


def test_reductions_are_linear_and_exact_in_expectation():
    x = torch.arange(24, dtype=torch.float64).reshape(2, 12)  # (B, 3 channels x 4 positions)
    pooled = Reduction("channel_pool", channels=3).apply(x)
    np.testing.assert_allclose(pooled.numpy(), x.reshape(2, 3, 4).mean(-1).numpy())
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=2000), rng.normal(size=2000)
    b = 0.6 * a + 0.8 * b
    dots = []
    for seed in range(30):
        r = Reduction("projection", dim=64, seed=seed)
        pa, pb = r.apply(torch.from_numpy(np.stack([a, b])))
        dots.append(float(pa @ pb))
    ca, cb = a - a.mean(), b - b.mean()
    assert abs(np.mean(dots) - ca @ cb) < 0.1 * abs(ca @ cb)  # inner product of centred vectors, in expectation
    assert Reduction("projection", dim=64).output_dim(2000) == 64


def count_sketch_loop(x, dim, signs):
    """By definition: each centred coordinate i, times its sign, added into bucket i mod dim."""
    out = np.zeros((len(x), dim))
    for b, row in enumerate(x):
        centred = row - row.mean()
        for i, v in enumerate(centred):
            out[b, i % dim] += signs[i] * v
    return out


@pytest.mark.parametrize("k, dim", [(24, 6), (23, 5), (7, 16), (40, 40)])
def test_count_sketch_matches_definition(k, dim):
    from semguard.detector.reference import sketch_signs

    x = np.random.default_rng(k).normal(size=(9, k)) + 3.0
    got = Reduction("sketch", dim=dim, seed=5).apply(torch.from_numpy(x))
    signs = sketch_signs(k, dim, 5, torch.float64)[0].numpy()
    assert set(np.unique(signs)) == {-1.0, 1.0}
    np.testing.assert_allclose(got.numpy(), count_sketch_loop(x, dim, signs), atol=1e-10)
    assert Reduction("sketch", dim=dim).output_dim(k) == dim


def test_count_sketch_is_exact_in_expectation_and_chunked_rows_agree():
    # bit for bit holds at one intra-op thread (a reduction split over threads sums in another order); an
    # earlier test in this worker process may have set more (the service sizes its pool to the machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_count_sketch()
    finally:
        torch.set_num_threads(threads)


def _check_count_sketch():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=2000) + 1.0, rng.normal(size=2000)
    b = 0.6 * a + 0.8 * b
    ca, cb = a - a.mean(), b - b.mean()
    dots = [float(np.prod(Reduction("sketch", dim=64, seed=seed).apply(torch.from_numpy(np.stack([a, b]))).numpy(), 0).sum())
            for seed in range(200)]
    # E = <ca, cb>; one sketch's sd is about sqrt((|ca|^2 |cb|^2 + <ca, cb>^2) / 64) = 0.2 <ca, cb>
    assert abs(np.mean(dots) - ca @ cb) < 0.05 * abs(ca @ cb)
    # rows are signed in chunks (one row of 1.5 M at a time here, 2 of 100 000): the same, bit for bit, as the whole batch at once
    from semguard.detector.reference import _fold, sketch_signs

    narrow = torch.from_numpy(rng.normal(size=(5, 100_000)).astype(np.float32))
    signs, folded = sketch_signs(100_000, 4093, 1, torch.float32)
    assert torch.equal(Reduction("sketch", dim=4093, seed=1).apply(narrow),
                       _fold(narrow * signs, 4093) - narrow.mean(1, keepdim=True) * folded)

    wide = torch.from_numpy(rng.normal(size=(5, 1_500_000)).astype(np.float32))
    signs, folded = sketch_signs(1_500_000, 4096, 1, torch.float32)
    whole = _fold(wide * signs, 4096) - wide.mean(1, keepdim=True) * folded
    assert torch.equal(Reduction("sketch", dim=4096, seed=1).apply(wide), whole)


def test_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(5), 2)
    sel = select_references(labels, labels, k=5, per_concept=2)
    red = {"a": Reduction("projection", dim=4, seed=7), "b": Reduction("sketch", dim=3, seed=2)}
    acts = {n: r.apply(torch.from_numpy(rng.normal(size=(10, 9)))).numpy() for n, r in red.items()}
    bank = build_reference_bank(acts, sel, word_similarity(rng.normal(size=(5, 4))), space="shuffled_words")
    bank = ReferenceBank(bank.layers, bank.prototypes, bank.concepts, bank.label_profiles, bank.space, red)
    back = load_bank(save_bank(bank, tmp_path / "r.safetensors"))
    assert back.layers == bank.layers and back.space == "shuffled_words" and back.reductions == red
    for n in red:
        np.testing.assert_array_equal(back.prototypes[n], bank.prototypes[n])
    np.testing.assert_array_equal(back.label_profiles, bank.label_profiles)


def test_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match="reduction kind"):
        Reduction("pca")
    with pytest.raises(ValueError, match="channels"):
        Reduction("channel_pool")
    with pytest.raises(ValueError, match="do not split"):
        Reduction("channel_pool", channels=5).apply(torch.zeros(1, 12))
    with pytest.raises(ValueError, match="at least 2 concepts"):
        select_references(np.array([0, 1]), np.array([0, 0]))
    with pytest.raises(ValueError, match="vectors"):
        word_similarity(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="concepts must be"):
        ReferenceBank(("a",), {"a": np.zeros((2, 3))}, np.array([1, 1]), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="space must be"):
        ReferenceBank(("a",), {"a": np.zeros((2, 3))}, np.array([0, 1]), np.zeros((4, 2)), space="glove")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a semguard reference bank"):
        load_bank(tmp_path / "other.safetensors")


def test_float32_profiles_match_pearson_without_a_normalised_copy():
    # serving path folds the prototype normalisation into the matmul: same Pearson profiles, incl. a
    # constant prototype (zero profile), a constant image and activations with a large common offset
    rng = np.random.default_rng(7)
    protos = {"a": (rng.normal(size=(5, 300)) + 20.0).astype(np.float32), "b": rng.normal(size=(5, 4)).astype(np.float32)}
    protos["a"][2] = 3.0
    labels = np.arange(5)
    bank = ReferenceBank(("a", "b"), protos, labels, word_similarity(rng.normal(size=(5, 8))))
    acts = {"a": rng.normal(size=(6, 300)) + 20.0, "b": rng.normal(size=(6, 4))}
    acts["b"][1] = -1.5
    got = bank.layer_profiles({n: torch.from_numpy(v).float() for n, v in acts.items()})
    assert got.dtype == torch.float32 and got.shape == (2, 6, 5)
    for layer, (n, a) in enumerate(acts.items()):
        x = a.astype(np.float32).astype(np.float64)
        want = np.array([[pearson(x[i], protos[n][j].astype(np.float64)) for j in range(5)] for i in range(6)])
        np.testing.assert_allclose(got[layer].numpy(), want, atol=2e-6)
    assert (got[0, :, 2] == 0).all() and (got[1, 1] == 0).all()
    # what the bank caches per layer is (K,) row statistics, not a second (K, k) copy of the prototypes
    assert all(t.shape == (5,) for stats in bank._row_stats.values() for t in stats)


MEMORY_PROBE = """
import ctypes, numpy as np, torch
from semguard.detector.reference import ReferenceBank, word_similarity

def status(field):  # kB
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

k = 2_000_000
bank = ReferenceBank(("a",), {"a": torch.rand(4, k).numpy()}, np.arange(4), word_similarity(np.eye(4, 3) + 1))
bank._row_stats  # computed once, at load: not part of a request
x = torch.rand(8, k)  # 61 MiB of float32 activations
ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed setup memory back, so it cannot hide new allocations
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
before = status("VmRSS")
bank.layer_profiles({"a": x})
print((status("VmHWM") - before) / 1024)  # MiB
"""


def test_serving_profiles_make_no_float64_copy_of_the_activations():
    # New peak memory of one call, in a fresh process: the float32 centred copy of the batch (61 MiB)
    # and small temporaries; a float64 copy of it would be 122 MiB on its own.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True)
    if "clear_refs" in out.stderr or "libc.so.6" in out.stderr:
        pytest.skip(f"cannot reset or read peak memory here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    peak = float(out.stdout.strip())
    assert 30 < peak < 100, f"peak {peak:.1f} MiB"  # measured 61.7; with a float64 copy >= 122
