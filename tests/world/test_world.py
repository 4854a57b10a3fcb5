import numpy as np
import pytest

from semguard.detector.rsa import correlation_matrix
from semguard.detector.words import load_vectors
from semguard.world.attributes import PERIODS, ORIENTATIONS, concept_attributes
from semguard.world.build import WorldSettings, build_world
from semguard.world.corpus import generate_corpus, train_skipgram
from semguard.world.render import render
from semguard.world.taxonomy import CLASS_NAMES, SUPERCLASS_NAMES, SUPERCLASSES, select_classes

# A world small enough for tests: 4 superclasses x 5 classes, a few images, one epoch.
TINY = WorldSettings(n_classes=20, train_per_class=20, test_per_class=6, epochs=1, corpus_sentences=4000, w2v_epochs=3)


def test_taxonomy_is_cifar100():
    assert len(CLASS_NAMES) == 100 and CLASS_NAMES == sorted(CLASS_NAMES)
    assert len(SUPERCLASS_NAMES) == 20 and all(len(m) == 5 for m in SUPERCLASSES.values())
    assert {"aquarium_fish", "maple_tree", "sweet_pepper", "lawn_mower"} <= set(CLASS_NAMES)
    assert CLASS_NAMES[:3] == ["apple", "aquarium_fish", "baby"]


def test_select_classes_takes_whole_superclasses():
    chosen = select_classes(10)
    assert sorted(chosen) == sorted(SUPERCLASSES["aquatic_mammals"] + SUPERCLASSES["fish"])
    with pytest.raises(ValueError, match="n_classes"):
        select_classes(12)


def test_attributes_superclass_shared_class_distinct():
    for members in SUPERCLASSES.values():
        attrs = [concept_attributes(c) for c in members]
        assert len({(a.shape, a.parts) for a in attrs}) == 1
        assert len({(a.orientation, a.period) for a in attrs}) == 5
    pairs = {(concept_attributes(m[0]).shape, concept_attributes(m[0]).parts) for m in SUPERCLASSES.values()}
    assert len(pairs) == 20
    assert {concept_attributes(c).orientation for c in CLASS_NAMES} == set(ORIENTATIONS)
    assert {concept_attributes(c).period for c in CLASS_NAMES} == set(PERIODS)
    with pytest.raises(ValueError, match="name"):
        concept_attributes("unicorn")


def test_render_deterministic_shapes_and_dtype():
    attrs = [concept_attributes(c) for c in CLASS_NAMES[:10]]
    labels = np.arange(10).repeat(3)
    a = render(attrs, labels, np.random.default_rng(5))
    b = render(attrs, labels, np.random.default_rng(5))
    c = render(attrs, labels, np.random.default_rng(6))
    assert a.shape == (30, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.std() > 20  # not blank
    with pytest.raises(ValueError, match="labels"):
        render(attrs, np.array([10]), np.random.default_rng(0))


def test_corpus_puts_superclass_mates_closer(tmp_path):
    classes = select_classes(20)
    attrs = [concept_attributes(c) for c in classes]
    sentences = generate_corpus(attrs, 6000, np.random.default_rng(0))
    assert all(isinstance(w, str) for s in sentences for w in s)
    path = train_skipgram(sentences, tmp_path / "v.bin", vector_size=32, epochs=5, seed=0)
    kv = load_vectors(path)
    c = correlation_matrix(np.stack([kv[name] for name in classes]))
    sup = np.array([a.superclass for a in attrs])
    same = (sup[:, None] == sup[None]) & ~np.eye(len(classes), dtype=bool)
    assert c[same].mean() > c[sup[:, None] != sup[None]].mean() + 0.1


def test_build_world_tiny_cached_and_deterministic(tmp_path):
    w1 = build_world(TINY, tmp_path / "a", progress=False)
    assert w1.classes == select_classes(20) and len(w1.superclasses) == 20
    assert w1.train_images.shape == (400, 32, 32, 3) and w1.train_images.dtype == np.uint8
    assert w1.test_images.shape == (120, 32, 32, 3) and w1.test_labels.dtype == np.int64
    assert w1.image_sets(5).shape == (5, 20, 32, 32, 3)
    assert 0.0 <= w1.test_accuracy <= 1.0 and w1.model_path.exists()
    kv = load_vectors(w1.vectors_path)
    assert all(c in kv.key_to_index for c in w1.classes)
    again = build_world(TINY, tmp_path / "a", progress=False)  # reused from the cache
    assert again.root == w1.root and np.array_equal(again.test_images, w1.test_images)
    w2 = build_world(TINY, tmp_path / "b", progress=False)  # rebuilt from scratch
    assert np.array_equal(w1.train_images, w2.train_images)
    assert np.array_equal(kv.vectors, load_vectors(w2.vectors_path).vectors)
    assert w1.vectors_path.read_bytes() == w2.vectors_path.read_bytes()
    assert w1.model_path.read_bytes() == w2.model_path.read_bytes()
    assert w1.test_accuracy == w2.test_accuracy
