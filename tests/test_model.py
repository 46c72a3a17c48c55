"""The model is the original architecture, and checkpoints round-trip exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ctprune.errors import CtpruneError
from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer, sinusoidal_positions

from .conftest import random_batch, tiny_config


class Reference(nn.Module):
    """The prototype's model: torch.nn.Transformer with embeddings, positions and a generator."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.tgt_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.transformer = nn.Transformer(cfg.d_model, cfg.n_heads, cfg.n_encoder_layers,
                                          cfg.n_decoder_layers, cfg.d_ff, dropout=0.0,
                                          batch_first=True)
        self.generator = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.register_buffer("pos", sinusoidal_positions(cfg.max_len, cfg.d_model))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(self.cfg.d_model)
        s = self.src_embed(src) * scale + self.pos[: src.shape[1]]
        t = self.tgt_embed(tgt) * scale + self.pos[: tgt.shape[1]]
        pad = src == self.cfg.pad_id
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        h = self.transformer(s, t, tgt_mask=causal, src_key_padding_mask=pad,
                             memory_key_padding_mask=pad, tgt_is_causal=True)
        return self.generator(h)


def _copy_attention(ref: nn.MultiheadAttention, ours: nn.Module) -> None:
    ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
    ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
    ref.out_proj.load_state_dict(ours.out_proj.state_dict())


@torch.no_grad()
def _reference_from(model: Seq2SeqTransformer) -> Reference:
    ref = Reference(model.cfg)
    ref.src_embed.load_state_dict(model.src_embed.state_dict())
    ref.tgt_embed.load_state_dict(model.tgt_embed.state_dict())
    ref.generator.load_state_dict(model.generator.state_dict())
    for r, o in zip(ref.transformer.encoder.layers, model.encoder.layers):
        _copy_attention(r.self_attn, o.self_attn)
        r.linear1.load_state_dict(o.ffn.linear1.state_dict())
        r.linear2.load_state_dict(o.ffn.linear2.state_dict())
        r.norm1.load_state_dict(o.norm1.state_dict())
        r.norm2.load_state_dict(o.norm2.state_dict())
    for r, o in zip(ref.transformer.decoder.layers, model.decoder.layers):
        _copy_attention(r.self_attn, o.self_attn)
        _copy_attention(r.multihead_attn, o.cross_attn)
        r.linear1.load_state_dict(o.ffn.linear1.state_dict())
        r.linear2.load_state_dict(o.ffn.linear2.state_dict())
        for k in (1, 2, 3):
            getattr(r, f"norm{k}").load_state_dict(getattr(o, f"norm{k}").state_dict())
    ref.transformer.encoder.norm.load_state_dict(model.encoder.norm.state_dict())
    ref.transformer.decoder.norm.load_state_dict(model.decoder.norm.state_dict())
    return ref.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_equals_torch_nn_transformer_reference(tie: bool) -> None:
    torch.manual_seed(0)
    model = Seq2SeqTransformer(tiny_config(tie_embeddings=tie)).eval()
    ref = _reference_from(model)
    src, tgt = random_batch()
    with torch.no_grad():
        ours, theirs = model(src, tgt), ref(src, tgt)
    assert ours.shape == (3, 5, 99)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_cached_decoding_matches_full_forward(tiny_model: Seq2SeqTransformer) -> None:
    src, tgt = random_batch()
    with torch.no_grad():
        full = tiny_model(src, tgt)
        memory, mask = tiny_model.encode(src)
        cache = tiny_model.new_cache()
        steps = [tiny_model.generator(tiny_model.decode(tgt[:, t:t + 1], memory, mask, cache, offset=t))
                 for t in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_outputs(tiny_model: Seq2SeqTransformer) -> None:
    src, tgt = random_batch()
    with torch.no_grad():
        batched = tiny_model(src, tgt)
        alone = tiny_model(src[1:2, :5], tgt[1:2])  # row 1 has two PAD at the end
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)


def test_seed_preset_has_the_original_sizes() -> None:
    cfg = ModelConfig.preset("seed", vocab_size=8000)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_encoder_layers, cfg.n_decoder_layers,
            cfg.dropout) == (512, 8, 512, 3, 3, 0.1)
    assert cfg.encoder_heads == [8, 8, 8] and cfg.decoder_ffn == [512, 512, 512]


