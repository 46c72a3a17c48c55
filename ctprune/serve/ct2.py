"""CTranslate2: a model of a registered family as a ``TransformerSpec``, and translation through it.

CTranslate2 holds one head count per stack (``num_heads`` of the encoder and of the decoder,
self- and cross-attention alike) and reshapes every attention's projections by it. A pruned
model keeps a different count per block, so each block is zero-padded to its stack's count:
the padded heads get zero query/key/value rows and biases and zero output-projection columns.
Such a head's scores are all zero (T5: its bias column is zero too), so its softmax is uniform,
but it averages zero values and its output columns are zero: it adds exactly nothing, at the
price of computing it (``benchmarks/ct2_padding.py`` measures that price). FFN widths need no
padding: CTranslate2 sizes each Dense layer from its weights. A removed block (keep 0) becomes
one of zero weights (one zero neuron for an FFN); its output bias is dropped for ctprune's
Transformer, whose removed block returns zeros, and kept for MarianMT, whose empty Linear returns
its bias.

What differs between families is a :class:`Ct2Family` (``NATIVE``, ``MARIAN``, ``T5`` below),
named by the family's registration in ``ctprune.arch`` (``Serving.ct2``):

- ctprune's layers are post-LayerNorm with a final LayerNorm on each stack (``torch.nn.Transformer``);
  CTranslate2 reads the post-norm flag from ``pre_norm`` and loads a stack's ``layer_norm`` whenever
  the file has one, so that spec is built pre-norm (which declares that final norm) and then marked
  post-norm. Its stack's count is its widest block; heads go first, padding after.
- MarianMT is post-norm without final norms; the same padding.
- T5 is pre-norm with RMS norms, no biases, no query scaling, and one relative position bias
  table per stack, owned by layer 0 and indexed by the full layer's heads. A pruned T5 attention
  remembers which heads it keeps (``PrunedT5Attention.heads``); CTranslate2 reads a table per
  layer (as for UMT5), so each self-attention gets the columns of its kept heads, zero columns for
  its padding, and is padded to its stack's widest block like the others. The decoder's output
  is scaled by d_model ** -0.5 where the config says so (``scale_decoder_outputs``), as T5 does.

Positions (ctprune, Marian): each model's sinusoidal table is stored as the position embeddings;
embeddings scaled by sqrt(d_model) where the model scales them; the tied embedding and the output
bias (Marian's ``final_logits_bias``) go in as they are.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ctprune.errors import CtpruneError, first_line
from ctprune.fileio import read_json

CT2_FORMAT = "ctprune-ctranslate2/1"
SPEC_FILE, MODEL_FILE, CT2_CONFIG_FILE, VOCAB_FILE = (
    "spec.json", "model.bin", "config.json", "shared_vocabulary.json")
CT2_CORE = (MODEL_FILE, CT2_CONFIG_FILE, VOCAB_FILE, SPEC_FILE)  # + the tokenizer's files
HF_TOKENIZER_DIR = "tokenizer"  # a Hugging Face tokenizer's files, apart from CTranslate2's config.json
COMPUTE_TYPE = {"fp32": "float32", "int8": "int8"}  # precision -> CTranslate2 compute type on the CPU
ACTIVATIONS = {"relu": "RELU", "swish": "SWISH", "silu": "SWISH", "gelu": "GELU", "gelu_new": "GELUTanh"}


# ---- the blocks, under one naming for every family ---------------------------------------------

@dataclass(frozen=True)
class Attention:
    """An attention block: its projections, the norm that goes with it, and its head count."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear
    norm: nn.Module
    heads: int


@dataclass(frozen=True)
class Ffn:
    """A feed-forward block: ``ins`` the input Linear (a gated FFN: activated, then linear), ``out``
    the output Linear, and its norm."""

    ins: tuple[nn.Linear, ...]
    out: nn.Linear
    norm: nn.Module

    @property
    def width(self) -> int:
        return self.ins[0].out_features


