"""Hugging Face's ``generate``, as ``arch.generate`` calls it for a MarianMT or T5, over a served
model's step function: the same logits processors, greedy loop and beam search, step for step,
so that an fp32 export emits the token ids the PyTorch model emits.

``arch.generate`` runs ``model.generate(num_beams=K, do_sample=False, max_new_tokens=LIMIT,
min_new_tokens=STEPS)``; everything else comes from the model's generation config. What of it
changes the tokens is recorded at export (:class:`GenerationRules`): forced EOS at the last step,
single-token bad words and suppressed tokens, ``min_length``, ``renormalize_logits``,
``length_penalty`` and ``early_stopping``. A setting this loop does not reproduce (repetition
penalties, n-gram blocking, a forced first token, ...) is refused at export, in one line.

The beam search is transformers 5's vectorised ``_beam_search`` (``generation/utils.py``): the
top 2K continuations of the K running beams, finished ones scored sum / length ** penalty and
merged into the K best finished, the early-stop heuristic, the cache reordered by beam.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ctprune.errors import CtpruneError

# Generation-config fields whose non-default values this loop does not reproduce: default value.
UNSUPPORTED = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "encoder_no_repeat_ngram_size": 0, "forced_bos_token_id": None, "begin_suppress_tokens": None,
               "sequence_bias": None, "exponential_decay_length_penalty": None, "remove_invalid_values": False,
               "min_new_tokens": None}
NEG = -1.0e9  # transformers' "impossible" score in beam search


@dataclass(frozen=True)
class GenerationRules:
    """What Hugging Face's ``generate`` does with a model's step logits, beyond what
    ``arch.generate`` passes it."""

    pad_id: int
    bos_id: int  # the decoder start token
    eos_id: int
    forced_eos: bool  # EOS forced at the last step (ForcedEOSTokenLogitsProcessor)
    suppressed: tuple[int, ...]  # bad_words_ids of one token (EOS excepted) and suppress_tokens
    min_length: int  # EOS suppressed while the sequence (with its start token) is shorter
    renormalize: bool  # log-softmax after the processors (beam search)
    length_penalty: float
    early_stopping: bool | str

    @classmethod
    def of(cls, model: Any) -> GenerationRules:
        """The rules of a Hugging Face model's generation config; refuse what they cannot copy."""
        cfg, gen = model.config, model.generation_config
        for field, default in UNSUPPORTED.items():
            value = getattr(gen, field, default)
            if value not in (None, [], ()) and value != default:
                raise CtpruneError(f"the model's generation config sets {field}={value!r}, which ctprune's "
                                   f"serving decoders do not reproduce; export refused")
        eos = _one_id(gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id, "eos_token_id")
        forced = gen.forced_eos_token_id
        if forced is not None and _one_id(forced, "forced_eos_token_id") != eos:
            raise CtpruneError(f"the generation config forces EOS {forced!r} but ends on {eos}; export refused")
        suppressed = set(gen.suppress_tokens or [])
        for seq in gen.bad_words_ids or []:
            if len(seq) != 1:
                raise CtpruneError(f"the generation config bans the sequence {seq!r}; ctprune's serving "
                                   "decoders ban single tokens only; export refused")
            if seq[0] != eos:  # transformers never bans EOS
                suppressed.add(int(seq[0]))
        pad = gen.pad_token_id if gen.pad_token_id is not None else cfg.pad_token_id
        start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else cfg.decoder_start_token_id
        return cls(pad_id=int(pad), bos_id=int(start), eos_id=eos, forced_eos=forced is not None,
                   suppressed=tuple(sorted(suppressed)), min_length=int(gen.min_length or 0),
                   renormalize=bool(gen.renormalize_logits),
                   length_penalty=float(1.0 if gen.length_penalty is None else gen.length_penalty),
                   early_stopping=gen.early_stopping if gen.early_stopping == "never" else bool(gen.early_stopping))

    @classmethod
    def neutral(cls, pad_id: int, bos_id: int, eos_id: int) -> GenerationRules:
        """No logits processor at all: the raw argmax of ctprune's own ``decode.greedy``."""
        return cls(pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, forced_eos=False, suppressed=(), min_length=0,
                   renormalize=False, length_penalty=1.0, early_stopping=False)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "suppressed": list(self.suppressed)}

    @classmethod
    def from_json(cls, data: Any) -> GenerationRules:
        try:
            stop = data["early_stopping"]
            return cls(pad_id=int(data["pad_id"]), bos_id=int(data["bos_id"]), eos_id=int(data["eos_id"]),
                       forced_eos=bool(data["forced_eos"]), suppressed=tuple(int(i) for i in data["suppressed"]),
                       min_length=int(data["min_length"]), renormalize=bool(data["renormalize"]),
                       length_penalty=float(data["length_penalty"]),
                       early_stopping=stop if stop == "never" else bool(stop))
        except (KeyError, TypeError, ValueError) as e:
            raise CtpruneError(f"the generation rules lack or mistype a field ({e})") from None

    def process(self, scores: Tensor, t: int, limit: int, min_new: int = 0) -> Tensor:
        """The logits processors at step ``t`` (0-based; ``limit`` steps at most): scores (N, V),
        logits (greedy) or log-probabilities (beam search) -> processed copy (``scores`` itself
        when no processor applies)."""
        if not (self.suppressed or self.min_length or min_new or self.forced_eos or self.renormalize):
            return scores
        scores = scores.clone()
        if self.suppressed:
            scores[:, list(self.suppressed)] = float("-inf")
        if 1 + t < self.min_length or t < min_new:
            scores[:, self.eos_id] = float("-inf")
        if self.forced_eos and t == limit - 1:
            scores[:] = float("-inf")
            scores[:, self.eos_id] = 0.0
        return scores.log_softmax(-1) if self.renormalize else scores


