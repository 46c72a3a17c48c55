"""The task seam: what a model is trained and judged for, apart from what it is built of.

An :class:`~ctprune.arch.Architecture` says how a model family computes (logits, generation,
units, FLOPs); a :class:`Task` says what the pipeline does with that: the training loss, the
per-token log-probabilities that scoring's KL compares, predictions on raw inputs, and the metric
that judges them (one number per split: time to target, kept checkpoints and the report read it).
Translation is the one task today; an encoder-only classifier would be a second implementation
(cross-entropy on a label, its accuracy) without the stages changing.

    task = task_of(corpus)
    task.evaluate(model, tok, val)              # val BLEU: the one function every stage, job and benchmark uses
    task.loss(model, batch, label_smoothing)    # training / finetuning loss
    task.log_probs(model, batch)                # (real target tokens, V): what scoring's KL compares
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ctprune.arch import arch_of
from ctprune.data.corpus import Parallel


class Task(ABC):
    name: str
    metric: str  # the name the report and logs give ``evaluate``'s number

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, label_smoothing: float = 0.0) -> Tensor:
        """Mean loss over the real (non-PAD) target tokens of ``batch``: training's objective."""

    @abstractmethod
    def log_probs(self, model: nn.Module, batch: Any) -> Tensor:
        """(real target tokens, V) fp32 log-probabilities: what scoring's KL to the origin compares."""

    @abstractmethod
    def predict(self, model: nn.Module, tok: Any, inputs: list[str], beam: int = 1,
                progress: bool = False) -> list[str]:
        """The model's outputs for raw ``inputs`` (one per line)."""

    @abstractmethod
    def measure(self, predictions: list[str], references: list[str]) -> float:
        """The metric of ``predictions`` against one reference each (higher is better)."""

    def evaluate(self, model: nn.Module, tok: Any, split: Parallel, beam: int = 1) -> float:
        """The metric of ``model`` on ``split``: predict, then measure."""
        return self.measure(self.predict(model, tok, split.src, beam), split.tgt)


class Translation(Task):
    """Sequence-to-sequence translation: token cross-entropy with teacher forcing, next-token
    log-probabilities, greedy or beam decoding, sacreBLEU's corpus BLEU on detokenized text."""

    name = "translation"
    metric = "BLEU"

    def loss(self, model: nn.Module, batch: Any, label_smoothing: float = 0.0) -> Tensor:
        from ctprune.model.ops import cross_entropy

        logits = arch_of(model).logits(model, batch.src, batch.tgt_in)
        return cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), batch.pad_id, label_smoothing)

    def log_probs(self, model: nn.Module, batch: Any) -> Tensor:
        real = batch.tgt_out != batch.pad_id
        return arch_of(model).logits(model, batch.src, batch.tgt_in)[real].float().log_softmax(-1)

    def predict(self, model: nn.Module, tok: Any, inputs: list[str], beam: int = 1,
                progress: bool = False) -> list[str]:
        from ctprune.model.decode import translate

        return translate(model, tok, inputs, beam=beam, progress=progress)

    def measure(self, predictions: list[str], references: list[str]) -> float:
        from ctprune.scoring import bleu_score

        return float(bleu_score(predictions, references).score)


TRANSLATION = Translation()


def kl_per_token(reference_logp: Tensor, logp: Tensor) -> Tensor:
    """KL(reference || model) of each row of two (N, V) log-probability tables: scoring's
    measure of how far a pruned model's next-token distribution moved from the origin's."""
    return (reference_logp.exp() * (reference_logp - logp)).sum(-1)


def task_of(corpus: str) -> Task:
    """The task of a corpus: every corpus ctprune reads today is parallel text."""
    del corpus  # one task today; a labelled corpus would name its own
    return TRANSLATION


@torch.no_grad()
def evaluate(model: nn.Module, tok: Any, split: Parallel, corpus: str = "multi30k", beam: int = 1) -> float:
    """The metric of ``model`` on ``split`` (val or test BLEU), evaluation mode, no gradients."""
    model.eval()
    return task_of(corpus).evaluate(model, tok, split, beam)