@dataclass(frozen=True)
class Layer:
    self_attn: Attention
    ffn: Ffn
    cross: Attention | None = None  # decoder layers


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def _linear_weight(linear: nn.Linear) -> Tensor:
    """The effective weight (out, in): an L1-masked Linear's mask applied."""
    mask = getattr(linear, "weight_mask", None)
    return linear.weight if mask is None else linear.weight * mask


def _bias(linear: nn.Linear) -> np.ndarray:
    return _np(linear.bias) if linear.bias is not None else np.zeros(linear.out_features, np.float32)


def _padded_rows(linear: nn.Linear, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight (rows, in), bias (rows,)): ``linear``'s output rows first, zero rows after."""
    w = np.zeros((rows, linear.in_features), np.float32)
    b = np.zeros(rows, np.float32)
    n = linear.out_features
    w[:n], b[:n] = _np(_linear_weight(linear)), _bias(linear)
    return w, b


def _set_linear(spec: Any, weight: np.ndarray, bias: np.ndarray | None) -> None:
    spec.weight = weight
    if bias is not None:
        spec.bias = bias


def _set_attention(spec: Any, a: Attention, head_dim: int, heads: int, self_attention: bool, empty_bias: bool,
                   queries_scale: float | None) -> None:
    """Fill a ``MultiHeadAttentionSpec`` from ``a``, padded to ``heads`` heads. Self-attention:
    ``linear[0]`` is the fused [q; k; v] (3 x heads x hd, d), ``linear[1]`` the output.
    Cross-attention: ``linear[0]`` q, ``linear[1]`` the fused [k; v], ``linear[2]`` the output.
    ``empty_bias``: whether a block without heads still adds its output bias. Biases are written
    only where the model's projections have them."""
    biased = a.q.bias is not None
    q, k, v = (_padded_rows(p, heads * head_dim) for p in (a.q, a.k, a.v))
    out_w = np.zeros((a.out.out_features, heads * head_dim), np.float32)  # (d, heads x hd)
    out_w[:, :a.out.in_features] = _np(_linear_weight(a.out))
    out_b = None
    if a.out.bias is not None:
        out_b = _bias(a.out) if a.heads or empty_bias else np.zeros(a.out.out_features, np.float32)
    if self_attention:
        fused = [(np.concatenate([q[0], k[0], v[0]]), np.concatenate([q[1], k[1], v[1]]))]
    else:
        fused = [q, (np.concatenate([k[0], v[0]]), np.concatenate([k[1], v[1]]))]
    for lin, (w, b) in zip(spec.linear, fused):
        _set_linear(lin, w, b if biased else None)
    _set_linear(spec.linear[-1], out_w, out_b)
    if queries_scale is not None:
        spec.queries_scale = np.float32(queries_scale)
    _set_norm(spec.layer_norm, a.norm)


def _set_ffn(spec: Any, f: Ffn, empty_bias: bool) -> None:
    """linear_0 (and a gated FFN's linear_0_noact) (width, d), linear_1 (d, width) at the layer's
    own width; a removed FFN (width 0) becomes one zero neuron, with its output bias only if
    ``empty_bias``."""
    d = f.out.out_features
    targets = [spec.linear_0, *([spec.linear_0_noact] if len(f.ins) > 1 else [])]
    biased = f.out.bias is not None
    if f.width == 0:
        for t in targets:
            _set_linear(t, np.zeros((1, d), np.float32), np.zeros(1, np.float32) if biased else None)
        _set_linear(spec.linear_1, np.zeros((d, 1), np.float32),
                    (_bias(f.out) if empty_bias else np.zeros(d, np.float32)) if biased else None)
    else:
        for t, lin in zip(targets, f.ins, strict=True):
            _set_linear(t, _np(_linear_weight(lin)), _bias(lin) if lin.bias is not None else None)
        _set_linear(spec.linear_1, _np(_linear_weight(f.out)), _bias(f.out) if biased else None)
    _set_norm(spec.layer_norm, f.norm)


def _set_norm(spec: Any, norm: nn.Module) -> None:
    spec.gamma = _np(norm.weight)
    if hasattr(spec, "beta"):  # an RMS norm has none
        spec.beta = _np(norm.bias)


