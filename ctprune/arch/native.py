"""ctprune's own Transformer behind the architecture seam.

Unit names are the model's module names: ``encoder.layers.I.self_attn``,
``decoder.layers.I.self_attn``, ``decoder.layers.I.cross_attn`` (attention, by heads);
``encoder|decoder.layers.I.ffn`` (FFN, by hidden neurons); and every Linear inside them, e.g.
``decoder.layers.2.ffn.linear1`` (linear, unstructured).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctprune.arch import Architecture, Prunable
from ctprune.data.tokenizer import Tokenizer
from ctprune.model import checkpoint, decode, flops
from ctprune.model.ops import autocast_input
from ctprune.model.transformer import Attention, FeedForward, ModelConfig, Seq2SeqTransformer
from ctprune.pruning import importance, surgery


class NativeArchitecture(Architecture):
    name = "ctprune"
    model_class = "ctprune Seq2SeqTransformer"
    required_files = (checkpoint.CONFIG_FILE, checkpoint.WEIGHTS_FILE, "tokenizer.model")

    def claims(self, folder: Path, config: dict[str, Any]) -> bool:
        return "model_type" not in config and any(k in config for k in ("vocab_size", "d_model", "n_heads"))

    def load(self, folder: Path, device: str | torch.device = "cpu", tokenizer: bool = True
             ) -> tuple[nn.Module, Any, dict[str, Any]]:
        return checkpoint.load_native_folder(folder, device)  # a ctprune folder always has its tokenizer

    def save(self, folder: Path, model: nn.Module, tok: Any, hparams: dict[str, Any]) -> None:
        checkpoint.save_native_folder(folder, model, tok, hparams)  # type: ignore[arg-type]

    def fingerprint(self, folder: Path) -> str:
        h = hashlib.sha256((Path(folder) / checkpoint.CONFIG_FILE).read_bytes())
        h.update((Path(folder) / checkpoint.WEIGHTS_FILE).read_bytes())
        return h.hexdigest()[:16]

    def units(self, model: nn.Module) -> dict[str, Prunable]:
        out: dict[str, Prunable] = {}
        for name, m in model.named_modules():
            if not name.startswith(("encoder.layers.", "decoder.layers.")):
                continue
            params = sum(p.numel() for p in m.parameters())
            side = name.split(".")[0]
            if isinstance(m, Attention):
                out[name] = Prunable(name, "attention", params, m.n_heads, side)
            elif isinstance(m, FeedForward):
                out[name] = Prunable(name, "ffn", params, m.linear1.out_features, side)
            elif isinstance(m, nn.Linear):
                parent = name.rpartition(".")[0]
                out[name] = Prunable(name, "linear", params, m.weight.numel(), side,
                                     parent if parent in out and out[parent].kind != "linear" else None)
        return out

    def set_block(self, model: nn.Module, name: str, block: nn.Module) -> None:
        surgery.replace_module(model, name, block)  # type: ignore[arg-type]

    def cut(self, block: nn.Module, keep: Tensor) -> nn.Module:
        if isinstance(block, Attention):
            return surgery.cut_heads(block, keep)
        assert isinstance(block, FeedForward), type(block)
        return surgery.cut_neurons(block, keep)

    def scores(self, block: nn.Module, criterion: str) -> Tensor:
        if isinstance(block, Attention):
            return importance.head_original(block) if criterion == "original" else importance.head_l1(block)
        assert isinstance(block, FeedForward), type(block)
        return importance.neuron_l1(block)  # the prototype had no FFN criterion; L1 serves both

    def output_linear(self, model: nn.Module, name: str) -> nn.Linear:
        block = model.get_submodule(name)
        return block.out_proj if isinstance(block, Attention) else block.linear2

    def tokenizer_from_spm(self, spm_proto: bytes) -> Any:
        return Tokenizer(spm_proto)

    def from_scratch(self, sizes: dict[str, Any], tok: Any) -> nn.Module:
        return Seq2SeqTransformer(ModelConfig(vocab_size=tok.vocab_size, **sizes))

    def max_len(self, model: nn.Module) -> int:
        return model.cfg.max_len  # type: ignore[union-attr, return-value]

    def logits(self, model: nn.Module, src: Tensor, tgt_in: Tensor) -> Tensor:
        return model(src, tgt_in)

    @torch.no_grad()
    def traced_logits(self, model: nn.Module, src: Tensor, tgt_in: Tensor) -> tuple[Tensor, Any]:
        """The trace keeps every layer's input, the memory and the source mask, so that a variant
        in layer i reruns only layers i.. (a decoder variant never recomputes the encoder)."""
        inputs: dict[tuple[str, int], Tensor] = {}
        handles = [layer.register_forward_pre_hook(
            lambda _m, args, key=(side, i): inputs.__setitem__(key, args[0]))
            for side, stack in (("encoder", model.encoder), ("decoder", model.decoder))
            for i, layer in enumerate(stack.layers)]
        try:
            memory, mask = model.encode(src)
            logits = model.generator(model.decode(tgt_in, memory, mask))
        finally:
            for h in handles:
                h.remove()
        return logits, {"inputs": inputs, "memory": memory, "mask": mask}

    def logits_after(self, model: nn.Module, name: str, src: Tensor, tgt_in: Tensor, trace: Any) -> Tensor:
        side, _, i, *_ = name.split(".")  # encoder|decoder.layers.I...
        start, mask, memory = int(i), trace["mask"], trace["memory"]
        if side == "encoder":
            x = trace["inputs"]["encoder", start]
            for layer in model.encoder.layers[start:]:
                x = layer(x, mask)
            memory = model.encoder.norm(x)
            return model.generator(model.decode(tgt_in, memory, mask))
        y, memory = trace["inputs"]["decoder", start], autocast_input(memory)
        for layer in model.decoder.layers[start:]:
            y = layer(y, memory, mask)
        return model.generator(model.decoder.norm(y))

    def generate(self, model: nn.Module, src: Tensor, beam: int = 1, steps: int | None = None) -> list[list[int]]:
        if beam <= 1:
            return decode.greedy(model, src, steps)  # type: ignore[arg-type]
        return decode.beam_search(model, src, beam)  # type: ignore[arg-type]

    def forward_flops(self, model: nn.Module, src_len: int, tgt_len: int) -> int:
        return flops.forward_flops(model.cfg, src_len, tgt_len)  # type: ignore[arg-type]

    def block_flops(self, model: nn.Module, name: str, block: nn.Module, src_len: int, tgt_len: int) -> int:
        return flops.module_flops(name, block, src_len, tgt_len)
