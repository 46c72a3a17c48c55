"""Why the native Transformer trains below a MarianMT of the same size (issue 22): one difference
at a time, the first epoch(s) of the origin's 8-epoch recipe on Multi30k.

Every variant trains from the same seed, tokenizer, batches and learning-rate schedule (the fast
recipe's warm-up and cosine over ``--schedule-epochs``), stopped after ``--epochs``; val loss is
logged every ``--log-every`` steps and val BLEU (greedy) at the end. Results are appended to
``--output`` one variant at a time, so a rerun skips the variants already there. Prints one JSON
object and one readable line per variant. Usage:
    python benchmarks/origin_ablation.py --data-dir ../shared/data/multi30k \
        --output benchmarks/results/multi30k/origin-ablation.json [--variants native marian ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ctprune.model.transformer as transformer
import ctprune.training.loop as loop
from ctprune.arch import get as get_arch
from ctprune.data.batching import TokenizedSplit
from ctprune.data.corpus import load_split
from ctprune.data.tokenizer import Tokenizer
from ctprune.model.transformer import PRESETS
from ctprune.task import evaluate
from ctprune.training.loop import Recipe, evaluate_loss, make_optimizer, train_step


def xavier_init(model: nn.Module, pad_id: int) -> None:
    """The native model's initialisation before issue 22: Xavier-uniform for every matrix, zero
    biases, tied embeddings normal(0, d_model^-0.5), the padding row zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
        nn.init.normal_(model.src_embed.weight, std=model.cfg.d_model ** -0.5)
        model.src_embed.weight[pad_id].zero_()