def _activation(name: str) -> Any:
    from ctranslate2.specs import common_spec

    if name not in ACTIVATIONS:
        raise CtpruneError(f"activation {name!r} has no CTranslate2 equivalent here; supported: "
                           f"{', '.join(ACTIVATIONS)}")
    return getattr(common_spec.Activation, ACTIVATIONS[name])




# ---- what differs between families ------------------------------------------------------------

class Ct2Family:
    """What the CTranslate2 export and engine read of one family's model: its layers under one
    naming, each stack's head count, the spec's stacks without their layers (embeddings,
    positions, final norms, output projection), its tokenizer's files and how its beam search
    picks. The base is a Hugging Face family's (tokenizer under ``tokenizer/``, Hugging Face's
    length penalty); :class:`NativeCt2` is ctprune's own."""

    empty_bias = True  # a block without heads / neurons still adds its output bias
    queries_scale: float | None = None  # None: CTranslate2's default, 1 / sqrt(head_dim)
    gnmt = False  # beam pick by ctprune's GNMT penalty (True) or Hugging Face's length penalty

    def layers(self, model: nn.Module) -> tuple[list[Layer], list[Layer]]:
        raise NotImplementedError

    def stacks(self, model: nn.Module, enc: list[Layer], dec: list[Layer], heads: tuple[int, int]) -> tuple[Any, Any]:
        """(``TransformerEncoderSpec``, ``TransformerDecoderSpec``) of ``heads`` (encoder, decoder)
        heads with everything but the layers' own variables set."""
        raise NotImplementedError

    def head_dim(self, model: nn.Module) -> int:
        raise NotImplementedError

    def epsilon(self, model: nn.Module) -> float:
        raise NotImplementedError

    def stack_heads(self, model: nn.Module, enc: list[Layer], dec: list[Layer]) -> tuple[int, int]:
        """(encoder, decoder) head counts of the spec: each stack's widest block, at least 1."""
        return (max(1, *(x.self_attn.heads for x in enc)),
                max(1, *(a.heads for x in dec for a in (x.self_attn, x.cross) if a is not None)))

    def vocabulary(self, tok: Any, size: int) -> list[str]:
        """The tokenizer's tokens in id order, ``size`` of them (placeholders past a Hugging Face
        tokenizer's end, for embedding rows no token uses)."""
        n = min(size, len(tok.hf))
        pieces = [str(t) for t in tok.hf.convert_ids_to_tokens(list(range(n)))]
        return pieces + [f"<ctprune_unused_{i}>" for i in range(n, size)]

    def save_tokenizer(self, tok: Any, folder: Path) -> list[str]:
        """Write the tokenizer into ``folder``; return its files (relative). A Hugging Face one
        goes into ``tokenizer/``: beside CTranslate2's config.json, AutoTokenizer would read that."""
        (folder / HF_TOKENIZER_DIR).mkdir()
        tok.save(folder / HF_TOKENIZER_DIR)
        return sorted(f"{HF_TOKENIZER_DIR}/{f.name}" for f in (folder / HF_TOKENIZER_DIR).iterdir())

    def load_tokenizer(self, folder: Path, arch: str, ids: dict[str, int], source_prefix: str) -> Any:
        """The tokenizer of the serving folder, through the architecture's validating loader (files
        present, JSON bounded), with the ids and source prefix ``spec.json`` gives."""
        from types import SimpleNamespace

        from ctprune.arch import get

        config = SimpleNamespace(pad_token_id=ids["pad_id"], decoder_start_token_id=ids["bos_id"],
                                 eos_token_id=ids["eos_id"])
        tok = get(arch).load_tokenizer(folder / HF_TOKENIZER_DIR, SimpleNamespace(config=config))
        tok.source_prefix = source_prefix
        return tok


