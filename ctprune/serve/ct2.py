"""CTranslate2: ctprune's Transformer or a MarianMT as a ``TransformerSpec``, and translation
through it.

CTranslate2 holds one head count per stack (``num_heads`` of the encoder and of the decoder,
self- and cross-attention alike) and reshapes every attention's projections by it. A pruned
model keeps a different count per block, so each block is zero-padded to its stack's widest
block: the padded heads get zero query/key/value rows and biases and zero output-projection
columns. Such a head's scores are all zero, so its softmax is uniform, but it averages zero
values and its output columns are zero: it adds exactly nothing, at the price of computing it
(``benchmarks/ct2_padding.py`` measures that price). FFN widths need no padding: CTranslate2
sizes each Dense layer from its weights. A removed block (keep 0) becomes one of zero weights
(one zero neuron for an FFN); its output bias is dropped for ctprune's Transformer, whose removed
block returns zeros, and kept for MarianMT, whose empty Linear returns its bias.

ctprune's layers are post-LayerNorm with a final LayerNorm on each stack (``torch.nn.Transformer``);
CTranslate2 reads the post-norm flag from ``pre_norm`` and loads a stack's ``layer_norm`` whenever
the file has one, so that spec is built pre-norm (which declares that final norm) and then marked
post-norm. MarianMT is post-norm without final norms. Positions: each model's sinusoidal table is
stored as the position embeddings; embeddings scaled by sqrt(d_model) where the model scales them;
the tied embedding and the output bias (Marian's ``final_logits_bias``) go in as they are.
"""

from __future__ import annotations

import json
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


def _set_attention(spec: Any, projs: tuple[nn.Linear, ...], norm: nn.LayerNorm, n_heads: int, head_dim: int,
                   heads: int, self_attention: bool, empty_bias: bool) -> None:
    """Fill a ``MultiHeadAttentionSpec`` from q/k/v/out projections of ``n_heads`` heads, padded
    to ``heads``. Self-attention: ``linear[0]`` is the fused [q; k; v] (3 x heads x hd, d),
    ``linear[1]`` the output. Cross-attention: ``linear[0]`` q, ``linear[1]`` the fused [k; v],
    ``linear[2]`` the output. ``empty_bias``: whether a block without heads still adds its output
    bias."""
    q_proj, k_proj, v_proj, out_proj = projs
    inner = heads * head_dim
    q, k, v = (_padded_rows(p, inner) for p in (q_proj, k_proj, v_proj))
    out_w = np.zeros((out_proj.out_features, inner), np.float32)  # (d, heads x hd)
    out_w[:, :out_proj.in_features] = _np(_linear_weight(out_proj))
    out_b = _bias(out_proj) if n_heads or empty_bias else np.zeros(out_proj.out_features, np.float32)
    if self_attention:
        fused = [(np.concatenate([q[0], k[0], v[0]]), np.concatenate([q[1], k[1], v[1]]))]
    else:
        fused = [q, (np.concatenate([k[0], v[0]]), np.concatenate([k[1], v[1]]))]
    for lin, (w, b) in zip(spec.linear, [*fused, (out_w, out_b)]):
        lin.weight, lin.bias = w, b
    _set_norm(spec.layer_norm, norm)


def _set_ffn(spec: Any, linear1: nn.Linear, linear2: nn.Linear, norm: nn.LayerNorm, empty_bias: bool) -> None:
    """linear_0 (width, d), linear_1 (d, width) at the layer's own width; a removed FFN (width 0)
    becomes one zero neuron, with linear2's bias only if ``empty_bias``."""
    d = linear2.out_features
    if linear1.out_features == 0:
        spec.linear_0.weight, spec.linear_0.bias = np.zeros((1, d), np.float32), np.zeros(1, np.float32)
        spec.linear_1.weight = np.zeros((d, 1), np.float32)
        spec.linear_1.bias = _bias(linear2) if empty_bias else np.zeros(d, np.float32)
    else:
        spec.linear_0.weight, spec.linear_0.bias = _np(_linear_weight(linear1)), _bias(linear1)
        spec.linear_1.weight, spec.linear_1.bias = _np(_linear_weight(linear2)), _bias(linear2)
    _set_norm(spec.layer_norm, norm)


