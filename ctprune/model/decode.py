"""Batched greedy and beam-search decoding with a key/value cache."""

from __future__ import annotations

import torch
from torch import Tensor

from ctprune.arch import arch_of
from ctprune.data.batching import pad
from ctprune.data.tokenizer import EOS_ID, Tokenizer
from ctprune.errors import CtpruneError
from ctprune.model.transformer import Seq2SeqTransformer
from ctprune.progress import progress as progress_bar

# Beam widths past a few dozen stop improving translation and multiply the decoding memory
# (batch x beam cached sequences); a width of 10^9 once ended in an allocation traceback.
MAX_BEAM = 64


def check_beam(beam: int) -> None:
    """Refuse a beam width outside 1..MAX_BEAM (before any model is loaded)."""
    if isinstance(beam, bool) or not isinstance(beam, int) or not 1 <= beam <= MAX_BEAM:
        raise CtpruneError(f"--beam must be an integer in 1..{MAX_BEAM}, got {beam!r}")


def _max_steps(model: Seq2SeqTransformer, src: Tensor) -> int:
    return min(model.cfg.max_len - 1, int(src.shape[1] * 1.5) + 10)


def _trim(seq: list[int]) -> list[int]:
    return seq[:seq.index(EOS_ID)] if EOS_ID in seq else seq


@torch.no_grad()
def greedy(model: Seq2SeqTransformer, src: Tensor, steps: int | None = None) -> list[list[int]]:
    """src (B, S) -> B token-id lists (without BOS/EOS). With ``steps``, exactly that many
    decoding steps run whatever the model emits (for like-for-like speed measurements)."""
    cfg = model.cfg
    memory, mask = model.encode(src)
    cache = model.new_cache()
    tok = torch.full((src.shape[0], 1), cfg.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    emitted: list[Tensor] = []  # (B,) per step
    for t in range(steps or _max_steps(model, src)):
        h = model.decode(tok, memory, mask, cache, offset=t)  # (B, 1, d)
        nxt = model.generator(h[:, -1]).argmax(-1)  # (B,)
        nxt = nxt.masked_fill(done, cfg.pad_id)
        emitted.append(nxt)
        done |= nxt == cfg.eos_id
        if steps is None and bool(done.all()):
            break
        tok = nxt[:, None]
    return [_trim(row) for row in torch.stack(emitted, 1).tolist()]


@torch.no_grad()
def beam_search(model: Seq2SeqTransformer, src: Tensor, beam: int,
                alpha: float = 0.6) -> list[list[int]]:
    """src (B, S) -> B token-id lists; the final pick uses the GNMT length penalty ``alpha``."""
    cfg = model.cfg
    b, k = src.shape[0], beam
    memory, mask = model.encode(src)
    memory = memory.repeat_interleave(k, 0)  # (B*K, S, d)
    mask = mask.repeat_interleave(k, 0)
    cache = model.new_cache()
    scores, seqs, finished, lengths = beam_start(b, k, cfg.bos_id, src.device)
    for t in range(_max_steps(model, src)):
        h = model.decode(seqs[:, -1:], memory, mask, cache, offset=t)
        scores, src_beam, seqs, finished, lengths = beam_step(
            model.generator(h[:, -1]), scores, seqs, finished, lengths, cfg.pad_id, cfg.eos_id)
        for layer in cache:
            layer["self"]["k"] = layer["self"]["k"][src_beam]
            layer["self"]["v"] = layer["self"]["v"][src_beam]
        if bool(finished.all()):
            break
    return [_trim(row) for row in beam_best(scores, seqs, lengths, alpha)]


def beam_start(b: int, k: int, bos_id: int, device: torch.device | str = "cpu"
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Beam search's start: scores (B, K) with one live beam per sentence, seqs (B*K, 1) of BOS,
    finished and lengths (B*K,)."""
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    seqs = torch.full((b * k, 1), bos_id, dtype=torch.long, device=device)
    return scores, seqs, torch.zeros(b * k, dtype=torch.bool, device=device), torch.zeros(b * k, device=device)


def beam_step(logits: Tensor, scores: Tensor, seqs: Tensor, finished: Tensor, lengths: Tensor, pad_id: int,
              eos_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step of beam search over any engine's step logits (B*K, V): the new scores (B, K), the
    beam each new one extends (B*K,) (to reorder caches by), and the extended seqs (B*K, T+1),
    finished and lengths (B*K,)."""
    b, k = scores.shape
    logp = torch.log_softmax(logits.float(), -1)  # (B*K, V)
    # A finished beam can only extend with PAD at no cost, so it keeps its score.
    logp[finished] = float("-inf")
    logp[finished, pad_id] = 0.0
    v = logp.shape[-1]
    scores, flat = (scores.view(b * k, 1) + logp).view(b, k * v).topk(k, dim=-1)  # (B, K)
    src_beam = ((torch.arange(b, device=flat.device) * k)[:, None] + flat // v).view(-1)  # (B*K,)
    token = (flat % v).view(-1)
    seqs = torch.cat([seqs[src_beam], token[:, None]], 1)
    finished = finished[src_beam] | (token == eos_id)
    lengths = lengths[src_beam] + (token != pad_id).float()
    return scores, src_beam, seqs, finished, lengths


def beam_best(scores: Tensor, seqs: Tensor, lengths: Tensor, alpha: float) -> list[list[int]]:
    """Per sentence, the beam with the best GNMT length-penalised score, without its BOS."""
    b, k = scores.shape
    penalty = ((5.0 + lengths) / 6.0) ** alpha
    best = (scores.view(-1) / penalty).view(b, k).argmax(-1) + torch.arange(b, device=seqs.device) * k
    return [row[1:] for row in seqs[best].tolist()]


def translate(model: torch.nn.Module, tok: Tokenizer, sentences: list[str], beam: int = 1,
              batch_size: int = 128, progress: bool = False) -> list[str]:
    """Translate raw source sentences into detokenized target sentences, batched by source
    length; any architecture's model (``generate`` of ``ctprune.arch``: ctprune's greedy / beam
    search above, or a Hugging Face model's own)."""
    check_beam(beam)
    arch = arch_of(model)
    model.eval()
    dev = next(model.parameters()).device
    ids = [s[:arch.max_len(model) - 1] + [tok.eos_id] for s in tok.encode(sentences)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[list[int]] = [[] for _ in ids]
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in progress_bar(chunks, disable=not progress, desc="translate", unit="batch", leave=False):
        src = pad([ids[i] for i in chunk], tok.pad_id).to(dev)
        for i, h in zip(chunk, arch.generate(model, src, beam)):
            out[i] = h
    return tok.decode(out)