class NativeCt2(Ct2Family):
    """ctprune's Transformer: post-norm layers with a final norm per stack, sinusoidal positions,
    scaled embeddings, ReLU; a removed block adds nothing (no output bias)."""

    empty_bias = False
    gnmt = True

    def layers(self, model: nn.Module) -> tuple[list[Layer], list[Layer]]:
        def attn(a: nn.Module, norm: nn.Module) -> Attention:
            return Attention(a.q_proj, a.k_proj, a.v_proj, a.out_proj, norm, a.n_heads)

        enc = [Layer(attn(x.self_attn, x.norm1), Ffn((x.ffn.linear1,), x.ffn.linear2, x.norm2))
               for x in model.encoder.layers]
        dec = [Layer(attn(x.self_attn, x.norm1), Ffn((x.ffn.linear1,), x.ffn.linear2, x.norm3),
                     attn(x.cross_attn, x.norm2)) for x in model.decoder.layers]
        return enc, dec

    def head_dim(self, model: nn.Module) -> int:
        return int(model.cfg.head_dim)

    def epsilon(self, model: nn.Module) -> float:
        return float(model.encoder.norm.eps)

    def stacks(self, model: nn.Module, enc: list[Layer], dec: list[Layer], heads: tuple[int, int]) -> tuple[Any, Any]:
        from ctranslate2.specs import transformer_spec as ts

        enc_heads, dec_heads = heads
        # pre_norm=True declares each stack's final LayerNorm; the layers are post-norm.
        kw = dict(pre_norm=True, activation=_activation("relu"), head_dim=self.head_dim(model))
        encoder = ts.TransformerEncoderSpec(len(enc), enc_heads, **kw)
        decoder = ts.TransformerDecoderSpec(len(dec), dec_heads, **kw)
        encoder.pre_norm = decoder.pre_norm = False
        encoder.scale_embeddings = decoder.scale_embeddings = True
        encoder.embeddings[0].weight, decoder.embeddings.weight = _np(model.src_embed.weight), \
            _np(model.tgt_embed.weight)
        encoder.position_encodings.encodings = decoder.position_encodings.encodings = _np(model.pos)  # (max_len, d)
        _set_norm(encoder.layer_norm, model.encoder.norm)
        _set_norm(decoder.layer_norm, model.decoder.norm)
        decoder.projection.weight, decoder.projection.bias = _np(model.generator.weight), _np(model.generator.bias)
        return encoder, decoder

    def vocabulary(self, tok: Any, size: int) -> list[str]:
        return [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]

    def save_tokenizer(self, tok: Any, folder: Path) -> list[str]:
        tok.save(folder)
        return ["tokenizer.model"]

    def load_tokenizer(self, folder: Path, arch: str, ids: dict[str, int], source_prefix: str) -> Any:
        from ctprune.data.tokenizer import Tokenizer

        return Tokenizer.load(folder)


class MarianCt2(Ct2Family):
    """MarianMT: post-norm layers without final norms, sinusoidal positions, its own activation,
    ``final_logits_bias`` as the projection's bias."""

    def layers(self, model: nn.Module) -> tuple[list[Layer], list[Layer]]:
        def attn(a: nn.Module, norm: nn.Module) -> Attention:
            return Attention(a.q_proj, a.k_proj, a.v_proj, a.out_proj, norm, a.num_heads)

        m = model.model
        enc = [Layer(attn(x.self_attn, x.self_attn_layer_norm), Ffn((x.fc1,), x.fc2, x.final_layer_norm))
               for x in m.encoder.layers]
        dec = [Layer(attn(x.self_attn, x.self_attn_layer_norm), Ffn((x.fc1,), x.fc2, x.final_layer_norm),
                     attn(x.encoder_attn, x.encoder_attn_layer_norm)) for x in m.decoder.layers]
        return enc, dec

    def head_dim(self, model: nn.Module) -> int:
        return int(model.model.encoder.layers[0].self_attn.head_dim)

    def epsilon(self, model: nn.Module) -> float:
        return float(model.model.encoder.layers[0].final_layer_norm.eps)

    def stacks(self, model: nn.Module, enc: list[Layer], dec: list[Layer], heads: tuple[int, int]) -> tuple[Any, Any]:
        from ctranslate2.specs import transformer_spec as ts

        cfg, m = model.config, model.model
        enc_heads, dec_heads = heads
        kw = dict(pre_norm=False, activation=_activation(cfg.activation_function), head_dim=self.head_dim(model))
        encoder = ts.TransformerEncoderSpec(len(enc), enc_heads, **kw)
        decoder = ts.TransformerDecoderSpec(len(dec), dec_heads, **kw)
        encoder.scale_embeddings = decoder.scale_embeddings = bool(cfg.scale_embedding)
        encoder.embeddings[0].weight = _np(m.encoder.embed_tokens.weight)
        decoder.embeddings.weight = _np(m.decoder.embed_tokens.weight)
        encoder.position_encodings.encodings = decoder.position_encodings.encodings = \
            _np(m.encoder.embed_positions.weight)
        decoder.projection.weight, decoder.projection.bias = _np(model.lm_head.weight), _np(model.final_logits_bias[0])
        return encoder, decoder


