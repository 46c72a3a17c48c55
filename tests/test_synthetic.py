"""The built-in synthetic German->English corpus: sizes, determinism, disjointness, grammar."""

from __future__ import annotations

import pytest

from ctprune.data.synthetic import INTRANSITIVE, SPLITS, TIMES, TRANSITIVE, synthetic_corpus

SIZES = {"train": 4000, "val": 200, "test": 200}
FINITE_VERBS = {form for verb in TRANSITIVE + INTRANSITIVE for form in verb[:2]}


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[tuple[str, str]]]:
    return {split: synthetic_corpus(split) for split in SPLITS}


def test_split_sizes(corpus: dict[str, list[tuple[str, str]]]) -> None:
    assert SPLITS == ("train", "val", "test")
    assert {split: len(pairs) for split, pairs in corpus.items()} == SIZES


def test_deterministic(corpus: dict[str, list[tuple[str, str]]]) -> None:
    for split in SPLITS:
        assert synthetic_corpus(split) == corpus[split]


def test_returns_a_fresh_list() -> None:
    synthetic_corpus("val").clear()
    assert len(synthetic_corpus("val")) == 200


def test_splits_are_disjoint(corpus: dict[str, list[tuple[str, str]]]) -> None:
    german = {split: {de for de, _ in pairs} for split, pairs in corpus.items()}
    assert all(len(german[s]) == SIZES[s] for s in SPLITS)  # no duplicates within a split either
    assert not german["train"] & german["val"]
    assert not german["train"] & german["test"]
    assert not german["val"] & german["test"]


def test_unknown_split_raises() -> None:
    msg = "unknown synthetic split 'test_2016_flickr'; choose one of train, val, test"
    with pytest.raises(ValueError) as err:
        synthetic_corpus("test_2016_flickr")
    assert str(err.value) == msg


def test_pairs_are_short_well_formed_sentences(corpus: dict[str, list[tuple[str, str]]]) -> None:
    for pairs in corpus.values():
        for de, en in pairs:
            for s in (de, en):
                words = s.split()
                assert 4 <= len(words) <= 16, s
                assert s == " ".join(words) and s.endswith(" .") and s[0].isupper(), s


def test_subordinate_clauses_are_verb_final(corpus: dict[str, list[tuple[str, str]]]) -> None:
    final = [de for de, _ in corpus["train"] if " , weil " in de]
    assert len(final) > 50
    assert all(de.split()[-2] in FINITE_VERBS for de in final)
    # English keeps subject-verb order: "..., because the woman reads a book ."
    pairs = dict(corpus["train"])
    assert all(", because " in pairs[de] and pairs[de].split()[-2] not in FINITE_VERBS for de in final)


def test_fronted_time_adverb_puts_the_verb_second(corpus: dict[str, list[tuple[str, str]]]) -> None:
    times = {de.capitalize() for de, _ in TIMES}
    fronted = [de.split() for de, _ in corpus["train"] if de.split()[0] in times]
    assert len(fronted) > 50
    assert all(words[1] in FINITE_VERBS for words in fronted)


def test_agreement_examples_occur(corpus: dict[str, list[tuple[str, str]]]) -> None:
    pairs = corpus["train"]
    assert any("einen kleinen" in de and "a small" in en for de, en in pairs)
    assert any(de.startswith("Der Mann sieht") and en.startswith("The man sees") for de, en in pairs)
    assert any(de.startswith("Die Männer sehen") and en.startswith("The men see") for de, en in pairs)
    assert any(" im Park" in de and " in the park" in en for de, en in pairs)
    assert any(" auf dem Tisch" in de and " on the table" in en for de, en in pairs)


def test_small_vocabulary(corpus: dict[str, list[tuple[str, str]]]) -> None:
    for side in (0, 1):
        vocab = {w for pairs in corpus.values() for pair in pairs for w in pair[side].split()}
        assert 40 < len(vocab) < 200, len(vocab)
