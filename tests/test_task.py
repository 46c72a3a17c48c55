"""The task seam (translation): its loss, log-probabilities and metric are the ones the stages
used before the seam existed, computed independently here."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ctprune.data.batching import Batch
from ctprune.data.corpus import Parallel
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.decode import translate
from ctprune.model.transformer import Seq2SeqTransformer
from ctprune.scoring import bleu_score
from ctprune.task import TRANSLATION, evaluate, kl_per_token, task_of

from .conftest import random_batch


def _batch() -> Batch:
    src, tgt_in = random_batch()
    tgt_out = torch.cat([tgt_in[:, 1:], torch.full((3, 1), 3)], 1)
    tgt_out[2, 3:] = 0  # a padded row
    return Batch(src, tgt_in, tgt_out, torch.arange(3))


def test_translation_loss_is_token_cross_entropy_without_pad(tiny_model: Seq2SeqTransformer) -> None:
    b = _batch()
    logits = tiny_model(b.src, b.tgt_in)
    for smoothing in (0.0, 0.1):
        want = F.cross_entropy(logits.flatten(0, 1), b.tgt_out.flatten(), ignore_index=0, label_smoothing=smoothing)
        torch.testing.assert_close(TRANSLATION.loss(tiny_model, b, smoothing), want)


def test_log_probs_are_one_distribution_per_real_target_token(tiny_model: Seq2SeqTransformer) -> None:
    b = _batch()
    logp = TRANSLATION.log_probs(tiny_model, b)
    assert logp.shape == (int((b.tgt_out != 0).sum()), 99) and logp.dtype == torch.float32
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(len(logp)))
    assert kl_per_token(logp, logp).abs().max() < 1e-6
    other = torch.log_softmax(torch.randn_like(logp), -1)
    assert (kl_per_token(logp, other) > 0).all()


def test_evaluate_is_bleu_of_the_model_translations(model_folder: Path) -> None:
    model, tok, _ = load_model_folder(model_folder)
    split = Parallel(["der mann sieht ein buch", "die frau liest"], ["the man sees a book", "the woman reads"])
    want = bleu_score(translate(model, tok, split.src), split.tgt).score
    assert evaluate(model, tok, split) == want == TRANSLATION.evaluate(model, tok, split)
    assert task_of("synthetic") is task_of("multi30k") is TRANSLATION and TRANSLATION.metric == "BLEU"