def _one_id(value: Any, field: str) -> int:
    ids = sorted(set(value)) if isinstance(value, list) else [value]
    if len(ids) != 1:
        raise CtpruneError(f"the generation config's {field} is {value!r}; ctprune's serving decoders "
                           "support one end token; export refused")
    return int(ids[0])


class StepModel(Protocol):
    """A served model's encoder and decoder step on numpy arrays (ONNX Runtime's inputs and
    outputs). The loops pass the mask, cross and past arrays back as they came, and leave
    repeating them per beam (``encode(src, repeat)``) and reordering the cache (``reorder``) to
    the engine."""

    def encode(self, src: Tensor, repeat: int = 1) -> tuple[np.ndarray, list[np.ndarray]]: ...

    def empty_past(self, batch: int) -> list[np.ndarray]: ...

    def step(self, ids: Tensor, mask: np.ndarray, past: list[np.ndarray], cross: list[np.ndarray]
             ) -> tuple[Tensor, list[np.ndarray]]: ...

    def reorder(self, past: list[np.ndarray], order: np.ndarray) -> list[np.ndarray]: ...


def clean(rows: list[list[int]], rules: GenerationRules, drop_pad: bool = True) -> list[list[int]]:
    """As ``arch.generate``: cut at the first EOS, drop PAD (``drop_pad``)."""
    out = []
    for row in rows:
        row = row[:row.index(rules.eos_id)] if rules.eos_id in row else row
        out.append([t for t in row if t != rules.pad_id] if drop_pad else row)
    return out


