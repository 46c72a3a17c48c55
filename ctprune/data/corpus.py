"""Parallel German->English corpora: Multi30k Task 1 from disk (or downloaded), or synthetic."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ctprune.errors import CtpruneError
from ctprune.fileio import brief, write_bytes

CORPORA = ("multi30k", "synthetic")
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
LANGS = ("de", "en")
DATA_DIR_ENV = "CTPRUNE_DATA_DIR"
MULTI30K_URL = ("https://raw.githubusercontent.com/multi30k/dataset/"
                "a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw/{name}.gz")
# SHA-256 of the decompressed files (multi30k/dataset at the commit above).
MULTI30K_SHA256 = {
    "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "val.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "test_2016_flickr.de": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    "test_2016_flickr.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
}


@dataclass(frozen=True)
class Parallel:
    """Aligned source and target sentences of one split."""

    src: list[str]
    tgt: list[str]

    def __len__(self) -> int:
        return len(self.src)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ctprune" / "multi30k"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """--data-dir, else $CTPRUNE_DATA_DIR, else the download cache."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return default_cache_dir()


def read_lines(path: Path) -> list[str]:
    """Stripped lines of a UTF-8 file; a missing file or bad UTF-8 is a CtpruneError."""
    if path.exists() and not path.is_file():  # a FIFO would block the read for ever
        raise CtpruneError(f"data file {path} is not a regular file")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is no part of the first sentence
    except FileNotFoundError:
        raise CtpruneError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise CtpruneError(f"data file {path} is not valid UTF-8 (byte {e.start})") from None
    return split_lines(text)


def split_lines(text: str) -> list[str]:
    """Stripped lines split at "\n" only: ``str.splitlines`` also splits at U+2028, U+0085 and
    other separators, which would misalign the two sides of a parallel corpus."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def corpus_languages(corpus: str) -> tuple[str, str] | None:
    """(source, target) language of a corpus read from files: ``multi30k`` is de-en, a user's
    folder is named ``folder:SRC-TGT`` (SPLIT.SRC / SPLIT.TGT in the data folder); None for the
    synthetic corpus. Anything else is refused naming the choices."""
    if corpus == "multi30k":
        return LANGS[0], LANGS[1]
    if corpus == "synthetic":
        return None
    kind, _, pair = corpus.partition(":")
    src, _, tgt = pair.partition("-")
    if kind != "folder" or not src.isalnum() or not tgt.isalnum() or src == tgt:
        raise CtpruneError(f"unknown corpus {brief(corpus)}; choose one of {', '.join(CORPORA)} or folder:SRC-TGT "
                           "(a folder of SPLIT.SRC / SPLIT.TGT files, e.g. folder:fr-en)")
    return src, tgt


def folder_corpus(src_lang: str, tgt_lang: str) -> str:
    """The corpus name of a folder of SPLIT.``src_lang`` / SPLIT.``tgt_lang`` files."""
    corpus = f"folder:{src_lang}-{tgt_lang}"
    corpus_languages(corpus)  # checks the language codes
    return corpus


def load_split(corpus: str, split: str, data_dir: str | Path | None = None) -> Parallel:
    """One split of ``corpus``: 'multi30k' reads SPLIT.de / SPLIT.en from the data folder,
    'folder:SRC-TGT' reads SPLIT.SRC / SPLIT.TGT, 'synthetic' is generated."""
    langs = corpus_languages(corpus)
    if langs is None:
        from ctprune.data.synthetic import SPLITS, synthetic_corpus

        if split not in SPLITS:
            raise CtpruneError(f"unknown split {brief(split)} of the synthetic corpus; "
                               f"choose one of {', '.join(SPLITS)}")
        pairs = synthetic_corpus(split)
        return Parallel([p[0] for p in pairs], [p[1] for p in pairs])
    folder = resolve_data_dir(data_dir)
    if not folder.is_dir():
        if corpus != "multi30k":
            raise CtpruneError(f"data folder {folder} does not exist; pass --data-dir")
        raise CtpruneError(f"Multi30k folder {folder} does not exist; pass --data-dir, set "
                           f"{DATA_DIR_ENV}, or run `ctprune data download`")
    s, t = langs
    src_path, tgt_path = folder / f"{split}.{s}", folder / f"{split}.{t}"
    if not src_path.exists() and not tgt_path.exists():
        found = sorted({p.stem for p in folder.glob(f"*.{s}")})
        raise CtpruneError(f"no split {brief(split)} in {folder} (no {split}.{s} / {split}.{t}); "
                           f"splits found: {', '.join(found) or 'none'}")
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise CtpruneError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                           "the two sides of a split must align line by line")
    if not src:
        raise CtpruneError(f"{src_path} is empty")
    for path, side in ((src_path, src), (tgt_path, tgt)):
        if not any(side):
            raise CtpruneError(f"{path} holds only blank lines ({len(side)}); a split needs text on both sides")
    return Parallel(src, tgt)


def default_splits(corpus: str) -> tuple[str, str, str]:
    """(train, validation, test) split names of a corpus."""
    return ("train", "val", "test_2016_flickr") if corpus == "multi30k" else ("train", "val", "test")


def test_splits(corpus: str, data_dir: str | Path | None = None) -> list[str]:
    """Every test split of a corpus: each ``test*.SRC`` with its ``.TGT`` in the data folder
    (Multi30k's test_2016_flickr, or a folder's ``test``, first), for the synthetic corpus ``test``."""
    langs = corpus_languages(corpus)
    if langs is None:
        return ["test"]
    folder, (s, t) = resolve_data_dir(data_dir), langs
    found = sorted(p.name[:-len(s) - 1] for p in folder.glob(f"test*.{s}")
                   if (folder / f"{p.name[:-len(s) - 1]}.{t}").is_file())
    main = default_splits(corpus)[2]
    return [main] + [s for s in found if s != main]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(data_dir: str | Path | None) -> list[str]:
    """One line per expected Multi30k file: lines, checksum OK or not; raises if any is bad."""
    folder = resolve_data_dir(data_dir)
    report, bad = [f"Multi30k folder: {folder}"], []
    for split in MULTI30K_SPLITS:
        try:
            n = len(load_split("multi30k", split, folder))
        except CtpruneError as e:
            bad.append(str(e))
            report.append(f"  {split:<18} MISSING OR BAD: {e}")
            continue
        sums = ["ok" if sha256(folder / f"{split}.{lang}") == MULTI30K_SHA256[f"{split}.{lang}"]
                else "differs from the official file" for lang in LANGS]
        report.append(f"  {split:<18} {n:>6} pairs   sha256 de: {sums[0]}, en: {sums[1]}")
    if bad:
        raise CtpruneError("; ".join(bad))
    return report


def download(dest: Path | None = None) -> Path:
    """Fetch the official Multi30k Task 1 files, verify SHA-256, store them in ``dest``."""
    dest = dest or default_cache_dir()
    for name, digest in MULTI30K_SHA256.items():
        target = dest / name
        if target.exists() and sha256(target) == digest:
            continue
        url = MULTI30K_URL.format(name=name)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                data = gzip.decompress(r.read())
        except OSError as e:
            raise CtpruneError(f"could not download {url}: {e}") from None
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise CtpruneError(f"checksum mismatch for {url}: got {got}, expected {digest}")
        write_bytes(target, data)
    return dest
