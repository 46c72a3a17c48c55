"""One joint German+English sentencepiece model, trained on the training split."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from ctprune.fileio import write_bytes

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    """Wraps a sentencepiece processor; ids follow PAD/UNK/BOS/EOS = 0/1/2/3. One joint model
    serves both languages (``encode_target`` is ``encode``)."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, model_proto: bytes) -> None:
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def encode_target(self, texts: list[str]) -> list[list[int]]:
        return self.encode(texts)

    def decode(self, ids: list[list[int]]) -> list[str]:
        n = self.vocab_size  # a model with more outputs than pieces: its extra ids read as unknown
        return self.sp.decode([[i if 0 <= i < n else UNK_ID for i in seq] for seq in ids])

    def save(self, folder: Path) -> None:
        write_bytes(folder / TOKENIZER_FILE, self.proto)

    @classmethod
    def load(cls, folder: Path) -> Tokenizer:
        from ctprune.errors import CtpruneError, first_line

        path = Path(folder) / TOKENIZER_FILE
        try:
            proto = path.read_bytes()
            if not proto:  # sentencepiece accepts it as a model of no pieces (and fails on first use)
                raise CtpruneError(f"tokenizer {path} is empty, not a sentencepiece model")
            tok = cls(proto)
        except CtpruneError:
            raise
        except OSError as e:
            raise CtpruneError(f"tokenizer {path} cannot be read: {e.strerror}") from None
        except Exception as e:  # sentencepiece raises RuntimeError (or worse) on a corrupt model
            raise CtpruneError(f"tokenizer {path} is not a sentencepiece model: {first_line(e)}") from None
        # The ids ctprune relies on must be those `ctprune train` gives.
        specials = (tok.sp.pad_id(), tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id())
        if tok.vocab_size < 5 or specials != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise CtpruneError(f"tokenizer {path} is not a sentencepiece model of ctprune's ({tok.vocab_size} pieces; "
                               f"pad/unk/bos/eos ids {specials}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)})")
        return tok

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a unigram model on ``sentences`` (both languages together).

        ``hard_vocab_limit=False`` lets a small corpus get fewer pieces than asked for.
        """
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            num_threads=1, minloglevel=2)
        return cls(buf.getvalue())