class T5Ct2(Ct2Family):
    """T5: pre-norm RMS-normed layers, no biases, no query scaling; each self-attention gets its own
    relative position bias table, the columns of its kept heads cut from the stack's shared one
    (layer 0's), so heads are padded as for the other families."""

    queries_scale = 1.0

    def layers(self, model: nn.Module) -> tuple[list[Layer], list[Layer]]:
        def attn(sub: nn.Module, a: nn.Module) -> Attention:
            return Attention(a.q, a.k, a.v, a.o, sub.layer_norm, a.n_heads)

        def ffn(sub: nn.Module) -> Ffn:
            f = sub.DenseReluDense
            return Ffn((f.wi_0, f.wi_1) if hasattr(f, "wi_0") else (f.wi,), f.wo, sub.layer_norm)

        enc = [Layer(attn(b.layer[0], b.layer[0].SelfAttention), ffn(b.layer[-1])) for b in model.encoder.block]
        dec = [Layer(attn(b.layer[0], b.layer[0].SelfAttention), ffn(b.layer[-1]),
                     attn(b.layer[1], b.layer[1].EncDecAttention)) for b in model.decoder.block]
        return enc, dec

    def head_dim(self, model: nn.Module) -> int:
        return int(model.config.d_kv)

    def epsilon(self, model: nn.Module) -> float:
        return float(model.config.layer_norm_epsilon)

    def stacks(self, model: nn.Module, enc: list[Layer], dec: list[Layer], heads: tuple[int, int]) -> tuple[Any, Any]:
        from ctranslate2.specs import transformer_spec as ts

        from ctprune.serve.graphs_hf import kept_heads

        cfg = model.config
        enc_heads, dec_heads = heads
        kw = dict(pre_norm=True, activation=_activation(cfg.dense_act_fn), ffn_glu=bool(cfg.is_gated_act),
                  relative_attention_bias=True, rms_norm=True, head_dim=self.head_dim(model))
        encoder = ts.TransformerEncoderSpec(len(enc), enc_heads, **kw)
        decoder = ts.TransformerDecoderSpec(len(dec), dec_heads, **kw)
        encoder.scale_embeddings = decoder.scale_embeddings = False
        encoder.embeddings[0].weight = _np(model.encoder.embed_tokens.weight)
        decoder.embeddings.weight = _np(model.decoder.embed_tokens.weight)
        for spec, stack, heads in ((encoder, model.encoder, enc_heads), (decoder, model.decoder, dec_heads)):
            owner = stack.block[0].layer[0].SelfAttention  # layer 0 owns the stack's table
            table = _np(owner.relative_attention_bias.weight)  # (buckets, full heads)
            distance = np.dtype("int32").type(owner.relative_attention_max_distance)
            for layer, kept in zip(spec.layer, kept_heads(stack), strict=True):
                own = np.zeros((table.shape[0], heads), np.float32)  # its kept heads' columns, zeros after
                columns = table if kept is None else table[:, kept]
                own[:, :columns.shape[1]] = columns
                layer.self_attention.relative_attention_bias = own
                layer.self_attention.relative_attention_max_distance = distance
            _set_norm(spec.layer_norm, stack.final_layer_norm)
        decoder.projection.weight = _np(model.lm_head.weight)
        if cfg.scale_decoder_outputs:  # transformers 5 keeps T5's scaling here (tie_word_embeddings is forced on)
            decoder.scale_outputs = np.float32(cfg.d_model ** -0.5)
        return encoder, decoder


