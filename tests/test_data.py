"""Multi30k loading errors, the tokenizer, and token-budget batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctprune.data import corpus as corpora
from ctprune.data.batching import TokenizedSplit
from ctprune.data.corpus import Parallel, check, folder_corpus, load_split
from ctprune.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from ctprune.errors import CtpruneError


def _write(folder: Path, split: str, de: bytes, en: bytes) -> None:
    (folder / f"{split}.de").write_bytes(de)
    (folder / f"{split}.en").write_bytes(en)


def test_a_folder_of_other_languages_is_a_corpus(tmp_path: Path) -> None:
    for split in ("train", "test", "test_2"):
        (tmp_path / f"{split}.fr").write_text("Un chien .\nDeux chats .\n", encoding="utf-8")
        (tmp_path / f"{split}.en").write_text("A dog .\nTwo cats .\n", encoding="utf-8")
    corpus = folder_corpus("fr", "en")
    assert load_split(corpus, "train", tmp_path).src == ["Un chien .", "Deux chats ."]
    assert corpora.test_splits(corpus, tmp_path) == ["test", "test_2"]
    with pytest.raises(CtpruneError, match=r"no split 'val' in .* \(no val.fr / val.en\); splits found: test, test_2"):
        load_split(corpus, "val", tmp_path)
    for bad in ("folder:fr", "folder:en-en", "folder:fr-en/../x", "europarl"):
        with pytest.raises(CtpruneError, match="choose one of multi30k, synthetic or folder:SRC-TGT"):
            load_split(bad, "train", tmp_path)


def test_loads_and_strips_lines(tmp_path: Path) -> None:
    _write(tmp_path, "train", b"Ein Hund . \nZwei Katzen .\n", b"A dog .\nTwo cats .\n")
    data = load_split("multi30k", "train", tmp_path)
    assert data.src == ["Ein Hund .", "Zwei Katzen ."] and data.tgt == ["A dog .", "Two cats ."]


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "val", b"Hallo\n", b"Hello\n")
    monkeypatch.setenv("CTPRUNE_DATA_DIR", str(tmp_path))
    assert len(load_split("multi30k", "val")) == 1


@pytest.mark.parametrize("de, en, message", [
    (b"a\nb\n", b"a\n", "has 2 lines but .*has 1"),
    (b"a\xff\n", b"a\n", r"train.de is not valid UTF-8"),
])
def test_bad_files_are_named(tmp_path: Path, de: bytes, en: bytes, message: str) -> None:
    _write(tmp_path, "train", de, en)
    with pytest.raises(CtpruneError, match=message):
        load_split("multi30k", "train", tmp_path)


def test_missing_side_and_missing_split(tmp_path: Path) -> None:
    (tmp_path / "train.de").write_text("a\n")
    with pytest.raises(CtpruneError, match="train.en"):
        load_split("multi30k", "train", tmp_path)
    with pytest.raises(CtpruneError, match="no split 'test' .*splits found: train"):
        load_split("multi30k", "test", tmp_path)
    with pytest.raises(CtpruneError, match="does not exist"):
        load_split("multi30k", "train", tmp_path / "nowhere")


def test_unknown_corpus_and_synthetic_split() -> None:
    with pytest.raises(CtpruneError, match="unknown corpus 'wmt'"):
        load_split("wmt", "train")
    with pytest.raises(CtpruneError, match="choose one of train, val, test"):
        load_split("synthetic", "test_2016_flickr")


def test_check_reports_bad_checksums(tmp_path: Path) -> None:
    for split in ("train", "val", "test_2016_flickr"):
        _write(tmp_path, split, b"x\n", b"y\n")
    lines = check(tmp_path)
    assert any("train" in line and "differs from the official file" in line for line in lines)
    (tmp_path / "val.en").unlink()
    with pytest.raises(CtpruneError, match="val.en"):
        check(tmp_path)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    data = load_split("synthetic", "train")
    return Tokenizer.train(data.src + data.tgt, 300)


def test_tokenizer_round_trip_and_reload(tok: Tokenizer, tmp_path: Path) -> None:
    data = load_split("synthetic", "val")
    sentences = data.src[:20] + data.tgt[:20]
    assert tok.decode(tok.encode(sentences)) == sentences
    assert tok.sp.pad_id() == PAD_ID and tok.sp.bos_id() == BOS_ID and tok.sp.eos_id() == EOS_ID
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(sentences) == tok.encode(sentences)


def test_token_budget_batches_cover_every_example_once(tok: Tokenizer) -> None:
    split = TokenizedSplit(load_split("synthetic", "train"), tok, max_len=64)
    batches = split.batches(max_tokens=600, shuffle_seed=3)
    seen = sorted(int(i) for b in batches for i in b.index)
    assert seen == list(range(len(split)))
    for b in batches:
        assert b.src.numel() + b.tgt_in.numel() <= 600 or b.src.shape[0] == 1
        assert (b.tgt_in[:, 0] == BOS_ID).all()
        assert ((b.tgt_out == EOS_ID).sum(1) == 1).all()
    # Same seed, same order: data order is reproducible on resume.
    again = split.batches(max_tokens=600, shuffle_seed=3)
    assert [b.index.tolist() for b in again] == [b.index.tolist() for b in batches]
    padded = sum(b.tgt_out.numel() for b in batches)
    assert split.n_tgt_tokens / padded > 0.8  # length-sorted buckets: little padding


def test_parallel_len() -> None:
    assert len(Parallel(["a"], ["b"])) == 1
