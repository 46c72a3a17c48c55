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
        return self.sp.decode(ids)

    def save(self, folder: Path) -> None:
        write_bytes(folder / TOKENIZER_FILE, self.proto)

    @classmethod
    def load(cls, folder: Path) -> Tokenizer:
        from ctprune.errors import CtpruneError, first_line

        path = Path(folder) / TOKENIZER_FILE
        try:
            return cls(path.read_bytes())
        except OSError as e:
            raise CtpruneError(f"tokenizer {path} cannot be read: {e.strerror}") from None
        except Exception as e:  # sentencepiece raises RuntimeError (or worse) on a corrupt model
            raise CtpruneError(f"tokenizer {path} is not a sentencepiece model: {first_line(e)}") from None

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
