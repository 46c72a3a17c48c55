"""A built-in, code-generated German->English parallel corpus for demos and fast tests.

The sentences come from a small grammar with a small vocabulary, but with real German
structure that a translation model has to learn: gender and case agreement of articles
and adjectives (der/den/dem, ein/einen/einem, ein kleiner / einen kleinen Hund), plural
nouns and subject-verb agreement, verb-second main clauses with a fronted time adverb or
place ("Heute sieht der Mann einen Hund ."), verb-final subordinate clauses
("... , weil die Frau ein Buch liest ."), and prepositional phrases ("im Park").
Punctuation is split off by a space, as in Multi30k. Everything is deterministic.
"""

from __future__ import annotations

import random
from functools import lru_cache
from types import MappingProxyType

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_SIZES = MappingProxyType({"train": 4000, "val": 200, "test": 200})
SEED = 20240611
MAX_WORDS = 16  # whitespace tokens per side, punctuation included
MIN_WORDS = 4

# Nouns: (singular, plural, gender m/f/n, English singular, English plural, kind).
NOUNS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("Mann", "Männer", "m", "man", "men", "person"),
    ("Frau", "Frauen", "f", "woman", "women", "person"),
    ("Kind", "Kinder", "n", "child", "children", "person"),
    ("Hund", "Hunde", "m", "dog", "dogs", "animal"),
    ("Katze", "Katzen", "f", "cat", "cats", "animal"),
    ("Buch", "Bücher", "n", "book", "books", "text"),
    ("Ball", "Bälle", "m", "ball", "balls", "thing"),
    ("Apfel", "Äpfel", "m", "apple", "apples", "thing"),
    ("Blume", "Blumen", "f", "flower", "flowers", "thing"),
)
# Places for prepositional phrases (always dative here): (noun, gender, English, prepositions).
PLACES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("Park", "m", "park", ("in",)),
    ("Garten", "m", "garden", ("in",)),
    ("Haus", "n", "house", ("in", "vor")),
    ("Tisch", "m", "table", ("auf", "unter")),
    ("Baum", "m", "tree", ("unter",)),
)
PREPOSITIONS = MappingProxyType({"in": "in", "auf": "on", "unter": "under", "vor": "in front of"})
_ALL = ("person", "animal", "thing", "text", "place")
# Adjectives: (stem, English, kinds of noun they go with).
ADJECTIVES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("klein", "small", _ALL), ("alt", "old", _ALL), ("jung", "young", ("person", "animal")),
    ("rot", "red", ("animal", "thing", "place")),
)
ANIMATE = ("person", "animal")
OBJECTS = ("person", "animal", "thing", "text")
# Transitive verbs: (3sg, plural, English 3sg, English plural, subject kinds, object kinds).
TRANSITIVE: tuple[tuple[str, str, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("sieht", "sehen", "sees", "see", ANIMATE, OBJECTS),
    ("liest", "lesen", "reads", "read", ("person",), ("text",)),
    ("kauft", "kaufen", "buys", "buy", ("person",), ("animal", "thing", "text")),
    ("mag", "mögen", "likes", "like", ANIMATE, OBJECTS),
)
# Intransitive verbs: (3sg, plural, English 3sg, English plural, subject kinds).
INTRANSITIVE: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("schläft", "schlafen", "sleeps", "sleep", ANIMATE),
    ("spielt", "spielen", "plays", "play", ANIMATE),
    ("sitzt", "sitzen", "sits", "sit", ANIMATE),
)
TIMES: tuple[tuple[str, str], ...] = (("heute", "today"), ("jetzt", "now"), ("oft", "often"))
CONJUNCTIONS: tuple[tuple[str, str], ...] = (("weil", "because"), ("wenn", "when"))

# Article and adjective-ending tables, indexed by case, then by m, f, n, plural.
_GENDER = MappingProxyType({"m": 0, "f": 1, "n": 2, "pl": 3})
_DEFINITE = MappingProxyType({"nom": ("der", "die", "das", "die"), "acc": ("den", "die", "das", "die"),
                              "dat": ("dem", "der", "dem", "den")})
_INDEFINITE = MappingProxyType({"nom": ("ein", "eine", "ein"), "acc": ("einen", "eine", "ein"),
                                "dat": ("einem", "einer", "einem")})
_WEAK = MappingProxyType({"nom": ("e", "e", "e", "en"), "acc": ("en", "e", "e", "en"),
                          "dat": ("en", "en", "en", "en")})  # after der/die/das
_MIXED = MappingProxyType({"nom": ("er", "e", "es"), "acc": ("en", "e", "es"),
                           "dat": ("en", "en", "en")})  # after ein/eine

Phrase = tuple[list[str], list[str]]  # (German tokens, English tokens)


def _english_article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _adjective(rng: random.Random, kind: str, p: float) -> tuple[str, str, tuple[str, ...]] | None:
    """With probability ``p``, an adjective that suits a noun of ``kind``."""
    return rng.choice([a for a in ADJECTIVES if kind in a[2]]) if rng.random() < p else None