NATIVE, MARIAN, T5 = NativeCt2(), MarianCt2(), T5Ct2()


def ct2_of(arch: str) -> Ct2Family:
    """Family ``arch``'s CTranslate2 description, imported from where its registration names it."""
    from ctprune.arch import family

    s = family(arch).serving
    if s is None or s.ct2 is None:
        raise CtpruneError(f"the {arch} architecture has no CTranslate2 registration")
    module, _, attr = s.ct2.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_spec(fam: Ct2Family, model: nn.Module, enc: list[Layer], dec: list[Layer], heads: tuple[int, int],
               pieces: list[str], ids: dict[str, int]) -> Any:
    """A validated ``ctranslate2.specs.TransformerSpec`` of ``model`` (its family's ``fam``, its
    layers ``enc`` / ``dec``, ``heads`` per stack), with ``pieces`` (the vocabulary in id order) as
    the shared source and target vocabulary; ``ids``: its ``pad_id``, ``bos_id`` (decoder start)
    and ``eos_id``."""
    from ctranslate2.specs import transformer_spec as ts

    encoder, decoder = fam.stacks(model, enc, dec, heads)
    src, tgt = encoder.embeddings[0].weight, decoder.embeddings.weight
    if tgt.shape[0] != src.shape[0]:
        raise CtpruneError(f"source and target vocabularies differ ({src.shape[0]} / {tgt.shape[0]} "
                           "embeddings); the CTranslate2 export supports one shared vocabulary")
    if len(pieces) != src.shape[0]:
        raise CtpruneError(f"the vocabulary has {len(pieces)} tokens but the model {src.shape[0]} embeddings")
    hd, (enc_heads, dec_heads) = fam.head_dim(model), heads
    for s, x in zip(encoder.layer, enc, strict=True):
        _set_attention(s.self_attention, x.self_attn, hd, enc_heads, True, fam.empty_bias, fam.queries_scale)
        _set_ffn(s.ffn, x.ffn, fam.empty_bias)
    for s, x in zip(decoder.layer, dec, strict=True):
        if x.cross is None:
            raise CtpruneError("a decoder layer without cross-attention cannot be exported to CTranslate2")
        _set_attention(s.self_attention, x.self_attn, hd, dec_heads, True, fam.empty_bias, fam.queries_scale)
        _set_attention(s.attention, x.cross, hd, dec_heads, False, fam.empty_bias, fam.queries_scale)
        _set_ffn(s.ffn, x.ffn, fam.empty_bias)
    spec = ts.TransformerSpec(encoder, decoder)
    spec.config.layer_norm_epsilon = fam.epsilon(model)
    spec.config.unk_token = "<unk>" if "<unk>" in pieces else pieces[1]
    spec.config.bos_token = spec.config.decoder_start_token = pieces[ids["bos_id"]]
    spec.config.eos_token = pieces[ids["eos_id"]]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.validate()
    return spec


