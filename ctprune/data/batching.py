"""Token-budget batches from length-sorted buckets, so that little compute goes to padding."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from ctprune.data.corpus import Parallel
from ctprune.data.tokenizer import PAD_ID, Tokenizer


@dataclass(frozen=True)
class Batch:
    """src (B, S); tgt_in (B, T) starts with BOS (the decoder's start token); tgt_out (B, T) ends
    with EOS; ``pad_id`` elsewhere (the tokenizer's own ids: ctprune's 0/2/3, or a Hugging Face
    model's)."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    index: Tensor  # (B,) positions of the examples in the split
    pad_id: int = PAD_ID

    @property
    def n_tgt_tokens(self) -> int:
        return int((self.tgt_out != self.pad_id).sum())

    @property
    def n_src_tokens(self) -> int:
        return int((self.src != self.pad_id).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device),
                     self.index, self.pad_id)


def pad(seqs: list[list[int]], pad_id: int = PAD_ID) -> Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class TokenizedSplit:
    """A split encoded once; ``batches(epoch)`` yields token-budget batches."""

    def __init__(self, data: Parallel, tok: Tokenizer, max_len: int) -> None:
        # Sentences longer than the model's positions are truncated (none in Multi30k at 256).
        self.pad_id = tok.pad_id
        self.src = [s[:max_len - 1] + [tok.eos_id] for s in tok.encode(data.src)]
        tgt = [t[:max_len - 1] for t in tok.encode_target(data.tgt)]
        self.tgt_in = [[tok.bos_id] + t for t in tgt]
        self.tgt_out = [t + [tok.eos_id] for t in tgt]

    def __len__(self) -> int:
        return len(self.src)

    @property
    def n_tgt_tokens(self) -> int:
        return sum(len(t) for t in self.tgt_out)

    def _make(self, idx: list[int]) -> Batch:
        p = self.pad_id
        return Batch(pad([self.src[i] for i in idx], p), pad([self.tgt_in[i] for i in idx], p),
                     pad([self.tgt_out[i] for i in idx], p), torch.tensor(idx), p)

    def batches(self, max_tokens: int, shuffle_seed: int | None = None) -> list[Batch]:
        """Examples sorted by length and cut into batches of at most ``max_tokens`` padded
        source+target tokens; with ``shuffle_seed``, ties are broken randomly and the batch
        order is shuffled, deterministically for that seed."""
        rng = random.Random(shuffle_seed)
        keys = {i: (max(len(self.src[i]), len(self.tgt_in[i])),
                    rng.random() if shuffle_seed is not None else i) for i in range(len(self))}
        order = sorted(keys, key=keys.__getitem__)
        groups: list[list[int]] = []
        cur: list[int] = []
        ms = mt = 0  # padded widths of the current batch
        for i in order:
            s, t = max(ms, len(self.src[i])), max(mt, len(self.tgt_in[i]))
            if cur and (s + t) * (len(cur) + 1) > max_tokens:
                groups.append(cur)
                cur, s, t = [], len(self.src[i]), len(self.tgt_in[i])
            cur.append(i)
            ms, mt = s, t
        if cur:
            groups.append(cur)
        if shuffle_seed is not None:
            rng.shuffle(groups)
        return [self._make(g) for g in groups]
