"""Fault injection: every bad input or output path is refused in one line (exit 2), inputs stay
byte-identical and nothing is half-written; a failure inside a checkpoint write resumes to the
numbers of an uninterrupted run.

The table runs each case in-process (``ctprune.cli.main``) on a fresh copy of one workspace
(tiny model ``origin``, configurations ``conf.json``, ``plan.json``, pruned ``bank``) built
once per module; a few cases also run through a subprocess to prove there is no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctprune.cli import main
from ctprune.errors import CtpruneError

from .conftest import run_cli, tiny_config

# ------------------------------------------------------------------------------------------------
# The workspace: built once, copied per case.


@pytest.fixture(scope="module")
def workspace(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("faults") / "w"
    w.mkdir()
    shutil.copytree(model_folder, w / "origin")
    assert main(["configs", str(w / "origin"), "-n", "2", "--attention", "0.5", "0.75",
                 "-o", str(w / "conf.json")]) == 0
    assert main(["plan", str(w / "conf.json"), "-m", str(w / "origin"), "-o", str(w / "plan.json")]) == 0
    assert main(["prune", str(w / "origin"), "--plan", str(w / "plan.json"), "-o", str(w / "bank")]) == 0
    (w / "data").mkdir()
    for split in ("train", "val"):
        for lang in ("de", "en"):
            (w / "data" / f"{split}.{lang}").write_text("ein hund .\n", encoding="utf-8")
    (w / "notes.txt").write_text("a user's file\n")
    (w / "userdir").mkdir()
    (w / "userdir" / "keep.txt").write_text("keep me\n")
    return w


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones and symlinks included) with its content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


# ------------------------------------------------------------------------------------------------
# Corruptions: each takes the case's workspace copy and damages it.


def _index(w: Path) -> dict:
    return json.loads((w / "bank/index.json").read_text())


def _set_index(w: Path, index: dict) -> None:
    (w / "bank/index.json").write_text(json.dumps(index))


def _variant(w: Path, i: int = 0) -> tuple[str, dict]:
    key = sorted(_index(w)["variants"])[i]
    return key, _index(w)["variants"][key]


def edit_index(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        index = _index(w)
        fn(index)
        _set_index(w, index)
    return corrupt


def edit_entry(fn: Callable[[dict], None], drop_checksum: bool = False) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        index = _index(w)
        key = sorted(index["variants"])[0]
        fn(index["variants"][key])
        if drop_checksum:
            index["variants"][key].pop("checksum")
        _set_index(w, index)
    return corrupt


def rename_key(new_key: str, module: str | None = None) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        index = _index(w)
        key = sorted(index["variants"])[0]
        entry = index["variants"].pop(key)
        if module is not None:
            entry["module"] = module
        index["variants"][new_key] = entry
        _set_index(w, index)
    return corrupt


def variant_bytes(fn: Callable[[bytes], bytes], drop_checksum: bool = False) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        _, entry = _variant(w)
        f = w / "bank" / entry["file"]
        f.write_bytes(fn(f.read_bytes()))
        if drop_checksum:
            edit_entry(lambda e: None, drop_checksum=True)(w)
    return corrupt


def variant_tensors(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    """Rewrite the first variant's tensors (and drop its checksum, as a bank from before checksums)."""
    def corrupt(w: Path) -> None:
        _, entry = _variant(w)
        f = w / "bank" / entry["file"]
        save_file(fn(load_file(str(f))), str(f))
        edit_entry(lambda e: None, drop_checksum=True)(w)
    return corrupt


def swap_variants(w: Path) -> None:
    """Two variant files of the same shape (self-attention of layers 0 and 1) swap places."""
    files = [e["file"] for k, e in sorted(_index(w)["variants"].items()) if "self_attn@0.5" in k][:2]
    a, b = (w / "bank" / f for f in files)
    da, db = a.read_bytes(), b.read_bytes()
    assert len(da) == len(db)
    a.write_bytes(db)
    b.write_bytes(da)


def symlink_variant(w: Path) -> None:
    _, entry = _variant(w)
    f = w / "bank" / entry["file"]
    outside = w / "outside.safetensors"
    shutil.copyfile(f, outside)
    f.unlink()
    f.symlink_to(outside)


def write(rel: str, data: bytes | str, drop_manifest: bool = False) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        p = w / rel
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        if drop_manifest:
            (w / "origin/manifest.json").unlink()
    return corrupt


def truncate(rel: str, drop_manifest: bool = False) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        p = w / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        if drop_manifest:
            (w / "origin/manifest.json").unlink()
    return corrupt


def edit_json(rel: str, fn: Callable[[object], object], drop_manifest: bool = False) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        p = w / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
        if drop_manifest:
            (w / "origin/manifest.json").unlink()
    return corrupt


def _set(key: str, value: object) -> Callable[[object], object]:
    def fn(obj: object) -> object:
        assert isinstance(obj, dict)
        return {**obj, key: value}
    return fn


def _without(key: str) -> Callable[[object], object]:
    def fn(obj: object) -> object:
        assert isinstance(obj, dict)
        return {k: v for k, v in obj.items() if k != key}
    return fn


def _first_module(fn: Callable[[dict], None]) -> Callable[[object], object]:
    def wrap(plan: object) -> object:
        assert isinstance(plan, dict)
        fn(next(iter(plan["modules"].values())))
        return plan
    return wrap


def link(rel: str, target: str) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        (w / rel).symlink_to(w / target)
    return corrupt


def mkdir(rel: str) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        (w / rel).mkdir(parents=True)
        (w / rel / "mine.txt").write_text("a user's file\n")
    return corrupt


def nothing(w: Path) -> None:
    pass


COMPOSE = ["compose", "origin", "--bank", "bank", "-c", "conf.json", "-n", "0", "-o"]
FINETUNE = ["finetune", "origin", "--bank", "bank", "-c", "conf.json", "-n", "0", "--corpus", "synthetic",
            "--target-bleu", "none", "-o"]
TUNE = ["tune-blocks", "origin", "--bank", "bank", "--corpus", "synthetic", "-o"]
PRUNE = ["prune", "origin", "--plan", "plan.json", "-o"]
PLAN = ["plan", "conf.json", "-m", "origin", "-o"]
TRAIN = ["train", "--preset", "tiny", "--corpus", "multi30k", "--data-dir", "data", "-o"]