def write_ct2(arch: str, model: nn.Module, tok: Any, folder: Path, quantize: str, head: dict[str, Any],
              rules: Any = None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Write CTranslate2's ``model.bin``, ``config.json`` and ``shared_vocabulary.json`` of
    ``model`` and its tokenizer into ``folder`` (int8 weights with ``quantize="int8"``); return
    ``spec.json`` (``head``, the fields every export describes, then per-stack head counts,
    per-layer real and padded heads, FFN widths, a Hugging Face model's generation ``rules``,
    every variable's shape and dtype) and the files written."""
    import ctranslate2

    fam = ct2_of(arch)
    model = model.float().eval()
    pieces = fam.vocabulary(tok, head["vocab_size"])
    enc, dec = fam.layers(model)
    enc_heads, dec_heads = fam.stack_heads(model, enc, dec)
    try:
        spec = build_spec(fam, model, enc, dec, (enc_heads, dec_heads), pieces, head)
        spec.optimize(quantization="int8" if quantize == "int8" else None)
        spec.save(str(folder))
    except CtpruneError:
        raise
    except Exception as e:  # ctranslate2 raises ValueError / TypeError on a spec it does not accept
        raise CtpruneError(f"CTranslate2 export failed: {first_line(e)}") from None
    tok_files = fam.save_tokenizer(tok, folder)
    heads = {"encoder_heads": [x.self_attn.heads for x in enc],
             "decoder_self_heads": [x.self_attn.heads for x in dec],
             "decoder_cross_heads": [x.cross.heads for x in dec if x.cross is not None]}
    padded = {k: [(enc_heads if k == "encoder_heads" else dec_heads) - h for h in v] for k, v in heads.items()}
    real = sum(map(sum, heads.values()))
    total = enc_heads * len(enc) + dec_heads * 2 * len(dec)
    info = {"format": CT2_FORMAT, **head, "num_heads": {"encoder": enc_heads, "decoder": dec_heads},
            "heads": heads, "padded_heads": padded, "padded_fraction": round(1 - real / total, 4),
            "ffn": {"encoder": [x.ffn.width for x in enc], "decoder": [x.ffn.width for x in dec]},
            "compute_type": COMPUTE_TYPE[head["precision"]],
            **({"generation": rules.to_json(), "source_prefix": getattr(tok, "source_prefix", "")}
               if rules is not None else {}),
            "versions": {"torch": torch.__version__, "ctranslate2": ctranslate2.__version__},
            "tokenizer_files": tok_files,
            "variables": {name: {"alias_of": v} if isinstance(v, str)  # a tied weight, stored once
                          else {"shape": list(v.shape), "dtype": str(v.dtype)}
                          for name, v in sorted(spec.variables().items())}}
    return info, (*CT2_CORE, *tok_files)


class Ct2Seq2Seq:
    """A CTranslate2 serving folder: its ``Translator``, tokenizer and the ids of ``spec.json``,
    decoding ctprune's padded id tensors into the token-id lists the model's architecture
    (``arch.generate``) gives."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        """Load and check a serving folder written by ``export --format ctranslate2``: its manifest
        must list CTranslate2's files and the tokenizer's, each with the size and SHA-256 it has.
        ``threads``: CTranslate2's intra-op threads (default: torch's count); one translation at a
        time."""
        import ctranslate2

        from ctprune.serve.export import MANIFEST_FILE, check_export_manifest, exportable
        from ctprune.serve.hfgen import GenerationRules

        folder = Path(folder)
        if not folder.is_dir():
            raise CtpruneError(f"serving folder not found: {folder}")
        if not (folder / MANIFEST_FILE).is_file() or not (folder / SPEC_FILE).is_file():
            raise CtpruneError(f"{folder} is not a CTranslate2 serving folder (no {MANIFEST_FILE} / {SPEC_FILE}); "
                               "write one with: ctprune export MODEL --format ctranslate2 -o DIR")
        tok_listed = check_export_manifest(folder, CT2_FORMAT, CT2_CORE, tokenizer_files=True)
        self.info: dict[str, Any] = read_json(folder / SPEC_FILE, "CTranslate2 spec description")
        self.folder = folder
        try:
            self.arch = str(self.info["architecture"])
            self.max_len, self.pad_id = int(self.info["max_len"]), int(self.info["pad_id"])
            self.bos_id, self.eos_id = int(self.info["bos_id"]), int(self.info["eos_id"])
            compute_type = COMPUTE_TYPE[str(self.info["precision"])]
            tok_files = [str(f) for f in self.info["tokenizer_files"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CtpruneError(f"{folder / SPEC_FILE} lacks or mistypes a field ({e})") from None
        if self.arch not in exportable("ctranslate2") or set(tok_listed) != set(tok_files):
            raise CtpruneError(f"{folder / SPEC_FILE} does not match its manifest (architecture {self.arch!r}, "
                               f"tokenizer files {tok_files})")
        self.family = ct2_of(self.arch)
        prefix = self.info.get("source_prefix", "")
        if not isinstance(prefix, str):
            raise CtpruneError(f"{folder / SPEC_FILE}: source_prefix must be a string")
        rules = self.info.get("generation")
        self.suppressed = GenerationRules.from_json(rules).suppressed if rules is not None else ()
        self.threads = threads or torch.get_num_threads()
        try:
            self.translator = ctranslate2.Translator(str(folder), device="cpu", compute_type=compute_type,
                                                     intra_threads=self.threads, inter_threads=1)
        except Exception as e:  # ctranslate2's own error types
            raise CtpruneError(f"CTranslate2 cannot load {folder}: {first_line(e)}") from None
        self.tokenizer = self.family.load_tokenizer(
            folder, self.arch, {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}, prefix)
        self.pieces = [str(p) for p in json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))]
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        if any(not 0 <= i < len(self.pieces) for i in self.suppressed):
            raise CtpruneError(f"{folder / SPEC_FILE}: generation.suppressed names ids outside the vocabulary "
                               f"of {len(self.pieces)} tokens")

    @property
    def precision(self) -> str:
        return str(self.info.get("precision", "fp32"))

    def _tokens(self, src: Tensor) -> list[list[str]]:
        """src (B, S) ids padded with PAD at the end -> B piece lists (with their EOS)."""
        return [[self.pieces[i] for i in row if i != self.pad_id] for row in src.tolist()]

    def max_steps(self, src: Tensor) -> int:
        return min(self.max_len - 1, int(src.shape[1] * 1.5) + 10)

    def generate(self, src: Tensor, beam: int = 1, steps: int | None = None) -> list[list[int]]:
        """src (B, S) -> B token-id lists (without BOS/EOS), as the architecture's own ``generate``
        gives them. Greedy (``beam`` 1) follows it step for step: the same step limit, EOS allowed
        from the first step (a Hugging Face model: its forced EOS at the limit makes the limit one
        token shorter, the tokens its generation config bans suppressed, PAD dropped from the
        output, as ``hf.generate`` drops it). Beam search is CTranslate2's own. For ctprune's
        Transformer it runs without length penalty, returns its ``beam`` finished hypotheses, and
        the pick among them uses ``decode.beam_best``'s GNMT penalty (alpha 0.6); CTranslate2
        refills the beam when a hypothesis finishes where ctprune keeps it in its slot, so the two
        may pick differently. For a Hugging Face model it uses the generation config's
        ``length_penalty`` as Hugging Face does (score / length ** penalty), but stops when
        ``beam`` hypotheses are finished where Hugging Face searches on, and without the
        generation config's ``renormalize_logits`` and ``early_stopping``: not checked for exactness.
        ``steps``: exactly that many steps (EOS suppressed before), for timing."""
        gnmt = self.family.gnmt
        alpha = float(self.info.get("length_penalty", 0.6))
        n = steps or self.max_steps(src) - bool(self.info.get("forced_eos"))
        results = self.translator.translate_batch(
            self._tokens(src), beam_size=beam, num_hypotheses=beam, length_penalty=0.0 if gnmt else alpha,
            return_scores=True, max_decoding_length=n, min_decoding_length=n if steps else 0, max_input_length=0,
            return_end_token=True, suppress_sequences=[[self.pieces[i]] for i in self.suppressed] or None)
        drop = {self.eos_id} if gnmt else {self.eos_id, self.pad_id}
        out = []
        for r in results:
            # GNMT: log-prob / ((5 + length) / 6) ** alpha, the length counting the EOS
            best = max(range(len(r.hypotheses)), key=lambda j: r.scores[j] / ((5.0 + len(r.hypotheses[j])) / 6.0)
                       ** alpha) if gnmt else 0
            out.append([i for i in (self.ids[p] for p in r.hypotheses[best]) if i not in drop])
        return out

    def score(self, src: Tensor, tgt: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probabilities: src (B, S), B target id lists (without BOS/EOS) ->
        per row the log-probability of each target token and of the final EOS."""
        results = self.translator.score_batch(self._tokens(src), [[self.pieces[i] for i in t] for t in tgt],
                                              max_input_length=0)
        return [list(r.log_probs) for r in results]