def _set_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _np(norm.weight), _np(norm.bias)


def _layers(arch: str, model: nn.Module) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per encoder and decoder layer, its modules under one naming: attention blocks as
    (q, k, v, out projections, norm after, heads), the FFN as (linear1, linear2, norm after)."""
    def attn(a: nn.Module, norm: nn.LayerNorm) -> tuple[Any, ...]:
        heads = a.n_heads if arch == "ctprune" else a.num_heads
        return (a.q_proj, a.k_proj, a.v_proj, a.out_proj), norm, heads

    if arch == "ctprune":
        enc = [{"self": attn(x.self_attn, x.norm1), "ffn": (x.ffn.linear1, x.ffn.linear2, x.norm2)}
               for x in model.encoder.layers]
        dec = [{"self": attn(x.self_attn, x.norm1), "cross": attn(x.cross_attn, x.norm2),
                "ffn": (x.ffn.linear1, x.ffn.linear2, x.norm3)} for x in model.decoder.layers]
        return enc, dec
    m = model.model
    enc = [{"self": attn(x.self_attn, x.self_attn_layer_norm), "ffn": (x.fc1, x.fc2, x.final_layer_norm)}
           for x in m.encoder.layers]
    dec = [{"self": attn(x.self_attn, x.self_attn_layer_norm), "cross": attn(x.encoder_attn, x.encoder_attn_layer_norm),
            "ffn": (x.fc1, x.fc2, x.final_layer_norm)} for x in m.decoder.layers]
    return enc, dec


def stack_heads(enc: list[dict[str, Any]], dec: list[dict[str, Any]]) -> tuple[int, int]:
    """(encoder, decoder) head counts of the spec: each stack's widest block, at least 1."""
    return (max(1, *(x["self"][2] for x in enc)),
            max(1, *(x[k][2] for x in dec for k in ("self", "cross"))))


def build_spec(arch: str, model: nn.Module, pieces: list[str], ids: dict[str, int]) -> Any:
    """A validated ``ctranslate2.specs.TransformerSpec`` of ``model`` (``arch``: ``ctprune`` or
    ``marian``), with ``pieces`` (the vocabulary in id order) as the shared source and target
    vocabulary; ``ids``: its ``pad_id``, ``bos_id`` (decoder start) and ``eos_id``."""
    from ctranslate2.specs import common_spec
    from ctranslate2.specs import transformer_spec as ts

    enc, dec = _layers(arch, model)
    enc_heads, dec_heads = stack_heads(enc, dec)
    native = arch == "ctprune"
    if native:
        head_dim, act, scale = model.cfg.head_dim, "relu", True
        src_emb, tgt_emb, pos = model.src_embed.weight, model.tgt_embed.weight, model.pos
        proj_w, proj_b = model.generator.weight, model.generator.bias
        final_norms = (model.encoder.norm, model.decoder.norm)
    else:
        cfg, m = model.config, model.model
        head_dim, act, scale = m.encoder.layers[0].self_attn.head_dim, cfg.activation_function, cfg.scale_embedding
        src_emb, tgt_emb, pos = m.encoder.embed_tokens.weight, m.decoder.embed_tokens.weight, \
            m.encoder.embed_positions.weight
        proj_w, proj_b = model.lm_head.weight, model.final_logits_bias[0]
        final_norms = None
    if act not in ACTIVATIONS:
        raise CtpruneError(f"activation {act!r} has no CTranslate2 equivalent here; supported: "
                           f"{', '.join(ACTIVATIONS)}")
    if tgt_emb.shape[0] != src_emb.shape[0]:
        raise CtpruneError(f"source and target vocabularies differ ({src_emb.shape[0]} / {tgt_emb.shape[0]} "
                           "embeddings); the CTranslate2 export supports one shared vocabulary")
    if len(pieces) != src_emb.shape[0]:
        raise CtpruneError(f"the vocabulary has {len(pieces)} tokens but the model {src_emb.shape[0]} embeddings")
    activation = getattr(common_spec.Activation, ACTIVATIONS[act])
    # pre_norm=True declares each stack's final LayerNorm (ctprune's); the layers are post-norm.
    kw = dict(pre_norm=final_norms is not None, activation=activation, head_dim=head_dim)
    encoder = ts.TransformerEncoderSpec(len(enc), enc_heads, **kw)
    decoder = ts.TransformerDecoderSpec(len(dec), dec_heads, **kw)
    encoder.pre_norm = decoder.pre_norm = False
    encoder.scale_embeddings = decoder.scale_embeddings = bool(scale)
    encoder.embeddings[0].weight, decoder.embeddings.weight = _np(src_emb), _np(tgt_emb)
    encoder.position_encodings.encodings = decoder.position_encodings.encodings = _np(pos)  # (max_len, d)
    for s, x in zip(encoder.layer, enc):
        projs, norm, h = x["self"]
        _set_attention(s.self_attention, projs, norm, h, head_dim, enc_heads, True, empty_bias=not native)
        _set_ffn(s.ffn, *x["ffn"], empty_bias=not native)
    for s, x in zip(decoder.layer, dec):
        for sub, key, is_self in ((s.self_attention, "self", True), (s.attention, "cross", False)):
            projs, norm, h = x[key]
            _set_attention(sub, projs, norm, h, head_dim, dec_heads, is_self, empty_bias=not native)
        _set_ffn(s.ffn, *x["ffn"], empty_bias=not native)
    if final_norms is not None:
        _set_norm(encoder.layer_norm, final_norms[0])
        _set_norm(decoder.layer_norm, final_norms[1])
    decoder.projection.weight, decoder.projection.bias = _np(proj_w), _np(proj_b)
    spec = ts.TransformerSpec(encoder, decoder)
    spec.config.layer_norm_epsilon = float(enc[0]["ffn"][2].eps)
    spec.config.unk_token = "<unk>" if "<unk>" in pieces else pieces[1]
    spec.config.bos_token = spec.config.decoder_start_token = pieces[ids["bos_id"]]
    spec.config.eos_token = pieces[ids["eos_id"]]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.validate()
    return spec