def test_init_is_marians_normal_with_zero_biases_and_padding_row() -> None:
    """Issue 22: the Xavier init trained 12 BLEU behind a MarianMT after one Multi30k epoch;
    every Linear and the embeddings start at normal(0, 0.02), biases at zero, as Marian's."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("seed", vocab_size=8000)
    model = Seq2SeqTransformer(cfg)
    assert model.generator.weight is model.src_embed.weight is model.tgt_embed.weight
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert not p.any(), name
        elif p.dim() > 1:
            rows = (p[torch.arange(p.shape[0]) != cfg.pad_id] if "embed" in name else p).detach()
            assert abs(float(rows.std()) - cfg.init_std) < 5e-4 and abs(float(rows.mean())) < 5e-4, name
        else:  # LayerNorm gains
            assert (p == 1).all(), name
    assert not model.src_embed.weight[cfg.pad_id].any()
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "init_std"}) == cfg


@pytest.mark.parametrize("bad, message", [
    (dict(d_model=30), "divisible"),
    (dict(encoder_heads=[4, 9]), "encoder_heads"),
    (dict(decoder_ffn=[48]), "decoder_ffn"),
    (dict(dropout=1.5), "dropout"),
    (dict(init_std=0.0), "init_std"),
])
def test_bad_config_is_refused_naming_the_field(bad: dict, message: str) -> None:
    with pytest.raises(CtpruneError, match=message):
        tiny_config(**bad)


def test_unknown_preset() -> None:
    with pytest.raises(CtpruneError, match="unknown preset 'huge'; choose one of seed, tiny"):
        ModelConfig.preset("huge", vocab_size=10)


def _counting_decode(model: Seq2SeqTransformer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = model.decode

    def decode(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "decode", decode)
    return calls


def test_greedy_stops_when_every_sentence_has_ended(tiny_model: Seq2SeqTransformer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ctprune.model.decode import greedy

    eos = tiny_model.cfg.eos_id
    real_gen = tiny_model.generator.forward
    step = {"n": 0}

    def gen(h: torch.Tensor) -> torch.Tensor:
        step["n"] += 1
        logits = real_gen(h).clone()
        logits[:, eos] = 1e4 if step["n"] >= 3 else -1e4  # EOS from the third step on
        return logits

    monkeypatch.setattr(tiny_model.generator, "forward", gen)
    calls = _counting_decode(tiny_model, monkeypatch)
    src, _ = random_batch()
    hyps = greedy(tiny_model, src)
    assert len(calls) == 3  # stopped at the first step where every sentence ended
    assert all(len(h) == 2 and eos not in h for h in hyps)


def test_greedy_runs_exactly_the_given_steps(tiny_model: Seq2SeqTransformer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from ctprune.model.decode import greedy

    eos = tiny_model.cfg.eos_id
    real_gen = tiny_model.generator.forward
    monkeypatch.setattr(tiny_model.generator, "forward",
                        lambda h: real_gen(h).index_fill(-1, torch.tensor([eos]), 1e4))  # EOS at once
    calls = _counting_decode(tiny_model, monkeypatch)
    src, _ = random_batch()
    hyps = greedy(tiny_model, src, steps=7)
    assert len(calls) == 7 and hyps == [[], [], []]


def test_block_flops_add_up_to_the_model_flops(tiny_model: Seq2SeqTransformer) -> None:
    from ctprune.model.flops import forward_flops, module_flops
    from ctprune.pruning.configs import prunable_modules

    cfg, (s, t) = tiny_model.cfg, (7, 5)
    blocks = [n for n, p in prunable_modules(tiny_model).items() if p.kind != "linear"]
    total = sum(module_flops(n, tiny_model.get_submodule(n), s, t) for n in blocks)
    assert total + 2 * t * cfg.d_model * cfg.vocab_size == forward_flops(cfg, s, t)
    # an attention block is its four Linears plus the score and value products
    attn = "decoder.layers.1.cross_attn"
    linears = sum(module_flops(f"{attn}.{p}", tiny_model.get_submodule(f"{attn}.{p}"), s, t)
                  for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert module_flops(attn, tiny_model.get_submodule(attn), s, t) == linears + 2 * 2 * t * s * cfg.d_model
