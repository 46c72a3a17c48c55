"""sacreBLEU scores on detokenized, cased text (default 13a tokenization), chrF, and the rank
correlation that checks the search's estimate against such measurements."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.base import Score

# Multi30k's references are tokenized around punctuation ("a dog ."); sacreBLEU's warning that
# the text looks tokenized is expected here, and the standard 13a tokenization is still applied.
logging.getLogger("sacrebleu").setLevel(logging.ERROR)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation, rounded; None for fewer than 3 points or a constant side."""
    from scipy.stats import spearmanr  # scipy.stats takes a while to import: only here

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return round(float(spearmanr(x, y).statistic), 4)


def bleu_score(hyps: list[str], refs: list[str]) -> Score:
    return BLEU().corpus_score(hyps, [refs])


@dataclass(frozen=True)
class Scores:
    bleu: float
    chrf: float
    bleu_text: str
    chrf_text: str
    bleu_signature: str
    chrf_signature: str


def score(hyps: list[str], refs: list[str]) -> Scores:
    """BLEU and chrF of ``hyps`` against one reference per line, with their signatures."""
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return Scores(b.score, c.score, str(b), str(c), str(bleu.get_signature()),
                  str(chrf.get_signature()))