def vocabulary(arch: str, tok: Any, size: int) -> list[str]:
    """The tokenizer's tokens in id order, ``size`` of them (placeholders past a Hugging Face
    tokenizer's end, for embedding rows no token uses)."""
    if arch == "ctprune":
        return [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    n = min(size, len(tok.hf))
    pieces = [str(t) for t in tok.hf.convert_ids_to_tokens(list(range(n)))]
    return pieces + [f"<ctprune_unused_{i}>" for i in range(n, size)]


def write_ct2(arch: str, model: nn.Module, tok: Any, folder: Path, quantize: str, head: dict[str, Any]
              ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Write CTranslate2's ``model.bin``, ``config.json`` and ``shared_vocabulary.json`` of
    ``model`` and its tokenizer into ``folder`` (int8 weights with ``quantize="int8"``); return
    ``spec.json`` (``head``, the fields every export describes, then per-stack head counts,
    per-layer real and padded heads, FFN widths, every variable's shape and dtype) and the files
    written."""
    import ctranslate2

    model = model.float().eval()
    pieces = vocabulary(arch, tok, head["vocab_size"])
    try:
        spec = build_spec(arch, model, pieces, head)
        spec.optimize(quantization="int8" if quantize == "int8" else None)
        spec.save(str(folder))
    except CtpruneError:
        raise
    except Exception as e:  # ctranslate2 raises ValueError / TypeError on a spec it does not accept
        raise CtpruneError(f"CTranslate2 export failed: {first_line(e)}") from None
    if arch == "ctprune":
        tok.save(folder)
        tok_files = ["tokenizer.model"]
    else:  # beside CTranslate2's config.json, AutoTokenizer would read that one
        (folder / HF_TOKENIZER_DIR).mkdir()
        tok.save(folder / HF_TOKENIZER_DIR)
        tok_files = sorted(f"{HF_TOKENIZER_DIR}/{f.name}" for f in (folder / HF_TOKENIZER_DIR).iterdir())
    enc, dec = _layers(arch, model)
    enc_heads, dec_heads = stack_heads(enc, dec)
    heads = {"encoder_heads": [x["self"][2] for x in enc], "decoder_self_heads": [x["self"][2] for x in dec],
             "decoder_cross_heads": [x["cross"][2] for x in dec]}
    padded = {k: [(enc_heads if k == "encoder_heads" else dec_heads) - h for h in v] for k, v in heads.items()}
    real = sum(map(sum, heads.values()))
    total = enc_heads * len(enc) + dec_heads * 2 * len(dec)
    info = {"format": CT2_FORMAT, **head, "num_heads": {"encoder": enc_heads, "decoder": dec_heads},
            "heads": heads, "padded_heads": padded, "padded_fraction": round(1 - real / total, 4),
            "ffn": {"encoder": [x["ffn"][0].out_features for x in enc],
                    "decoder": [x["ffn"][0].out_features for x in dec]},
            "compute_type": COMPUTE_TYPE[head["precision"]],
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
        self.threads = threads or torch.get_num_threads()
        try:
            self.translator = ctranslate2.Translator(str(folder), device="cpu", compute_type=compute_type,
                                                     intra_threads=self.threads, inter_threads=1)
        except Exception as e:  # ctranslate2's own error types
            raise CtpruneError(f"CTranslate2 cannot load {folder}: {first_line(e)}") from None
        self.tokenizer = self._load_tokenizer()
        self.pieces = [str(p) for p in json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))]
        self.ids = {p: i for i, p in enumerate(self.pieces)}

    def _load_tokenizer(self) -> Any:
        if self.arch == "ctprune":
            from ctprune.data.tokenizer import Tokenizer

            return Tokenizer.load(self.folder)
        from transformers import AutoTokenizer

        from ctprune.arch.hf import HFTokenizer, quiet_transformers

        with quiet_transformers():
            try:
                hf = AutoTokenizer.from_pretrained(str(self.folder / HF_TOKENIZER_DIR), local_files_only=True)
            except Exception as e:  # a broken tokenizer fails in many ways
                raise CtpruneError(f"{self.folder}: cannot load the tokenizer: {first_line(e)}") from None
        return HFTokenizer(hf, self.pad_id, self.bos_id, self.eos_id)

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
        from the first step (MarianMT: its forced EOS at the limit makes the limit one token
        shorter; PAD dropped from the output, as ``hf.generate`` drops it). Beam search is
        CTranslate2's own. For ctprune's Transformer it runs without length penalty, returns its
        ``beam`` finished hypotheses, and the pick among them uses ``decode.beam_best``'s GNMT
        penalty (alpha 0.6); CTranslate2 refills the beam when a hypothesis finishes where ctprune
        keeps it in its slot, so the two may pick differently. For MarianMT it uses the
        generation config's ``length_penalty`` as Hugging Face does (score / length ** penalty),
        but stops when ``beam`` hypotheses are finished where Hugging Face searches on: not
        checked for exactness. ``steps``: exactly that many steps (EOS suppressed before), for
        timing."""
        native = self.arch == "ctprune"
        alpha = float(self.info.get("length_penalty", 0.6))
        n = steps or self.max_steps(src) - bool(self.info.get("forced_eos"))
        results = self.translator.translate_batch(
            self._tokens(src), beam_size=beam, num_hypotheses=beam, length_penalty=0.0 if native else alpha,
            return_scores=True, max_decoding_length=n, min_decoding_length=n if steps else 0, max_input_length=0,
            return_end_token=True)
        drop = {self.eos_id} if native else {self.eos_id, self.pad_id}
        out = []
        for r in results:
            # GNMT: log-prob / ((5 + length) / 6) ** alpha, the length counting the EOS
            best = max(range(len(r.hypotheses)), key=lambda j: r.scores[j] / ((5.0 + len(r.hypotheses[j])) / 6.0)
                       ** alpha) if native else 0
            out.append([i for i in (self.ids[p] for p in r.hypotheses[best]) if i not in drop])
        return out

    def score(self, src: Tensor, tgt: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probabilities: src (B, S), B target id lists (without BOS/EOS) ->
        per row the log-probability of each target token and of the final EOS."""
        results = self.translator.score_batch(self._tokens(src), [[self.pieces[i] for i in t] for t in tgt],
                                              max_input_length=0)
        return [list(r.log_probs) for r in results]