def hf_init(model: nn.Module, pad_id: int, std: float = 0.02) -> None:
    """Hugging Face's Marian initialisation: normal(0, 0.02) for every Linear and Embedding,
    zero biases, the padding row zero."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                m.weight[pad_id].zero_()


def reference_attention(q, k, v, mask, causal, dropout_p, training):  # type: ignore[no-untyped-def]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          dropout_p=dropout_p if training else 0.0)


def reference_cross_entropy(logits, target, ignore_index, label_smoothing=0.0):  # type: ignore[no-untyped-def]
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, label_smoothing=label_smoothing)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# name -> (architecture, what it changes). Every native variant but "native" starts from the
# model as it was before issue 22 ("xavier-init") and changes one thing; "hf-init" is the fix,
# which is what "native" now is.
VARIANTS: dict[str, tuple[str, str]] = {
    "native": ("ctprune", "ctprune's Transformer as it is now (normal(0, 0.02) init)"),
    "xavier-init": ("ctprune", "the native model before issue 22: Xavier-uniform init, embeddings std d^-0.5"),
    "marian": ("marian", "MarianMTModel of the same sizes (the reference)"),
    "hf-init": ("ctprune", "Hugging Face's init: normal(0, 0.02) for every Linear and Embedding"),
    "no-final-norm": ("ctprune", "no final LayerNorm on encoder and decoder (Marian has none)"),
    "no-act-dropout": ("ctprune", "no dropout inside the FFN (Marian's activation_dropout is 0)"),
    "ref-ops": ("ctprune", "PyTorch's dropout, SDPA and cross-entropy instead of ctprune's ops"),
    "no-gen-bias": ("ctprune", "no output bias (Marian's final_logits_bias is a frozen zero buffer)"),
    "all": ("ctprune", "hf-init + no-final-norm + no-act-dropout + no-gen-bias"),
}


def build(variant: str, tok: Any, seed: int) -> tuple[nn.Module, contextlib.ExitStack]:
    """The variant's model (built under the variant's patches) and the patches that must stay
    on while it trains."""
    arch, _ = VARIANTS[variant]
    stack = contextlib.ExitStack()
    if variant == "ref-ops":
        stack.enter_context(patched(transformer, "Dropout", nn.Dropout))
        stack.enter_context(patched(transformer, "attention", reference_attention))
        stack.enter_context(patched(loop, "cross_entropy", reference_cross_entropy))
    torch.manual_seed(seed)
    model = get_arch(arch).from_scratch(PRESETS["seed"], tok)
    parts = {"hf-init", "no-final-norm", "no-act-dropout", "no-gen-bias"}
    chosen = parts if variant == "all" else {variant}
    if arch == "ctprune" and variant != "native":
        xavier_init(model, tok.pad_id)
    if "hf-init" in chosen:
        hf_init(model, tok.pad_id)
    if "no-final-norm" in chosen:
        model.encoder.norm, model.decoder.norm = nn.Identity(), nn.Identity()
    if "no-act-dropout" in chosen:
        for m in model.modules():
            if isinstance(m, transformer.FeedForward):
                m.dropout.p = 0.0
    if "no-gen-bias" in chosen:
        nn.init.zeros_(model.generator.bias)
        model.generator.bias.requires_grad_(False)
    return model, stack


def run_variant(variant: str, a: argparse.Namespace, proto: bytes,
                log: Callable[[str], None]) -> dict[str, Any]:
    arch = get_arch(VARIANTS[variant][0])
    tok = arch.tokenizer_from_spm(proto)
    train, val = (load_split("multi30k", s, a.data_dir) for s in ("train", "val"))
    model, stack = build(variant, tok, a.seed)
    recipe = Recipe(bf16=True, seed=a.seed)
    with stack:
        split = TokenizedSplit(train, tok, arch.max_len(model))
        val_split = TokenizedSplit(val, tok, arch.max_len(model))
        opt = make_optimizer((p for p in model.parameters() if p.requires_grad), recipe)
        steps_per_epoch = len(loop._batches(split, recipe, 0))
        total = steps_per_epoch * a.schedule_epochs
        step, curve, t0 = 0, [], time.perf_counter()
        for epoch in range(1, a.epochs + 1):
            model.train()
            for batch in loop._batches(split, recipe, epoch):
                loss = train_step(model, opt, batch, recipe, recipe.lr_at(step, total))
                step += 1
                if step % a.log_every == 0 or step == steps_per_epoch * a.epochs:
                    vloss = evaluate_loss(model, val_split, "cpu")
                    model.train()
                    curve.append({"step": step, "train_loss": round(float(loss), 4), "val_loss": round(vloss, 4)})
                    log(f"  {variant} step {step}: train {float(loss):.3f} val loss {vloss:.3f}")
        train_time = time.perf_counter() - t0
        bleu = evaluate(model, tok, val)
    return {"variant": variant, "what": VARIANTS[variant][1], "epochs": a.epochs,
            "schedule_epochs": a.schedule_epochs, "steps": step, "train_time_s": round(train_time, 1),
            "val_loss": curve[-1]["val_loss"], "val_bleu": round(bleu, 2), "curve": curve,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--schedule-epochs", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    done: dict[str, Any] = json.loads(a.output.read_text()) if a.output.is_file() else {"results": []}
    train = load_split("multi30k", "train", a.data_dir)
    torch.manual_seed(a.seed)
    proto = Tokenizer.train(train.src + train.tgt, 8000).proto
    for variant in a.variants:
        key = (variant, a.epochs, a.schedule_epochs, a.seed)
        if any((r["variant"], r["epochs"], r["schedule_epochs"], r.get("seed", 0)) == key for r in done["results"]):
            continue
        r = {**run_variant(variant, a, proto, lambda s: print(s, flush=True)), "seed": a.seed,
             "threads": torch.get_num_threads(), "torch": torch.__version__}
        done["results"].append(r)
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(done, indent=1) + "\n")
        print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
        print(f"{variant}: val BLEU {r['val_bleu']:.2f}, val loss {r['val_loss']:.3f} after {r['epochs']} "
              f"epoch(s) ({r['train_time_s']:.0f}s) -- {r['what']}", flush=True)


if __name__ == "__main__":
    main()