def greedy(eng: StepModel, src: Tensor, rules: GenerationRules, limit: int, min_new: int = 0,
           fixed: bool = False, drop_pad: bool = True) -> list[list[int]]:
    """src (B, S) -> B token-id lists, as ``generate(num_beams=1, max_new_tokens=limit,
    min_new_tokens=min_new)``: argmax of the processed logits, PAD after a row's EOS, stop when
    every row has ended. ctprune's own ``decode.greedy`` is this loop with ``GenerationRules.neutral``
    (raw argmax), ``drop_pad=False`` (it keeps a PAD emitted before EOS) and, for its ``steps``,
    ``fixed=True`` (all ``limit`` steps run whatever is emitted)."""
    b = src.shape[0]
    mask, cross = eng.encode(src)
    past = eng.empty_past(b)
    tok = torch.full((b, 1), rules.bos_id, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    emitted: list[Tensor] = []
    for t in range(limit):
        logits, past = eng.step(tok, mask, past, cross)
        nxt = rules.process(logits.float(), t, limit, min_new).argmax(-1).masked_fill(done, rules.pad_id)  # (B,)
        emitted.append(nxt)
        done |= nxt == rules.eos_id
        if not fixed and bool(done.all()):
            break
        tok = nxt[:, None]
    return clean(torch.stack(emitted, 1).tolist(), rules, drop_pad)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, ...) and idx (B, M) -> x[b, idx[b]] (B, M, ...)."""
    while idx.dim() < x.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(x, idx, dim=1)


def beam_search(eng: StepModel, src: Tensor, beam: int, rules: GenerationRules, limit: int) -> list[list[int]]:
    """src (B, S) -> B token-id lists, as ``generate(num_beams=beam, max_new_tokens=limit)``."""
    b, k = src.shape[0], beam
    keep = 2 * k  # transformers keeps max(2, 1 + number of EOS tokens) x K candidates
    max_length = 1 + limit  # the decoder start token, then at most ``limit`` new tokens
    lp, stop_early = rules.length_penalty, rules.early_stopping
    mask, cross = eng.encode(src, k)  # (B*K, S): row b*K + j is beam j of sentence b
    past = eng.empty_past(b * k)
    running = torch.full((b, k, max_length), rules.pad_id, dtype=torch.long)
    running[:, :, 0] = rules.bos_id
    sequences = running.clone()
    running_scores = torch.zeros(b, k)
    running_scores[:, 1:] = NEG
    scores = torch.full((b, k), NEG)
    finished = torch.zeros(b, k, dtype=torch.bool)
    improvable = torch.ones(b, 1, dtype=torch.bool)
    top_k = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(keep - k, dtype=torch.bool)])
    cur = 1
    while True:
        logits, past = eng.step(running[:, :, cur - 1].reshape(b * k, 1), mask, past, cross)
        logp = rules.process(logits.float().log_softmax(-1), cur - 1, limit)  # (B*K, V)
        v = logp.shape[-1]
        logp = (logp.view(b, k, v) + running_scores[:, :, None]).view(b, k * v)
        cand_scores, cand = logp.topk(keep)  # (B, 2K)
        cand_beam = cand // v
        cand_seqs = _gather(running, cand_beam)  # (B, 2K, max_length)
        cand_seqs[:, :, cur] = cand % v
        hits = (cand % v == rules.eos_id) | (cur + 1 >= max_length)  # (B, 2K)
        # The K best unfinished candidates run on.
        alive = cand_scores + hits.float() * NEG
        nxt = alive.topk(k).indices
        running, running_scores = _gather(cand_seqs, nxt), _gather(alive, nxt)
        src_beam = _gather(cand_beam, nxt)  # (B, K)
        # Finished candidates among the first K compete with the finished beams so far.
        done_now = hits & top_k[None, :]
        fin = cand_scores / float((cur + 1 - 1) ** lp)
        fin = fin + (finished.all(-1, keepdim=True) & (stop_early is True)).float() * NEG
        fin = fin + (~improvable).float() * NEG
        fin = fin + (~done_now).float() * NEG
        merged = torch.cat([scores, fin], 1).topk(k).indices
        sequences = _gather(torch.cat([sequences, cand_seqs], 1), merged)
        scores = _gather(torch.cat([scores, fin], 1), merged)
        finished = _gather(torch.cat([finished, done_now], 1), merged)
        order = (src_beam + torch.arange(b)[:, None] * k).view(-1).numpy()
        past = eng.reorder(past, order)
        cur += 1
        length = (max_length - 1) if stop_early == "never" and lp > 0 else (cur - 1)
        best_running = running_scores[:, :1] / float(length ** lp)
        worst_finished = torch.where(finished, scores.min(1, keepdim=True).values, torch.tensor(NEG))
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        if not (bool(improvable.any()) and not (bool(finished.all()) and stop_early is True)
                and not bool(hits.all())):
            break
    return clean(sequences[:, 0, 1:cur].tolist(), rules)