# (case id, command line (relative to the workspace), corruption, message fragment)
CASES: list[tuple[str, list[str], Callable[[Path], None], str]] = [
    # --- inputs are never outputs (the four reproductions first)
    ("compose-o-origin", COMPOSE + ["origin"], nothing, "is the model folder"),
    ("tune-o-bank-resume", TUNE + ["bank", "--resume"], nothing, "is the bank"),
    ("plan-o-conf", PLAN + ["conf.json"], nothing, "is the configuration file"),
    ("configs-o-origin-config", ["configs", "origin", "-n", "1", "-o", "origin/config.json"], nothing,
     "is inside the model folder"),
    ("compose-o-bank", COMPOSE + ["bank"], nothing, "is the bank"),
    ("compose-o-inside-bank", COMPOSE + ["bank/variants"], nothing, "is inside the bank"),
    ("compose-o-conf", COMPOSE + ["conf.json"], nothing, "is the configuration file"),
    ("compose-o-parent", COMPOSE + ["."], nothing, "contains the model folder"),
    ("compose-o-symlink-to-origin", COMPOSE + ["alias"], link("alias", "origin"), "is the model folder"),
    ("prune-o-inside-origin", PRUNE + ["origin/bank2"], nothing, "is inside the model folder"),
    ("prune-o-plan", PRUNE + ["plan.json"], nothing, "is the plan"),
    ("prune-o-existing", PRUNE + ["userdir"], nothing, "already exists"),
    ("finetune-o-bank", FINETUNE + ["bank"], nothing, "is the bank"),
    ("finetune-o-origin", FINETUNE + ["origin"], nothing, "is the model folder"),
    ("finetune-all-o-conf", ["finetune", "origin", "--bank", "bank", "-c", "conf.json", "--all",
                             "--corpus", "synthetic", "-o", "conf.json"], nothing, "is the configuration file"),
    ("train-o-data", TRAIN + ["data"], nothing, "is the data folder"),
    ("train-o-inside-data", TRAIN + ["data/model"], nothing, "is inside the data folder"),
    ("evaluate-o-origin", ["evaluate", "origin", "--corpus", "synthetic", "-o", "origin"], nothing,
     "is the model folder"),
    ("tune-o-inside-origin", TUNE + ["origin/tuned"], nothing, "is inside the model folder"),
    ("tune-o-inside-bank", TUNE + ["bank/tuned", "--resume"], nothing, "is inside the bank"),
    ("plan-o-origin", PLAN + ["origin"], nothing, "is the model folder"),
    ("configs-o-plan", ["configs", "origin", "-o", "plan.json"], nothing, "is not a configuration file"),
    ("configs-o-folder", ["configs", "origin", "-o", "userdir"], nothing, "is not a configuration file"),
    ("plan-o-other-conf", PLAN + ["conf2.json"],
     lambda w: shutil.copyfile(w / "conf.json", w / "conf2.json"), "is not a plan"),
    ("plan-o-folder", PLAN + ["userdir"], nothing, "is not a plan"),
    ("compose-o-file", COMPOSE + ["notes.txt"], nothing, "is not an empty folder"),
    ("compose-o-user-folder", COMPOSE + ["userdir"], nothing, "is not an empty folder"),
    ("train-o-file", ["train", "--preset", "tiny", "--corpus", "synthetic", "-o", "notes.txt"], nothing,
     "is not a training run"),
    ("train-o-user-folder", ["train", "--preset", "tiny", "--corpus", "synthetic", "-o", "userdir"], nothing,
     "is not a training run"),
    ("finetune-o-file", FINETUNE + ["notes.txt"], nothing, "is not a training run"),
    ("evaluate-o-file", ["evaluate", "origin", "--corpus", "synthetic", "-o", "notes.txt"], nothing,
     "is not a folder"),
    ("tune-resume-user-folder", TUNE + ["userdir", "--resume"], nothing, "is not a (partial) `tune-blocks`"),
    ("tune-resume-other-bank", TUNE + ["bank2", "--resume"],
     lambda w: shutil.copytree(w / "bank", w / "bank2"), "is not a (partial) `tune-blocks`"),
    # --- paths read from files stay inside their folder
    ("variant-file-absolute", COMPOSE + ["out"], edit_entry(lambda e: e.update(file="/etc/passwd")),
     "leaves its folder"),
    ("variant-file-dotdot", COMPOSE + ["out"],
     edit_entry(lambda e: e.update(file="../origin/model.safetensors")), "leaves its folder"),
    ("variant-file-dotdot-inner", COMPOSE + ["out"],
     edit_entry(lambda e: e.update(file="variants/../../origin/model.safetensors")), "leaves its folder"),
    ("variant-file-symlink-out", COMPOSE + ["out"], symlink_variant, "through a symlink"),
    ("variant-file-not-string", COMPOSE + ["out"], edit_entry(lambda e: e.update(file=3)), "non-empty string"),
    ("variant-module-dotdot", COMPOSE + ["out"], rename_key("../../evil@0.5", module="../../evil"),
     "dotted module name"),
    ("variant-key-dotdot-tune", TUNE + ["tuned"], rename_key("../../evil@0.5"), "does not match"),
    ("variant-key-mismatch", COMPOSE + ["out"], rename_key("encoder.layers.0.self_attn@0.25"),
     "does not match"),
    # --- bank index and variants
    ("index-not-json", COMPOSE + ["out"], write("bank/index.json", "{not json"), "not valid JSON"),
    ("index-duplicate-key", COMPOSE + ["out"],
     lambda w: (w / "bank/index.json").write_text((w / "bank/index.json").read_text()
                                                   .replace('"format"', '"format": "x", "format"', 1)),
     "appears twice"),
    ("index-no-variants", COMPOSE + ["out"], edit_index(lambda i: i.pop("variants")), '"variants" is missing'),
    ("index-variants-list", COMPOSE + ["out"], edit_index(lambda i: i.update(variants=[])),
     '"variants" is missing or not an object'),
    ("index-no-fingerprint", COMPOSE + ["out"], edit_index(lambda i: i.pop("model_fingerprint")),
     '"model_fingerprint" is missing'),
    ("index-wrong-format", COMPOSE + ["out"], edit_index(lambda i: i.update(format="x")),
     "is not a ctprune bank index"),
    ("index-other-model", COMPOSE + ["out"], edit_index(lambda i: i.update(model_fingerprint="0" * 16)),
     "was pruned from another model"),
    ("bank-missing", ["compose", "origin", "--bank", "nobank", "-c", "conf.json", "-n", "0", "-o", "out"],
     nothing, "is not a block bank"),
    ("variant-truncated", COMPOSE + ["out"], variant_bytes(lambda b: b[: len(b) // 2]), "truncated"),
    ("variant-altered", COMPOSE + ["out"], variant_bytes(lambda b: b[:-4] + b"\x00\x01\x02\x03"),
     "altered or swapped"),
    ("variants-swapped", COMPOSE + ["out"], swap_variants, "altered or swapped"),
    ("variant-missing-file", COMPOSE + ["out"], lambda w: (w / "bank" / _variant(w)[1]["file"]).unlink(),
     "is missing"),
    ("variant-garbage-nochecksum", COMPOSE + ["out"], variant_bytes(lambda b: b"garbage" * 10, True),
     "unreadable"),
    ("variant-truncated-nochecksum", COMPOSE + ["out"], variant_bytes(lambda b: b[: len(b) // 2], True),
     "unreadable"),
    ("variant-wrong-shape", COMPOSE + ["out"],
     variant_tensors(lambda t: {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in t.items()}),
     "does not fit"),
    ("variant-missing-tensor", COMPOSE + ["out"], variant_tensors(lambda t: dict(list(t.items())[1:])),
     "does not fit"),
    ("variant-kind-contradicts", COMPOSE + ["out"], edit_entry(lambda e: e.update(kind="ffn")), "says kind"),
    ("variant-kind-unknown", COMPOSE + ["out"], edit_entry(lambda e: e.update(kind="conv")), '"kind" must be'),
    ("variant-kept-not-list", COMPOSE + ["out"], edit_entry(lambda e: e.update(kept="0,1")), '"kept" must be'),
    ("variant-kept-beyond", COMPOSE + ["out"], edit_entry(lambda e: e.update(kept=[0, 99])),
     "beyond the module"),
    ("variant-ratio-bad", COMPOSE + ["out"], edit_entry(lambda e: e.update(ratio=2)), "keep ratio"),
    ("variant-no-provenance", COMPOSE + ["out"], edit_entry(lambda e: e.pop("provenance")), '"provenance"'),
    ("variant-checksum-malformed", COMPOSE + ["out"], edit_entry(lambda e: e.update(checksum="x")),
     "record of variant file"),
    # --- options and experiment files
    ("tune-max-tokens-negative", TUNE + ["tuned", "--max-tokens", "-5"], nothing, "--max-tokens must be at least 64"),
    ("tune-lr-nan", TUNE + ["tuned", "--lr", "nan"], nothing, "--lr must be a positive number"),
    ("run-toml-unknown-key", ["run", "exp.toml", "-o", "runout"],
     write("exp.toml", "[configurations]\nattention = [0.5]\n[tuning]\nlearning_rate = 1\n"), "unknown key"),
    ("run-toml-section-string", ["run", "exp.toml", "-o", "runout"],
     write("exp.toml", "origin = 'seed'\n[configurations]\nattention = [0.5]\n"), "must be a table"),
    ("run-toml-not-utf8", ["run", "exp.toml", "-o", "runout"],
     write("exp.toml", b"[data]\ncorpus = '\xff'\n"), "not UTF-8"),
    ("run-toml-target-nan", ["run", "exp.toml", "-o", "runout"],
     write("exp.toml", "[configurations]\nattention = [0.5]\n[finetuning]\ntarget_bleu = nan\n"), "target_bleu"),
    ("run-toml-lr-nan", ["run", "exp.toml", "-o", "runout"],
     write("exp.toml", "[configurations]\nattention = [0.5]\n[tuning]\nlr = nan\n"), "tuning.lr"),
    ("run-toml-seeds-repeated", ["run", "exp.toml", "-o", "runout"],
     write("exp.toml", "seeds = [1, 1]\n[configurations]\nattention = [0.5]\n"), "distinct integers"),
    ("run-toml-execution-unknown-key", ["run", "exp.toml", "-o", "runout"],
     write("exp.toml", "[configurations]\nattention = [0.5]\n[execution]\nnodes = 4\n"),
     "unknown key(s) ['nodes'] in [execution]"),
    ("run-toml-executor-unknown", ["run", "exp.toml", "-o", "runout"],
     write("exp.toml", "[configurations]\nattention = [0.5]\n[execution]\nexecutor = 'slurm'\n"),
     "execution.executor must be one of local, process, ray"),
    ("run-toml-workers-string", ["run", "exp.toml", "-o", "runout"],
     write("exp.toml", "[configurations]\nattention = [0.5]\n[execution]\nworkers = 'two'\n"),
     "execution.workers must be int"),
    ("run-workers-zero", ["run", "exp.toml", "-o", "runout", "--workers", "0"],
     # given on the command line: the message names the flag (a TOML value names its key)
     write("exp.toml", "[configurations]\nattention = [0.5]\n"), "--workers must be at least 1, got 0"),
    ("run-device-unknown", ["run", "exp.toml", "-o", "runout", "--device", "tpu"],
     write("exp.toml", "[configurations]\nattention = [0.5]\n"), "execution.device must be auto, cpu, cuda"),
    ("run-address-without-ray", ["run", "exp.toml", "-o", "runout", "--ray-address", "10.0.0.1:6379"],
     write("exp.toml", "[configurations]\nattention = [0.5]\n"), "execution.address is for executor"),
    # --- model folder
    ("weights-truncated", ["inspect", "origin"], truncate("origin/model.safetensors"), "truncated"),
    ("weights-altered", ["inspect", "origin"],
     lambda w: (w / "origin/model.safetensors").write_bytes(
         (w / "origin/model.safetensors").read_bytes()[:-2] + b"\x11\x22"), "altered or swapped"),
    ("weights-garbage-nomanifest", ["inspect", "origin"],
     write("origin/model.safetensors", b"\x00" * 64, drop_manifest=True), "unreadable"),
    ("weights-truncated-nomanifest", ["inspect", "origin"],
     truncate("origin/model.safetensors", drop_manifest=True), "unreadable"),
    ("tokenizer-garbage", ["inspect", "origin"], write("origin/tokenizer.model", b"garbage"), "tokenizer.model"),
    ("tokenizer-garbage-nomanifest", ["inspect", "origin"],
     write("origin/tokenizer.model", b"garbage", drop_manifest=True), "not a sentencepiece model"),
    ("hparams-garbage-nomanifest", ["inspect", "origin"],
     write("origin/hparams.json", "{oops", drop_manifest=True), "not valid JSON"),
    ("hparams-list-nomanifest", ["inspect", "origin"],
     write("origin/hparams.json", "[1, 2]", drop_manifest=True), "must be a JSON object"),
    ("config-string-number", ["inspect", "origin"],
     edit_json("origin/config.json", _set("d_model", "32"), drop_manifest=True),
     "d_model must be a positive integer"),
    ("config-dropout-string", ["inspect", "origin"],
     edit_json("origin/config.json", _set("dropout", "x"), drop_manifest=True),
     "config.json"),
    ("config-heads-list-wrong", ["inspect", "origin"],
     edit_json("origin/config.json", _set("encoder_heads", ["4", 4]), drop_manifest=True), "encoder_heads"),
    ("config-unknown-field", ["inspect", "origin"],
     edit_json("origin/config.json", _set("colour", 1), drop_manifest=True),
     "unknown field"),
    ("config-list", ["inspect", "origin"], write("origin/config.json", "[]"), "must be a JSON object"),
    ("config-not-json", ["inspect", "origin"], write("origin/config.json", "{"), "not valid JSON"),
    ("config-shape-mismatch", ["inspect", "origin"],
     edit_json("origin/config.json", _set("vocab_size", 50), drop_manifest=True),
     "do not fit its config"),
    ("config-missing", ["inspect", "origin"], lambda w: (w / "origin/config.json").unlink(), "missing config.json"),
    ("manifest-malformed", ["inspect", "origin"], write("origin/manifest.json", "{}"), "malformed"),
    ("manifest-foreign-file", ["inspect", "origin"],
     edit_json("origin/manifest.json", lambda m: {**m, "files": {"../x": {"bytes": 1, "sha256": "0"}}}),
     "unexpected file"),
    ("model-missing", ["inspect", "nomodel"], nothing, "model folder not found"),
    # --- plan
    ("plan-no-fingerprint", PRUNE + ["b2"], edit_json("plan.json", _without("model_fingerprint")),
     '"model_fingerprint" is missing'),
    ("plan-modules-list", PRUNE + ["b2"], edit_json("plan.json", _set("modules", [])),
     '"modules" must be an object'),
    ("plan-empty", PRUNE + ["b2"], edit_json("plan.json", _set("modules", {})), "nothing to prune"),
    ("plan-ratio-edited", PRUNE + ["b2"], edit_json("plan.json", _first_module(lambda e: e.update(ratios=[0.3]))),
     "edited after"),
    ("plan-kind-contradicts", PRUNE + ["b2"],
     edit_json("plan.json", _first_module(lambda e: e.update(kind="ffn"))), "contradicts the module"),
    ("plan-ratio-one", PRUNE + ["b2"], edit_json("plan.json", _first_module(lambda e: e.update(ratios=[1]))),
     "distinct and below 1"),
    ("plan-ratios-string", PRUNE + ["b2"], edit_json("plan.json", _first_module(lambda e: e.update(ratios="0.5"))),
     'non-empty list "ratios"'),
    ("plan-not-json", PRUNE + ["b2"], write("plan.json", b"\xff\xfe"), "not UTF-8"),
    ("plan-other-model", PRUNE + ["b2"], edit_json("plan.json", _set("model_fingerprint", "0" * 16)),
     "made for another model"),
    ("prune-ratio-one", ["prune", "origin", "--ratio", "1", "-o", "b2"], nothing, "bank would be empty"),
    # --- configuration file
    ("conf-duplicate-key", PLAN + ["p2.json"],
     write("conf.json", '[{"encoder.layers.0.self_attn": 0.5, "encoder.layers.0.self_attn": 0.25}]'),
     "appears twice"),
    ("conf-not-utf8", PLAN + ["p2.json"], write("conf.json", b'[{"\xff": 0.5}]'), "not UTF-8"),
    ("conf-ratio-string", PLAN + ["p2.json"], write("conf.json", '[{"encoder.layers.0.self_attn": "0.5"}]'),
     "keep ratio must be a number"),
    ("conf-unknown-module", PLAN + ["p2.json"], write("conf.json", '[{"encoder.layers.9.self_attn": 0.5}]'),
     "unknown module"),
    ("conf-is-folder", ["plan", "userdir", "-m", "origin", "-o", "p2.json"], nothing, "is a folder"),
    ("conf-empty-list", PLAN + ["p2.json"], write("conf.json", "[]"), "non-empty JSON list"),
    ("compose-n-out-of-range", ["compose", "origin", "--bank", "bank", "-c", "conf.json", "-n", "5", "-o", "out"],
     nothing, "out of range"),
    # --- options
    ("threads-zero", ["inspect", "origin", "--threads", "0"], nothing, "--threads must be at least 1"),
]


def refused_in_one_line(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch, args: list[str], corrupt: Callable[[Path], None],
                        fragment: str) -> str:
    """Run ``args`` on a copy of the workspace spoilt by ``corrupt``: exit status 2, one line naming
    the command and holding ``fragment``, inputs byte-identical and nothing (half-)written. Returns the line."""
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    corrupt(w)
    before = snapshot(tmp_path)
    monkeypatch.chdir(w)
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, [e[:300] for e in err]
    assert len(err) == 1 and err[0].startswith(f"ctprune {args[0]}: error: ") and fragment in err[0], \
        [e[:300] for e in err]
    assert snapshot(tmp_path) == before
    return err[0]


def refused_through_a_subprocess(workspace: Path, tmp_path: Path,
                                 case: tuple[str, list[str], Callable[[Path], None], str]) -> None:
    """A case of a fault table run as a real process on a spoilt copy: exit 2, one line, no traceback."""
    _, args, corrupt, fragment = case
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    corrupt(w)
    r = run_cli(*args, cwd=w)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("args, corrupt, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fault_is_refused_in_one_line(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch, args: list[str],
                                      corrupt: Callable[[Path], None], fragment: str) -> None:
    refused_in_one_line(workspace, tmp_path, capsys, monkeypatch, args, corrupt, fragment)


def test_translate_refuses_binary_stdin_and_keeps_unicode_separators_inside_lines(workspace: Path) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ctprune", "translate", str(workspace / "origin")]
    r = subprocess.run(cmd, input=b"ein hund\n\xff\xfe\x00\n", capture_output=True, timeout=120)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "not UTF-8" in err[0], err
    r = subprocess.run(cmd, input="ein\u2028hund\nder\x85mann\n".encode(), capture_output=True, timeout=120)
    assert r.returncode == 0 and len(r.stdout.decode("utf-8").split("\n")) == 3  # two lines in, two out


def test_a_closed_pipe_ends_output_quietly(workspace: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctprune inspect ... | head -1`: the reader left (EPIPE); ctprune stops without an error line."""
    import io

    class ClosedPipe(io.TextIOBase):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["inspect", str(workspace / "origin")]) == 141
    assert capsys.readouterr().err == ""


def test_a_grid_of_only_keep_one_is_refused_when_the_experiment_is_read(tmp_path: Path) -> None:
    from ctprune.run.experiment import load_experiment

    exp = tmp_path / "e.toml"
    exp.write_text('[data]\ncorpus = "synthetic"\n[search]\nflops = 0.5\ngrid = [1.0]\n')
    with pytest.raises(CtpruneError, match=r"e.toml: search.grid \[1.0\] prunes nothing: give keep ratios in"):
        load_experiment(exp)


def test_run_replaces_a_symlinked_experiment_copy_never_writing_through_it(tmp_path: Path,
                                                                          model_folder: Path) -> None:
    """A run folder whose experiment.toml is a link to a user's file: the run's copy replaces the
    link and the user's file keeps its content (here the run is then refused: min_distance)."""
    from ctprune.run.graph import MARKER, run_experiment

    user = tmp_path / "notes.txt"
    user.write_text("the user's own file\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / MARKER).write_text("a run folder\n")
    (run_dir / "experiment.toml").symlink_to(user)
    exp = tmp_path / "e.toml"
    exp.write_text(f'[data]\ncorpus = "synthetic"\n[origin]\nmodel = "{model_folder}"\n'
                   '[search]\nflops = 0.5\nmin_distance = 1000\n')
    with pytest.raises(CtpruneError, match="min_distance"):
        run_experiment(exp, run_dir)
    assert user.read_text() == "the user's own file\n"
    link = run_dir / "experiment.toml"
    assert not link.is_symlink() and link.read_text() == exp.read_text()


def test_the_table_is_large() -> None:
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", ["compose-o-origin", "tune-o-bank-resume", "variants-swapped",
                                  "weights-garbage-nomanifest"])
def test_fault_through_a_subprocess_has_no_traceback(workspace: Path, tmp_path: Path, case: str) -> None:
    _, args, corrupt, fragment = next(c for c in CASES if c[0] == case)
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    corrupt(w)
    before = snapshot(tmp_path)
    r = run_cli(*args, cwd=w)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# Histories are validated before numbers are derived from them.


def _finished_history(folder: Path) -> Path:
    from ctprune.fileio import file_record, write_json
    from ctprune.training.history import write_history

    rows = [dict(epoch=e, train_loss="1.0", val_loss="1.0", val_bleu=f"{10 * e}.00", lr="0.001",
                 epoch_time_s="1.0", wall_time_s=f"{e}.0", train_tokens=100 * e) for e in (1, 2, 3)]
    write_history(folder / "history.csv", rows)
    write_json(folder / "train_summary.json", {"best_val_bleu": 30.0, "history": file_record(folder / "history.csv")})
    return folder / "history.csv"


@pytest.mark.parametrize("damage, fragment", [
    (lambda t: t.rsplit("\n", 2)[0] + "\n", "truncated, altered or swapped"),
    (lambda t: t.replace("30.00", "90.00"), "altered or swapped"),
])
def test_a_damaged_finished_history_is_refused(tmp_path: Path, damage: Callable[[str], str], fragment: str) -> None:
    from ctprune.training.history import read_history

    path = _finished_history(tmp_path)
    assert [r["epoch"] for r in read_history(path)] == ["1", "2", "3"]
    path.write_text(damage(path.read_text()))
    with pytest.raises(CtpruneError, match=fragment):
        read_history(path)


@pytest.mark.parametrize("text, fragment", [
    ("epoch,val_bleu\n1,3.0\n2\n", "truncated"),
    ("epoch,val_bleu\n1,3.0\n2,abc\n", "not a number"),
    ("epoch,val_bleu\n1,3.0\n3,4.0\n", "epoch 3 after epoch 1"),
    ("epoch,val_bleu\n1,3.0,9\n", "extra fields"),
    ("val_bleu\n3.0\n", 'no "epoch" column'),
])
def test_a_malformed_history_is_refused(tmp_path: Path, text: str, fragment: str) -> None:
    from ctprune.training.history import read_history

    (tmp_path / "h.csv").write_text(text)
    with pytest.raises(CtpruneError, match=fragment):
        read_history(tmp_path / "h.csv")


# ------------------------------------------------------------------------------------------------
# Paths, integrity and commits, tested directly.


@pytest.mark.parametrize("rel", ["/etc/passwd", "../x", "a/../../x", "~/x", "C:/x", ""])
def test_contained_refuses_escaping_paths(tmp_path: Path, rel: str) -> None:
    from ctprune.fileio import contained

    with pytest.raises(CtpruneError):
        contained(tmp_path, rel, "test")
    assert contained(tmp_path, "a/b.txt", "test") == tmp_path / "a/b.txt"


def test_sweep_removes_what_a_killed_commit_left(tmp_path: Path) -> None:
    from ctprune.fileio import commit_dir, sweep_commits

    commit_dir(tmp_path / "last", lambda d: (d / "f").write_text("1"))
    (tmp_path / ".last-stale").mkdir()  # a folder written by a commit that was killed before its rename
    os.symlink(".last-stale", tmp_path / ".last.link.last-stale")
    sweep_commits(tmp_path / "last")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "last")[0].startswith(".last-")
    assert len(list(tmp_path.iterdir())) == 2 and (tmp_path / "last/f").read_text() == "1"


# ------------------------------------------------------------------------------------------------
# A failure at the n-th file replace inside a checkpoint write, then --resume: the same numbers.


class SimulatedKill(BaseException):
    """Raised by the test double of os.replace: like a kill, no ``except Exception`` catches it."""


def _fit(out: Path, tok_dir: Path, resume: bool) -> None:
    from ctprune.data.corpus import Parallel, load_split
    from ctprune.data.tokenizer import Tokenizer
    from ctprune.model.transformer import Seq2SeqTransformer
    from ctprune.training.loop import Recipe, fit

    train, val = load_split("synthetic", "train"), load_split("synthetic", "val")
    train, val = Parallel(train.src[:48], train.tgt[:48]), Parallel(val.src[:4], val.tgt[:4])
    torch.manual_seed(0)
    model = Seq2SeqTransformer(tiny_config(vocab_size=Tokenizer.load(tok_dir).vocab_size, dropout=0.1))
    fit(model, Tokenizer.load(tok_dir), train, val, Recipe(epochs=2, lr=3e-3, warmup_steps=2, max_tokens=256),
        out, {"stage": "test"}, resume=resume, eval_before=True)


def _numbers(out: Path) -> tuple[list[tuple[str, ...]], dict[str, list[float]], float]:
    from ctprune.fileio import read_json
    from ctprune.training.history import read_history

    rows = [(r["epoch"], r["train_loss"], r["val_loss"], r["val_bleu"], r["train_tokens"])
            for r in read_history(out / "history.csv")]
    weights = {k: v.flatten()[:8].tolist() for k, v in load_file(str(out / "last/model.safetensors")).items()}
    return rows, weights, read_json(out / "train_summary.json")["best_val_bleu"]


def _kind(src: object, dst: object) -> str:
    """The kind of file a replace writes: its name, under ``last/`` inside a checkpoint commit,
    or the ``last`` link itself (the commit's own replace)."""
    dst = Path(str(dst))
    if dst.name == "last" and Path(str(src)).name.startswith(".last.link."):
        return "last (link)"
    return f"last/{dst.name}" if dst.parent.name.startswith(".last-") else dst.name


@pytest.fixture(scope="module")
def straight_fit(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], tuple]:
    """One uninterrupted run of ``_fit``: the kind of file written by each of its replaces, in
    order (each replace is a kill point), and its numbers."""
    real_replace, kinds = os.replace, []

    def counting(src: object, dst: object) -> None:
        kinds.append(_kind(src, dst))
        real_replace(src, dst)

    out = tmp_path_factory.mktemp("straight") / "straight"
    os.replace = counting  # type: ignore[assignment]
    try:
        _fit(out, model_folder, resume=False)
    finally:
        os.replace = real_replace
    return kinds, _numbers(out)


def kill_points(kinds: list[str]) -> list[int]:
    """One replace (1-based) per kind of file written; kind j of the kinds in their first order
    takes its (j mod count)-th occurrence, so the kills spread over the first, middle and last
    checkpoints rather than all landing in the first."""
    order = list(dict.fromkeys(kinds))
    at = {k: [i + 1 for i, x in enumerate(kinds) if x == k] for k in order}
    return sorted(at[k][j % len(at[k])] for j, k in enumerate(order))


def test_kill_points_cover_every_kind_of_file_and_every_checkpoint() -> None:
    kinds = ["a", "last/m", "last/h", "last (link)", "h"] + ["last/m", "last/h", "last (link)", "h"] * 2 + ["s"]
    points = kill_points(kinds)
    assert {kinds[n - 1] for n in points} == set(kinds) and len(points) == len(set(kinds))
    assert points == [1, 4, 6, 9, 11, 14]  # the link in the first commit, the history in the second, ...


@pytest.mark.xdist_group("faults-checkpoint")
def test_a_failure_at_a_replace_of_every_kind_of_file_resumes_to_the_same_numbers(
        model_folder: Path, straight_fit: tuple[list[str], tuple], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure at a replace of each kind of file of the run (the best model's files, each file
    of a `last/` commit and the link that commits it, the history, the summary), then --resume:
    the numbers of the uninterrupted run, and nothing left over but the checkpoint `last` points at."""
    real_replace = os.replace
    kinds, reference = straight_fit
    points = kill_points(kinds)
    print(f"{len(kinds)} file replaces in an uninterrupted run, of {len(points)} kinds: one kill point each")
    assert {"model.safetensors", "last/model.safetensors", "last/trainer_state.pt", "last (link)", "history.csv",
            "train_summary.json"} <= {kinds[n - 1] for n in points}
    for n in points:
        out = tmp_path / f"killed-{n}"
        calls = 0

        def failing(src: object, dst: object, n: int = n) -> None:
            nonlocal calls
            calls += 1
            if calls == n:
                raise SimulatedKill(n)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing)
        with pytest.raises(SimulatedKill):
            _fit(out, model_folder, resume=False)
        monkeypatch.setattr(os, "replace", real_replace)
        _fit(out, model_folder, resume=True)
        assert _numbers(out) == reference, f"kill at replace {n} of {len(kinds)} ({kinds[n - 1]})"
        current = os.readlink(out / "last")  # nothing left over but the checkpoint `last` points at
        assert [p.name for p in out.iterdir() if p.name.startswith(".last")] == [current], n


KILL_SCRIPT = """
import os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tests.test_faults import _fit
n, calls, real = int(sys.argv[1]), 0, os.replace
def killing(src, dst):
    global calls
    calls += 1
    if calls == n:
        os._exit(137)  # like SIGKILL: no except, no finally, no cleanup runs
    real(src, dst)
os.replace = killing
_fit(Path(sys.argv[2]), Path(sys.argv[3]), resume=False)
"""


@pytest.mark.xdist_group("faults-checkpoint")
def test_a_real_kill_inside_a_checkpoint_write_resumes_to_the_same_numbers(
        model_folder: Path, straight_fit: tuple[list[str], tuple], tmp_path: Path) -> None:
    import subprocess
    import sys

    from .conftest import REPO

    total, reference = len(straight_fit[0]), straight_fit[1]
    for n in (6, total // 2, total - 2):  # in the first checkpoint, mid-run, in the final writes
        out = tmp_path / f"killed-{n}"
        r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(n), str(out), str(model_folder)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 137, r.stderr
        _fit(out, model_folder, resume=True)
        assert _numbers(out) == reference, f"killed at replace {n} of {total}"


# ------------------------------------------------------------------------------------------------
# `ctprune run` (issue 25, run level): `-o` takes only a new or empty folder or a run folder, limits
# are stated as ranges, refusals name the experiment file's keys and come before any work; nothing
# is written, in the run folder or anywhere else.

RUN_TOML = """[data]
corpus = "folder:de-en"
data_dir = "data"
[origin]
model = "origin"
{section}
[finetuning]
target_bleu = {target}
"""


def run_toml(section: str = "[configurations]\nattention = [0.5]", target: str = '"none"',
             extra: str = "") -> Callable[[Path], None]:
    return write("exp.toml", RUN_TOML.format(section=section, target=target) + extra)


def run_toml_in_sub(w: Path) -> None:
    (w / "sub").mkdir()
    (w / "sub/exp.toml").write_text(RUN_TOML.format(section="[configurations]\nattention = [0.5]",
                                                    target='"none"').replace('"origin"', '"../origin"'))


RUN_CASES = [
    ("run-o-userdir", ["run", "exp.toml", "-o", "userdir"], run_toml(), "is not a run folder"),
    ("run-o-dot", ["run", "exp.toml", "-o", "."], run_toml(), "contains the origin model folder"),
    ("run-o-origin", ["run", "exp.toml", "-o", "origin"], run_toml(), "is the origin model folder"),
    ("run-o-data", ["run", "exp.toml", "-o", "data"], run_toml(), "is the data folder"),
    ("run-workers-overflow", ["run", "exp.toml", "-o", "r", "--workers", "9223372036854775807"], run_toml(),
     "--workers must be in [1, 1024], got 9223372036854775807"),
    ("run-toml-workers-overflow", ["run", "exp.toml", "-o", "r"],
     run_toml(extra="[execution]\nworkers = 9223372036854775807\n"),
     "exp.toml: execution.workers must be in [1, 1024]"),
    ("run-origin-epochs-0", ["run", "exp.toml", "-o", "r"],
     write("exp.toml", '[data]\ncorpus = "synthetic"\n[origin]\nepochs = 0\n[configurations]\nattention = [0.5]\n'),
     "origin.epochs must be at least 1"),
    ("run-no-module", ["run", "exp.toml", "-o", "r"], run_toml('[configurations]\ninline = [{ "x.y" = 0.5 }]'),
     "x.y"),
    ("run-min-distance", ["run", "exp.toml", "-o", "r"],
     run_toml('[search]\ngrid = [0.5]\nkinds = ["attention"]\nflops = 0.9\nmin_distance = 99'),
     "exp.toml: search.min_distance must be in [1, "),
    ("run-target-below-0", ["run", "exp.toml", "-o", "r"], run_toml(target='"origin-1000"'),
     "exp.toml: finetuning.target_bleu = 'origin-1000' is "),
    # data_dir is relative to the experiment file (as model and file are), not to the working directory
    ("run-data-dir-relative", ["run", "sub/exp.toml", "-o", "r"], run_toml_in_sub, "data folder {w}/sub/data does not"),
]


@pytest.mark.parametrize("args, corrupt, fragment", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_run_fault_is_refused_in_one_line_leaving_nothing(workspace: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                         corrupt: Callable[[Path], None], fragment: str) -> None:
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    corrupt(w)
    before = snapshot(tmp_path)
    monkeypatch.chdir(w)
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    fragment = fragment.format(w=w.resolve())
    assert len(err) == 1 and err[0].startswith("ctprune run: error: ") and fragment in err[0], err
    assert snapshot(tmp_path) == before  # no .lock, experiment.toml, conf.json, jobs/ or banks/ anywhere


@pytest.mark.parametrize("case", ["run-o-userdir", "run-workers-overflow"])
def test_run_fault_through_a_subprocess_has_no_traceback(workspace: Path, tmp_path: Path, case: str) -> None:
    _, args, corrupt, fragment = next(c for c in RUN_CASES if c[0] == case)
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    corrupt(w)
    before = snapshot(tmp_path)
    r = run_cli(*args, cwd=w)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert snapshot(tmp_path) == before


# ================================================================================================
# Issue 25, file-level faults: bounded reads, absurd sizes, symlinks, user files never overwritten
# or deleted, one writer per output, --resume with changed options, closed streams, progress bars.


def sparse(rel: str, size: int) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        os.truncate(w / rel, size)  # a sparse file: reading it whole would cost `size` bytes of memory
    return corrupt


def nested(rel: str, depth: int, drop_manifest: bool = False) -> Callable[[Path], None]:
    return write(rel, "[" * depth + "]" * depth, drop_manifest)


def mark_with_user_file(rel: str) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        from ctprune.stages.tune_blocks import TUNING_MARK

        shutil.copytree(w / "bank", w / rel)
        (w / rel / TUNING_MARK).write_text("{}")
        (w / rel / "thesis.tex").write_text("a user's file\n")
    return corrupt


def tuning_output_with_linked_variants(rel: str) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        from ctprune.stages.tune_blocks import TUNING_MARK

        shutil.copytree(w / "bank", w / rel)
        (w / rel / TUNING_MARK).write_text("{}")
        shutil.rmtree(w / rel / "variants")
        (w / rel / "variants").symlink_to(w / "userdir")  # writes into it would land in userdir
    return corrupt


def state_without_checkpoint(rel: str) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        (w / rel / ".state").mkdir(parents=True)
        (w / rel / "thesis.tex").write_text("a user's file\n")
    return corrupt


EVALUATE = ["evaluate", "origin", "--corpus", "synthetic", "--split", "val"]

FILE_CASES: list[tuple[str, list[str], Callable[[Path], None], str]] = [
    # --- every metadata read is bounded in size and nesting (#10)
    ("index-sparse-1gb", COMPOSE + ["out"], sparse("bank/index.json", 1 << 30), "larger than 16 MB"),
    ("index-nested-100k", COMPOSE + ["out"], nested("bank/index.json", 100_000), "nests deeper than 32"),
    ("index-nested-40", COMPOSE + ["out"], nested("bank/index.json", 40), "nests deeper than 32"),
    ("plan-nested-100k", PRUNE + ["b2"], nested("plan.json", 100_000), "nests deeper than 32"),
    ("conf-nested-100k", PLAN + ["p2.json"], nested("conf.json", 100_000), "nests deeper than 32"),
    ("config-nested-100k", ["inspect", "origin"], nested("origin/config.json", 100_000, drop_manifest=True),
     "nests deeper than 32"),
    ("config-sparse-1gb", ["inspect", "origin"], sparse("origin/config.json", 1 << 30), "larger than 16 MB"),
    # --- absurd sizes in config.json are refused before anything is allocated (#10)
    ("config-layers-100k", ["inspect", "origin"],
     edit_json("origin/config.json", _set("n_encoder_layers", 100_000), drop_manifest=True),
     "describes a model of at least"),
    ("config-layers-1e12", ["inspect", "origin"],
     edit_json("origin/config.json", _set("n_decoder_layers", 10**12), drop_manifest=True),
     "describes a model of at least"),
    ("config-d-model-huge", ["inspect", "origin"],
     edit_json("origin/config.json", _set("d_model", 2**20), drop_manifest=True), "describes a model of at least"),
    ("config-d-ff-huge", ["inspect", "origin"],
     edit_json("origin/config.json", lambda c: {**c, "d_ff": 2**30, "encoder_ffn": [2**30] * 2},  # type: ignore[dict-item]
               drop_manifest=True), "describes a model of at least"),
    ("config-max-len-huge", ["inspect", "origin"],
     edit_json("origin/config.json", _set("max_len", 10**9), drop_manifest=True), "max_len must be at most"),
    # --- config.json is in the manifest: an edit is detected (#6)
    ("config-edited-eos", ["inspect", "origin"], edit_json("origin/config.json", _set("eos_id", 5)),
     "altered or swapped"),
    # --- bounded options (#10)
    ("translate-beam-1e9", ["translate", "origin", "--beam", "1000000000"], nothing,
     "--beam must be an integer in 1..64"),
    ("evaluate-beam-1e9", EVALUATE + ["--beam", "1000000000"], nothing, "--beam must be an integer in 1..64"),
    ("evaluate-beam-zero", EVALUATE + ["--beam", "0"], nothing, "--beam must be an integer in 1..64"),
    # --- writes never follow symlinks (#9)
    ("evaluate-eval-symlink", EVALUATE, link("origin/eval", "userdir"), "is a symlink"),
    ("evaluate-o-symlink", EVALUATE + ["-o", "alias"], link("alias", "userdir"), "is a symlink"),
    ("tune-bank-holds-symlink", TUNE + ["tuned"], link("bank/variants/extra", "userdir"), "holds a symlink"),
    ("tune-bank-holds-file-symlink", TUNE + ["tuned"], link("bank/notes.txt", "notes.txt"), "holds a symlink"),
    ("tune-resume-output-linked-variants", TUNE + ["mine", "--resume"], tuning_output_with_linked_variants("mine"),
     "tune-blocks output mine holds a symlink variants"),
    # --- user files are never overwritten or deleted (#3)
    ("evaluate-o-user-folder", EVALUATE + ["-o", "userdir"], nothing, "is not empty or an `evaluate` folder"),
    ("tune-resume-state-without-checkpoint", TUNE + ["mine", "--resume"], state_without_checkpoint("mine"),
     "is not a (partial) `tune-blocks`"),
    ("tune-resume-marked-with-user-file", TUNE + ["mine", "--resume"], mark_with_user_file("mine"),
     "holds files tune-blocks did not write (thesis.tex)"),
]


@pytest.mark.parametrize("args, corrupt, fragment", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_file_fault_is_refused_in_one_line(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, args: list[str],
                                           corrupt: Callable[[Path], None], fragment: str) -> None:
    test_fault_is_refused_in_one_line(workspace, tmp_path, capsys, monkeypatch, args, corrupt, fragment)


@pytest.mark.parametrize("case", ["index-nested-100k", "config-layers-100k", "translate-beam-1e9",
                                  "tune-bank-holds-symlink"])
def test_file_fault_through_a_subprocess_has_no_traceback(workspace: Path, tmp_path: Path, case: str) -> None:
    _, args, corrupt, fragment = next(c for c in FILE_CASES if c[0] == case)
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    corrupt(w)
    before = snapshot(tmp_path)
    r = run_cli(*args, cwd=w, stdin="")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(tmp_path) == before


def test_toml_nested_deep_is_one_line(tmp_path: Path) -> None:
    from ctprune.fileio import read_toml

    (tmp_path / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(CtpruneError, match="nests deeper than 32"):
        read_toml(tmp_path / "deep.toml", "experiment")
    from ctprune.run.experiment import load_experiment

    with pytest.raises(CtpruneError, match="nests deeper than 32"):  # what `ctprune run` reads
        load_experiment(tmp_path / "deep.toml")
    (tmp_path / "big.toml").write_text("")
    os.truncate(tmp_path / "big.toml", 1 << 30)
    with pytest.raises(CtpruneError, match="larger than 16 MB"):
        read_toml(tmp_path / "big.toml", "experiment")


@pytest.mark.parametrize("redirect, fragment", [("<&-", "standard input is closed"),
                                                ("</dev/null >&-", "standard output is closed")])
def test_translate_with_a_closed_stream_is_one_line(workspace: Path, redirect: str, fragment: str) -> None:
    import subprocess
    import sys

    r = subprocess.run(f"{sys.executable} -m ctprune translate origin {redirect}", shell=True, cwd=workspace,
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr


def test_evaluate_adds_to_its_own_folder_and_writes_nothing_through_links(workspace: Path, tmp_path: Path) -> None:
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    args = ["evaluate", str(w / "origin"), "--corpus", "synthetic", "--split", "val", "-o", str(w / "ev")]
    assert main(args) == 0
    assert main([*args, "--beam", "2"]) == 0  # its own folder: accepted again
    assert sorted(p.name for p in (w / "ev").iterdir()) == ["val.beam2.en", "val.beam2.json",
                                                            "val.greedy.en", "val.greedy.json"]
    (w / "ev" / "notes.txt").write_text("mine\n")
    assert main(args) == 2 and (w / "ev" / "notes.txt").read_text() == "mine\n"


@pytest.fixture(scope="module")
def tuned_workspace(workspace: Path, small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workspace with ``tuned``: one epoch of block tuning (its state kept for --resume) on
    ``corpus``, a link to conftest's small_corpus (a copy of the workspace links the same folder, so
    a resume in the copy reads the data folder the tuning recorded)."""
    w = tmp_path_factory.mktemp("tuned") / "w"
    shutil.copytree(workspace, w, symlinks=True)
    (w / "corpus").symlink_to(small_corpus, target_is_directory=True)
    assert main(_tune_args(w)) == 0
    return w


def _tune_args(w: Path) -> list[str]:
    return ["tune-blocks", str(w / "origin"), "--bank", str(w / "bank"), "--corpus", "folder:de-en", "--data-dir",
            str(w / "corpus"), "--max-tokens", "256", "-e", "1", "-o", str(w / "tuned")]


@pytest.mark.xdist_group("faults-tuned")
@pytest.mark.parametrize("change, named", [(["--lr", "0.5"], "lr 0.0001 -> 0.5"), (["--seed", "3"], "seed 0 -> 3"),
                                           (["--patience", "7"], "patience 2 -> 7"),
                                           (["--max-tokens", "512"], "max_tokens 256 -> 512")])
def test_tune_blocks_resume_refuses_changed_options(tuned_workspace: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], change: list[str],
                                                    named: str) -> None:
    w = tmp_path / "w"
    shutil.copytree(tuned_workspace, w, symlinks=True)
    before = snapshot(w)
    capsys.readouterr()
    assert main([*_tune_args(w), "--resume", *change]) == 2  # the last -e / --lr / ... given wins
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed options" in err[0] and named in err[0], err
    assert snapshot(w) == before


@pytest.mark.xdist_group("faults-tuned")
def test_a_tuned_bank_is_an_input_of_tune_blocks(tuned_workspace: Path, tmp_path: Path) -> None:
    """A tuned bank keeps its own ``.state`` link (the resume checkpoint): tuning it further is
    allowed, and the link is not copied into the new bank."""
    w = tmp_path / "w"
    shutil.copytree(tuned_workspace, w, symlinks=True)
    assert (w / "tuned" / ".state").is_symlink()
    args = [*_tune_args(w)[:-1], str(w / "tuned2")]
    args[args.index("--bank") + 1] = str(w / "tuned")
    assert main(args) == 0
    assert (w / "tuned2" / "index.json").is_file()


@pytest.mark.xdist_group("faults-tuned")
def test_tune_blocks_takes_one_writer_lock(tuned_workspace: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from ctprune.fileio import locked

    w = tmp_path / "w"
    shutil.copytree(tuned_workspace, w, symlinks=True)
    with locked(w / "tuned", "tune-blocks"):  # as a second process would hold it
        capsys.readouterr()
        assert main([*_tune_args(w), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another `ctprune tune-blocks` is writing" in err[0], err
    assert main([*_tune_args(w), "--resume"]) == 0  # released, same options: resumes (nothing left to do)


def test_train_resume_refuses_a_changed_recipe(model_folder: Path, tmp_path: Path) -> None:
    from ctprune.data.corpus import Parallel, load_split
    from ctprune.data.tokenizer import Tokenizer
    from ctprune.model.transformer import Seq2SeqTransformer
    from ctprune.training.loop import Recipe, fit

    train, val = load_split("synthetic", "train"), load_split("synthetic", "val")
    train, val = Parallel(train.src[:32], train.tgt[:32]), Parallel(val.src[:4], val.tgt[:4])
    tok = Tokenizer.load(model_folder)

    def run(**recipe: object) -> None:
        torch.manual_seed(0)
        model = Seq2SeqTransformer(tiny_config(vocab_size=tok.vocab_size))
        fit(model, tok, train, val, Recipe(**{"epochs": 1, "lr": 3e-3, "max_tokens": 256, **recipe}),  # type: ignore[arg-type]
            tmp_path / "t", {"stage": "test"}, resume=True)

    run()
    with pytest.raises(CtpruneError, match=r"changed recipe \(epochs 1 -> 2; lr 0.003 -> 0.01; seed 0 -> 4\)") as e:
        run(lr=1e-2, seed=4, epochs=2)  # the fast recipe's cosine schedule spans the epochs: they count too
    assert "\n" not in str(e.value)
    run()  # the same recipe resumes
    from ctprune.fileio import locked

    with locked(tmp_path / "t", "train"):  # as a second `train --resume` would hold it
        with pytest.raises(CtpruneError, match="another `ctprune train/finetune` is writing"):
            run()
    run()  # released: resumes


def test_every_progress_bar_goes_through_the_one_helper() -> None:
    from .conftest import REPO

    direct = [str(p) for p in (REPO / "ctprune").rglob("*.py") if p.name != "progress.py" and "tqdm(" in p.read_text()]
    assert direct == []


# ================================================================================================
# Issue 25, the cases still open after the first round: refusals that named the wrong thing, values
# echoed whole, duplicate keys in Hugging Face JSON, disk full, unbounded sizes of pruned HF folders.


def huge_string(rel: str, key: str, drop_manifest: bool = False) -> Callable[[Path], None]:
    return edit_json(rel, _set(key, "x" * 10_000_000), drop_manifest)


def conf_of(obj: object) -> Callable[[Path], None]:
    return write("conf.json", json.dumps(obj))


OPEN_CASES: list[tuple[str, list[str], Callable[[Path], None], str]] = [
    # a grid or configuration that prunes nothing is refused as such, not as a missing bank/index
    ("prune-grid-one", ["prune", "origin", "--grid", "1.0", "-o", "g"], nothing,
     "--grid 1 keeps every module whole, so the grid bank would be empty; give keep ratios in [0, 1)"),
    ("prune-grid-zero-linear", ["prune", "origin", "--grid", "0", "--kinds", "linear", "-o", "g"], nothing,
     "--grid 0 with --kinds linear gives no block variant"),
    ("search-empty-bank", ["search", "origin", "--bank", "empty", "--flops", "0.5", "--corpus", "synthetic",
                           "-o", "s.json"],
     lambda w: (shutil.copytree(w / "bank", w / "empty"),
                (w / "empty/index.json").write_text(json.dumps({**_index(w), "variants": {}}))),
     "bank empty holds no block variants"),
    ("compose-conf-ratio-one", ["compose", "origin", "--bank", "nobank", "-c", "conf.json", "-n", "0", "-o", "out"],
     conf_of([{"encoder.layers.0.self_attn": 1.0}]), "configuration 0 of conf.json prunes nothing"),
    ("finetune-conf-ratio-one", ["finetune", "origin", "--bank", "nobank", "-c", "conf.json", "-n", "1",
                                 "--corpus", "synthetic", "--target-bleu", "none", "-o", "ft"],
     conf_of([{"encoder.layers.0.self_attn": 0.5}, {"encoder.layers.0.self_attn": 1.0}]),
     "configuration 1 of conf.json prunes nothing"),
    # values from files are echoed cut, never whole (a 10 MB string made a 10 MB message)
    ("conf-module-10mb", PLAN + ["p2.json"], conf_of([{"x" * 10_000_000: 0.5}]), "unknown module 'xxxx"),
    ("conf-ratio-10mb", PLAN + ["p2.json"], conf_of([{"encoder.layers.0.self_attn": "x" * 10_000_000}]),
     "keep ratio must be a number in [0, 1], got 'xxx"),
    ("index-module-10mb", COMPOSE + ["out"], edit_entry(lambda e: e.update(module="x" * 10_000_000)),
     "the key does not match its module and ratio"),
    ("config-field-10mb", ["inspect", "origin"], huge_string("origin/config.json", "d_model", drop_manifest=True),
     "d_model must be a positive integer, got 'xxx"),
    ("variant-file-10mb", COMPOSE + ["out"], edit_entry(lambda e: e.update(file="/" + "x" * 10_000_000)),
     "leaves its folder"),
]


@pytest.mark.parametrize("args, corrupt, fragment", [c[1:] for c in OPEN_CASES], ids=[c[0] for c in OPEN_CASES])
def test_open_fault_is_refused_in_one_short_line(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                 corrupt: Callable[[Path], None], fragment: str) -> None:
    line = refused_in_one_line(workspace, tmp_path, capsys, monkeypatch, args, corrupt, fragment)
    assert len(line) < 600, line[:300]  # whatever it echoes, the message stays one short line


@pytest.mark.parametrize("case", ["prune-grid-one", "search-empty-bank", "conf-module-10mb"])
def test_open_fault_through_a_subprocess_has_no_traceback(workspace: Path, tmp_path: Path, case: str) -> None:
    _, args, corrupt, fragment = next(c for c in OPEN_CASES if c[0] == case)
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    corrupt(w)
    r = run_cli(*args, cwd=w)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0] and len(lines[0]) < 1000, r.stderr[:2000]


@pytest.fixture(scope="module")
def hf_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MarianMT as a user brings it (``marian``: save_pretrained), and ``pruned``: one of its
    configurations composed by ctprune (ctprune_layers.json, manifest)."""
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ctprune.arch.marian import marian_tokenizer
    from ctprune.data.synthetic import synthetic_corpus
    from ctprune.data.tokenizer import Tokenizer

    from .test_hf import tiny_marian

    w = tmp_path_factory.mktemp("hf") / "w"
    pairs = synthetic_corpus("train")
    proto = Tokenizer.train([p[0] for p in pairs] + [p[1] for p in pairs], 300).proto
    tok = marian_tokenizer(proto, w / "marian")
    tiny_marian(vocab=len(tok)).save_pretrained(str(w / "marian"))
    (w / "conf.json").write_text(json.dumps([{"model.encoder.layers.0.self_attn": 0.5,
                                              "model.encoder.layers.1.ffn": 0.25,
                                              "model.decoder.layers.0.fc1": 0.2}]))
    assert main(["plan", str(w / "conf.json"), "-m", str(w / "marian"), "-o", str(w / "plan.json")]) == 0
    assert main(["prune", str(w / "marian"), "--plan", str(w / "plan.json"), "-o", str(w / "bank")]) == 0
    assert main(["compose", str(w / "marian"), "--bank", str(w / "bank"), "-c", str(w / "conf.json"), "-n", "0",
                 "-o", str(w / "pruned")]) == 0
    (w / "pruned/manifest.json").unlink()  # as a hand-made or hand-edited folder: nothing but its files to trust
    return w


def json_text(rel: str, text: str) -> Callable[[Path], None]:
    return write(rel, text)


def duplicate_key(rel: str, key: str) -> Callable[[Path], None]:
    """``rel``'s first ``"key":`` given twice (the first value a decoy)."""
    def corrupt(w: Path) -> None:
        p = w / rel
        text = p.read_text()
        assert f'"{key}"' in text, (rel, key)
        p.write_text(text.replace(f'"{key}"', f'"{key}": 0, "{key}"', 1))
    return corrupt


HF_CASES: list[tuple[str, list[str], Callable[[Path], None], str]] = [
    # config.json without model_type, or with one that contradicts its architectures
    ("hf-config-no-model-type", ["inspect", "marian"], edit_json("marian/config.json", _without("model_type")),
     'has no model_type, which names the model family; for MarianMTModel it is "model_type": "marian"'),
    ("hf-config-no-model-type-no-architectures", ["inspect", "marian"],
     edit_json("marian/config.json", lambda c: {k: v for k, v in c.items()  # type: ignore[union-attr]
                                                if k not in ("model_type", "architectures")}),
     "looks like a Hugging Face config but has no model_type"),
    ("hf-config-model-type-t5", ["inspect", "marian"], edit_json("marian/config.json", _set("model_type", "t5")),
     "model_type 't5' contradicts its architectures (MarianMTModel, model_type \"marian\")"),
    ("hf-config-model-type-bart", ["inspect", "marian"], edit_json("marian/config.json", _set("model_type", "bart")),
     "model_type 'bart' contradicts its architectures"),
    ("hf-config-model-type-10mb", ["inspect", "marian"], huge_string("marian/config.json", "model_type"),
     "model_type 'xxx"),
    ("hf-config-architectures-10mb", ["inspect", "marian"],
     edit_json("marian/config.json", _set("architectures", ["X" * 10_000_000])), "(10,000,000 characters)"),
    # per-layer sizes of the wrong JSON type
    ("hf-sparse-linears-object", ["inspect", "pruned"],
     edit_json("pruned/ctprune_layers.json", _set("sparse_linears", {"model.decoder.layers.0.fc1": 1})),
     "sparse_linears must be a list of Linear names, got {"),
    ("hf-sparse-linears-of-objects", ["inspect", "pruned"],
     edit_json("pruned/ctprune_layers.json", _set("sparse_linears", [{"a": 1}])),
     "sparse_linears must be a list of distinct Linear names (strings)"),
    ("hf-sparse-linears-of-lists", ["inspect", "pruned"],
     edit_json("pruned/ctprune_layers.json", _set("sparse_linears", [["model.decoder.layers.0.fc1"]])),
     "sparse_linears must be a list of distinct Linear names (strings)"),
    ("hf-attention-list", ["inspect", "pruned"], edit_json("pruned/ctprune_layers.json", _set("attention", [0, 1])),
     "attention must be an object {unit name: sizes}, got [0, 1]"),
    ("hf-layers-other-model-type", ["inspect", "pruned"],
     edit_json("pruned/ctprune_layers.json", _set("model_type", "t5")), "written for model_type 't5'"),
    # huge sizes on the units ctprune_layers.json does not list (full size) are bounded too
    ("hf-pruned-unpruned-ffn-huge", ["inspect", "pruned"],
     edit_json("pruned/config.json", _set("decoder_ffn_dim", 10**11)), "describes a pruned MarianMTModel of at least"),
    ("hf-pruned-ffn-10m", ["inspect", "pruned"],
     edit_json("pruned/config.json", _set("encoder_ffn_dim", 10**7)), "describes a pruned MarianMTModel of at least"),
    ("hf-config-dropout-nan", ["inspect", "marian"],
     lambda w: (w / "marian/config.json").write_text(
         json.dumps({**json.loads((w / "marian/config.json").read_text()), "dropout": float("nan")})),
     "dropout must be a probability in [0, 1), got nan"),
    # duplicate keys in every Hugging Face JSON ctprune reads
    ("hf-generation-config-duplicate", ["inspect", "marian"],
     duplicate_key("marian/generation_config.json", "eos_token_id"), "key 'eos_token_id' appears twice"),
    ("hf-tokenizer-config-duplicate", ["evaluate", "marian", "--corpus", "synthetic", "--split", "val"],
     duplicate_key("marian/tokenizer_config.json", "eos_token"), "key 'eos_token' appears twice"),
    ("hf-vocab-duplicate", ["evaluate", "marian", "--corpus", "synthetic", "--split", "val"],
     duplicate_key("marian/vocab.json", "</s>"), "key '</s>' appears twice"),
    ("hf-layers-duplicate", ["inspect", "pruned"], duplicate_key("pruned/ctprune_layers.json", "ffn"),
     "key 'ffn' appears twice"),
    ("hf-hparams-duplicate", ["inspect", "pruned"], duplicate_key("pruned/hparams.json", "stage"),
     "key 'stage' appears twice"),
    # a Marian tokenizer file missing (transformers would fail on a None path)
    ("hf-marian-target-spm-missing", ["evaluate", "marian", "--corpus", "synthetic", "--split", "val"],
     lambda w: (w / "marian/target.spm").unlink(), "a MarianMT tokenizer needs source.spm, target.spm, vocab.json; "
                                                   "target.spm missing"),
]


@pytest.mark.xdist_group("faults-hf")
@pytest.mark.parametrize("args, corrupt, fragment", [c[1:] for c in HF_CASES], ids=[c[0] for c in HF_CASES])
def test_hf_fault_is_refused_in_one_short_line(hf_workspace: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                               args: list[str], corrupt: Callable[[Path], None],
                                               fragment: str) -> None:
    test_open_fault_is_refused_in_one_short_line(hf_workspace, tmp_path, capsys, monkeypatch, args, corrupt, fragment)


@pytest.mark.xdist_group("faults-hf")
@pytest.mark.parametrize("case", ["hf-config-no-model-type", "hf-sparse-linears-of-objects"])
def test_hf_fault_through_a_subprocess_has_no_traceback(hf_workspace: Path, tmp_path: Path, case: str) -> None:
    refused_through_a_subprocess(hf_workspace, tmp_path, next(c for c in HF_CASES if c[0] == case))


@pytest.mark.xdist_group("faults-hf")
def test_a_pruned_hf_folder_reloads_exactly_without_building_the_full_model(hf_workspace: Path) -> None:
    """The pruned folder is built on the meta device and cut before it gets memory: the same logits
    as the model composed in memory, tied embeddings still tied."""
    from ctprune.arch import arch_of
    from ctprune.model.checkpoint import load_model_folder
    from ctprune.stages.compose import compose_configuration

    w = hf_workspace
    composed, _, _ = compose_configuration(w / "marian", w / "bank", w / "conf.json", 0)
    loaded, _, _ = load_model_folder(w / "pruned")
    src = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    tgt = torch.tensor([[0, 5, 6], [0, 7, 8]])
    arch = arch_of(loaded)
    with torch.no_grad():
        assert torch.equal(arch.logits(composed, src, tgt), arch.logits(loaded, src, tgt))
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def _disk_full(kind: str) -> BaseException:
    """What a safetensors write raises when the disk fills: an OSError (ENOSPC) from Python's own
    writes, a SafetensorError wrapping it from the Rust writer."""
    import errno

    from safetensors import SafetensorError

    if kind == "oserror":
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                           'message: "No space left on device" })')


def _fill_disk(monkeypatch: pytest.MonkeyPatch, module: str, name: str, kind: str) -> None:
    import importlib

    def full(*args: object, **kwargs: object) -> None:
        path = next((a for a in (*args, *kwargs.values()) if isinstance(a, str) and a.endswith(".tmp")), None)
        if path is not None:
            Path(path).write_bytes(b"\x00" * 100)  # half a file is on disk when the error comes
        raise _disk_full(kind)

    monkeypatch.setattr(importlib.import_module(module), name, full)


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_in_compose_leaves_no_half_written_folder(workspace: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch, kind: str,
                                                            existing: bool) -> None:
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    monkeypatch.chdir(w)
    if existing:  # an earlier compose output stays whole when its replacement fails
        assert main(COMPOSE + ["out"]) == 0
    before = snapshot(tmp_path)
    _fill_disk(monkeypatch, "ctprune.model.weights", "save_file", kind)
    capsys.readouterr()
    assert main(COMPOSE + ["out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "model.safetensors" in err[0], err
    assert snapshot(tmp_path) == before  # no out/, no hidden temporary folder or file beside it


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
@pytest.mark.parametrize("command", [PRUNE + ["b2"], ["prune", "origin", "--grid", "0.5", "-o", "b2"]])
def test_disk_full_in_prune_leaves_no_bank(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch, kind: str, command: list[str]) -> None:
    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    monkeypatch.chdir(w)
    before = snapshot(tmp_path)
    _fill_disk(monkeypatch, "ctprune.pruning.bank", "save_file", kind)
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert snapshot(tmp_path) == before


def test_disk_full_through_a_subprocess_has_no_traceback(workspace: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from .conftest import REPO

    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    before = snapshot(tmp_path)
    script = ("import sys, ctprune.model.weights as c\n"
              "from tests.test_faults import _disk_full\n"
              "def full(*a, **k): raise _disk_full('safetensors')\n"
              "c.save_file = full\n"
              "from ctprune.cli import main\n"
              f"sys.exit(main({COMPOSE + ['out']!r}))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=w, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "No space left on device" in lines[0], r.stderr[-2000:]
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# A second probe (issue 25, fresh): hostile or careless inputs on the tiny model, each refused in one line.


def origin_tensors(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    """Rewrite the origin's weights (and drop its manifest, as a hand-made folder)."""
    def corrupt(w: Path) -> None:
        f = w / "origin/model.safetensors"
        save_file(fn(load_file(str(f))), str(f))
        (w / "origin/manifest.json").unlink()
    return corrupt


def other_tokenizer(w: Path) -> None:
    """A tokenizer of more pieces than the model has embeddings (its ids would index past them)."""
    from ctprune.data.synthetic import synthetic_corpus
    from ctprune.data.tokenizer import Tokenizer

    pairs = synthetic_corpus("train")
    Tokenizer.train([p[0] for p in pairs] + [p[1] for p in pairs], 300).save(w / "origin")
    (w / "origin/manifest.json").unlink()


def fifo(rel: str) -> Callable[[Path], None]:
    def corrupt(w: Path) -> None:
        (w / rel).unlink(missing_ok=True)
        os.mkfifo(w / rel)
    return corrupt


EVAL_DATA = ["evaluate", "origin", "--corpus", "folder:de-en", "--data-dir", "data", "--split", "val", "-o", "ev"]

PROBE_CASES: list[tuple[str, list[str], Callable[[Path], None], str]] = [
    ("weights-int64", ["inspect", "origin"], origin_tensors(lambda t: {k: v.long() for k, v in t.items()}),
     "tensors that are not floating point"),
    ("weights-nan", ["inspect", "origin"], origin_tensors(lambda t: {k: v * float("nan") for k, v in t.items()}),
     "hold NaN or infinite values"),
    ("tokenizer-empty", ["inspect", "origin"], write("origin/tokenizer.model", b"", drop_manifest=True),
     "is empty, not a sentencepiece model"),
    ("tokenizer-of-another-model", ["inspect", "origin"], other_tokenizer,
     "pieces, but the model's vocab_size is"),
    ("config-heads-bool", ["inspect", "origin"], edit_json("origin/config.json", _set("n_heads", True), True),
     "n_heads must be a positive integer, got True"),
    ("conf-fifo", PLAN + ["p2.json"], fifo("conf.json"), "is not a regular file"),
    ("corpus-fifo", EVAL_DATA, fifo("data/val.de"), "is not a regular file"),
    ("corpus-blank-only", EVAL_DATA, lambda w: [(w / f"data/val.{s}").write_text("\n\n") for s in ("de", "en")],
     "holds only blank lines"),
    ("configs-n-1e9", ["configs", "origin", "-n", "1000000000", "-o", "c.json"], nothing,
     "-n must be in [1, 10000]"),
    ("variant-int64-nochecksum", COMPOSE + ["out"], variant_tensors(lambda t: {k: v.long() for k, v in t.items()}),
     "integer values"),
    ("variant-nan-nochecksum", COMPOSE + ["out"],
     variant_tensors(lambda t: {k: v * float("nan") for k, v in t.items()}), "NaN or infinite values"),
    ("variant-fifo-nochecksum", COMPOSE + ["out"],
     lambda w: (edit_entry(lambda e: None, drop_checksum=True)(w), fifo("bank/" + _variant(w)[1]["file"])(w)),
     "is not a plain file"),
    ("tune-bank-holds-fifo", TUNE + ["tuned"], fifo("bank/extra"), "bank bank holds extra, which is not a plain file"),
]


@pytest.mark.parametrize("args, corrupt, fragment", [c[1:] for c in PROBE_CASES], ids=[c[0] for c in PROBE_CASES])
def test_probe_fault_is_refused_in_one_line(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, args: list[str],
                                            corrupt: Callable[[Path], None], fragment: str) -> None:
    test_open_fault_is_refused_in_one_short_line(workspace, tmp_path, capsys, monkeypatch, args, corrupt, fragment)


@pytest.mark.parametrize("case", ["tokenizer-empty", "tokenizer-of-another-model"])
def test_probe_fault_through_a_subprocess_has_no_traceback(workspace: Path, tmp_path: Path, case: str) -> None:
    refused_through_a_subprocess(workspace, tmp_path, next(c for c in PROBE_CASES if c[0] == case))


def test_a_smaller_tokenizer_translates_without_a_traceback(workspace: Path, tmp_path: Path) -> None:
    """A hand-made folder whose tokenizer has fewer pieces than the model's outputs: ids past the
    tokenizer read as unknown pieces (sentencepiece raised IndexError on them)."""
    from ctprune.data.tokenizer import Tokenizer

    w = tmp_path / "w"
    shutil.copytree(workspace, w, symlinks=True)
    Tokenizer.train(["a b c d e f g h"] * 50 + ["x y z w v u"] * 50, 30).save(w / "origin")
    (w / "origin/manifest.json").unlink()
    r = run_cli("translate", "origin", cwd=w, stdin="der hund\nein mann\n")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr[-2000:]


def test_negative_zero_keep_ratio_is_zero(model_folder: Path) -> None:
    """-0.0 is keep 0: one variant key (MODULE@0) and file, not a second one named @-0."""
    from ctprune.pruning.configs import check_ratio, variant_key

    r = check_ratio(-0.0, "test")
    assert variant_key("encoder.layers.0.self_attn", r) == "encoder.layers.0.self_attn@0"


def test_a_byte_order_mark_is_not_part_of_the_first_sentence(tmp_path: Path) -> None:
    """A corpus saved by an editor that writes a BOM (and CRLF line ends) reads as the same sentences."""
    from ctprune.data.corpus import read_lines

    (tmp_path / "val.de").write_bytes("\ufeffein hund\r\nzwei katzen\r\n".encode())
    assert read_lines(tmp_path / "val.de") == ["ein hund", "zwei katzen"]
