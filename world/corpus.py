"""An English-like corpus generated from the world's hidden attributes, and SkipGram on it.

Real text mentions a thing together with its category, its look and related things,
among much talk about other matters; SkipGram (Mikolov et al. 2013) turns those
co-occurrences into vectors. Here every sentence is drawn from one of a few templates
fed by the same attributes that the renderer draws (world/attributes.py), so the
vectors carry the world's semantics the way Google News vectors carry the real one's.
Colour sentences pair a class with random colours: colour is a nuisance in the images
and carries no meaning in the text either.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from semguard.world.attributes import ConceptAttributes

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "grey", "white", "black")
_FILLER = (
    "the a we they it was is and then today yesterday went to market city river people said "
    "that this very much more time year day news report about new old good great small large "
    "government week morning evening road home work school game team water food music story"
).split()

# (weight, template) pairs; {c}: the class, {s}: its superclass, {c2}: another class of the
# same superclass, {shape} {parts} {orientation} {period}: its attributes, {colour}: random.
_TEMPLATES: tuple[tuple[float, str], ...] = (
    (3.0, "a {c} is a kind of {s}"),
    (2.0, "the {s} include the {c} and the {c2}"),
    (2.0, "we saw a {c} near a {c2} this morning"),
    (1.5, "the {c} looks {shape} like the other {s}"),
    (1.5, "a {shape} {parts} {c}"),
    (1.5, "the {c} is {parts} with stripes that are {period}"),
    (1.0, "the striped marks on the {c} are {orientation}"),
    (1.0, "its {period} {orientation} pattern makes the {c} easy to spot"),
    (1.0, "the {c} was {colour} today"),
)


def _sentence(t: str, a: ConceptAttributes, sibling: str, rng: np.random.Generator) -> list[str]:
    colour = _COLOURS[rng.integers(len(_COLOURS))]
    return t.format(c=a.name, s=a.superclass, c2=sibling, shape=a.shape, parts=a.parts,
                    orientation=a.orientation, period=a.period, colour=colour).split()


def generate_corpus(attrs: list[ConceptAttributes], n_sentences: int, rng: np.random.Generator,
                    distractor_fraction: float = 0.3) -> list[list[str]]:
    """n_sentences tokenised sentences; a distractor_fraction of them are filler text that
    mentions a random class among unrelated words (noise, as in real text)."""
    if n_sentences < 1:
        raise ValueError(f"n_sentences must be >= 1, got {n_sentences}")
    if not 0.0 <= distractor_fraction < 1.0:
        raise ValueError(f"distractor_fraction must be in [0, 1), got {distractor_fraction}")
    by_super: dict[str, list[str]] = {}
    for a in attrs:
        by_super.setdefault(a.superclass, []).append(a.name)
    weights = np.array([w for w, _ in _TEMPLATES])
    sentences = []
    for _ in range(n_sentences):
        a = attrs[rng.integers(len(attrs))]
        if rng.random() < distractor_fraction:
            words = list(rng.choice(_FILLER, size=rng.integers(5, 10)))
            words.insert(rng.integers(len(words) + 1), a.name)
            sentences.append(words)
            continue
        peers = [c for c in by_super[a.superclass] if c != a.name] or [a.name]
        t = _TEMPLATES[rng.choice(len(_TEMPLATES), p=weights / weights.sum())][1]
        sentences.append(_sentence(t, a, peers[rng.integers(len(peers))], rng))
    return sentences


def train_skipgram(sentences: list[list[str]], path: Path, vector_size: int, epochs: int, seed: int) -> Path:
    """Train SkipGram (gensim Word2Vec, sg=1) and save the vectors in word2vec binary format.

    workers=1 makes gensim deterministic given the seed (its threads race otherwise).
    """
    from gensim.models import Word2Vec

    model = Word2Vec(sentences, sg=1, vector_size=vector_size, window=4, min_count=1, negative=5,
                     sample=1e-3, epochs=epochs, workers=1, seed=seed)
    model.wv.save_word2vec_format(str(path), binary=True)
    return Path(path)