def _noun_phrase(rng: random.Random, case: str, kinds: tuple[str, ...]) -> tuple[Phrase, bool]:
    """An article (+ adjective) + noun in ``case``; returns the phrase and whether it is plural."""
    sg, pl, gender, en_sg, en_pl, kind = rng.choice([n for n in NOUNS if n[5] in kinds])
    plural = rng.random() < 0.35
    adj = _adjective(rng, kind, 0.25)
    noun = pl if plural else sg
    if plural and case == "dat" and not noun.endswith(("n", "s")):
        noun += "n"  # dative plural: den Hunden, den Kindern
    g = _GENDER["pl" if plural else gender]
    en_noun = en_pl if plural else en_sg
    en_words = ([adj[1]] if adj else []) + [en_noun]
    det = rng.random()
    if not plural and det < 0.45:
        de = [_INDEFINITE[case][g]] + ([adj[0] + _MIXED[case][g]] if adj else [])
        en = [_english_article(en_words[0])]
    else:
        de = [_DEFINITE[case][g]] + ([adj[0] + _WEAK[case][g]] if adj else [])
        en = ["the"]
    return (de + [noun], en + en_words), plural


def _place(rng: random.Random) -> Phrase:
    """A dative prepositional phrase, contracting in/an + dem to im/am."""
    noun, gender, en_noun, preps = rng.choice(PLACES)
    prep = rng.choice(preps)
    en_prep = PREPOSITIONS[prep].split()
    g = _GENDER[gender]
    adj = _adjective(rng, "place", 0.2)
    en_words = ([adj[1]] if adj else []) + [en_noun]
    if rng.random() < 0.75:
        art, ending, en_art = _DEFINITE["dat"][g], _WEAK["dat"][g], "the"
        if art == "dem" and prep in ("in", "an"):
            prep, art = prep[0] + "m", ""  # im Park, am Fluss
    else:
        art, ending, en_art = _INDEFINITE["dat"][g], _MIXED["dat"][g], _english_article(en_words[0])
    de = [prep] + ([art] if art else []) + ([adj[0] + ending] if adj else []) + [noun]
    return de, en_prep + [en_art] + en_words


def _clause(rng: random.Random) -> dict[str, Phrase]:
    """Subject, finite verb, optional object and optional place of one clause (unordered)."""
    transitive = rng.random() < 0.6
    verb = rng.choice(TRANSITIVE if transitive else INTRANSITIVE)
    subj, plural = _noun_phrase(rng, "nom", verb[4])
    parts = {"subj": subj, "verb": ([verb[1 if plural else 0]], [verb[3 if plural else 2]])}
    if transitive:
        parts["obj"] = _noun_phrase(rng, "acc", verb[5])[0]
    if rng.random() < (0.25 if transitive else 0.7):
        parts["place"] = _place(rng)
    return parts


def _join(parts: dict[str, Phrase], order: tuple[str, ...], lang: int) -> list[str]:
    return [w for key in order if key in parts for w in parts[key][lang]]


_EN_ORDER = ("subj", "verb", "obj", "place")


def _sentence(rng: random.Random) -> tuple[str, str]:
    """One sentence pair from a randomly chosen construction."""
    main = _clause(rng)
    kind = rng.random()
    if kind < 0.65:  # main clause, optionally with a fronted time adverb or place (verb second)
        front = rng.random()
        if front < 0.3:
            time, en_time = rng.choice(TIMES)
            main["front"] = ([time], en_time.split())
        elif front < 0.45 and "place" in main:
            main["front"] = main.pop("place")
        de = _join(main, ("front", "verb", "subj", "obj", "place") if "front" in main else _EN_ORDER, 0)
        en = _join(main, ("front",) + _EN_ORDER, 1)
    else:  # main clause plus a subordinate clause with the verb last
        sub = _clause(rng)
        conj, en_conj = rng.choice(CONJUNCTIONS)
        sub_de = [conj] + _join(sub, ("subj", "obj", "place", "verb"), 0)
        sub_en = [en_conj] + _join(sub, _EN_ORDER, 1)
        if kind < 0.88:  # "Der Hund schläft , weil die Frau ein Buch liest ."
            de = _join(main, _EN_ORDER, 0) + [","] + sub_de
            en = _join(main, _EN_ORDER, 1) + [","] + sub_en
        else:  # "Weil die Frau ein Buch liest , schläft der Hund ." (main verb first)
            de = sub_de + [","] + _join(main, ("verb", "subj", "obj", "place"), 0)
            en = sub_en + [","] + _join(main, _EN_ORDER, 1)
    return _finish(de), _finish(en)


def _finish(words: list[str]) -> str:
    words = words + ["."]
    return " ".join([words[0][0].upper() + words[0][1:]] + words[1:])


@lru_cache(maxsize=1)
def _pool() -> tuple[tuple[str, str], ...]:
    """All splits' pairs, unique by German sentence, drawn from one seeded generator."""
    rng = random.Random(SEED)
    need = sum(SPLIT_SIZES.values())
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < need:
        de, en = _sentence(rng)
        if de in seen or not all(MIN_WORDS <= len(s.split()) <= MAX_WORDS for s in (de, en)):
            continue
        seen.add(de)
        pairs.append((de, en))
    return tuple(pairs)


def synthetic_corpus(split: str) -> list[tuple[str, str]]:
    """The (German, English) pairs of ``split`` ("train": 4000, "val": 200, "test": 200).

    The same on every call and every machine; no German sentence occurs in two splits.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; choose one of train, val, test")
    # Partition the pool: test first, then val, then train, so small splits never shift.
    start = 0
    for name in ("test", "val", "train"):
        if name == split:
            return list(_pool()[start:start + SPLIT_SIZES[name]])
        start += SPLIT_SIZES[name]
    raise AssertionError("unreachable")
