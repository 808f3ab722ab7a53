"""SentencePiece BPE tokenizer with LLaMA's settings (Touvron et al. 2023, Section 2.1).

"We tokenize the data with the byte-pair encoding (BPE) algorithm, using the implementation from
SentencePiece. Notably, we split all numbers into individual digits, and fallback to bytes to
decompose unknown UTF-8 characters."

The trainer options below reproduce the trainer/normalizer spec stored in LLaMA's released
tokenizer.model: BPE, split_digits, byte_fallback, whitespace-only pieces allowed, character coverage
0.99995, ids unk=0 / bos=1 / eos=2 and no pad, and the "identity" normalizer (no NFKC) with a dummy
prefix and without collapsing whitespace, so decode(encode(text)) == text for every string.
"""
from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from .atomic import write_bytes_atomic

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1

# Everything that makes the model LLaMA's except vocabulary size, sample size, threads and seed.
LLAMA_TRAINER_OPTIONS = dict(
    model_type="bpe",
    character_coverage=0.99995,
    split_digits=True,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    treat_whitespace_as_suffix=False,
    max_sentencepiece_length=16,
    max_sentence_length=4192,
    shuffle_input_sentence=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
    unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
)


def _split_inputs(inputs: Iterable[str] | Sequence[os.PathLike]) -> tuple[list[str] | None, Iterator[str] | None]:
    """Return (files, None) for a sequence of paths or (None, line iterator) for an iterable of texts."""
    items = iter(inputs)
    first = next(items, None)
    if first is None:
        raise ValueError("train_sentencepiece: no input (empty iterable)")
    if isinstance(first, os.PathLike):
        files = [Path(first)] + [Path(p) for p in items]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer training input not found: {path}")
        return [str(p) for p in files], None

    def lines() -> Iterator[str]:
        # SentencePiece trains on sentences (lines) and skips lines over max_sentence_length bytes,
        # so each text is split at newlines.
        for text in itertools.chain([first], items):
            if not isinstance(text, str):
                raise ValueError(f"train_sentencepiece: inputs must be all str or all paths, got {type(text).__name__}")
            for line in text.splitlines():
                if line:
                    yield line
    return None, lines()


def train_sentencepiece(inputs: Iterable[str] | list[Path], model_prefix: str | Path, vocab_size: int, *,
                        input_sentence_size: int = 1_000_000, num_threads: int = 2, seed: int = 0,
                        character_coverage: float = 0.99995) -> Path:
    """Train a LLaMA-style BPE model; returns the path of `<model_prefix>.model` (and writes `.vocab`).

    `inputs` is either a list of text files (Path objects, one sentence per line) or an iterable of
    texts (documents; split into lines). At most `input_sentence_size` sentences, sampled with `seed`,
    are used. Both files are written under a temporary name and renamed when complete.
    """
    if vocab_size <= 3 + 256:
        raise ValueError(f"tokenizer.vocab_size={vocab_size} must exceed 259 (3 specials + 256 byte pieces)")
    files, sentences = _split_inputs(inputs)
    options = dict(LLAMA_TRAINER_OPTIONS, vocab_size=vocab_size, character_coverage=character_coverage,
                   input_sentence_size=input_sentence_size, num_threads=num_threads, minloglevel=2)
    spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
    if files is not None:
        spm.SentencePieceTrainer.train(input=files, model_writer=proto, **options)
    else:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=proto, **options)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(f"{prefix}.vocab"), vocab.encode("utf-8"))
    write_bytes_atomic(Path(f"{prefix}.model"), proto.getvalue())  # last: its presence means the pair is complete
    return Path(f"{prefix}.model")


class Tokenizer:
    """A trained SentencePiece model: text <-> token ids."""

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.model_path}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(self.model_path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{self.model_path}: not a SentencePiece model ({exc})") from None
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()
        self.pad_id: int = self._sp.pad_id()
        self._no_prefix: spm.SentencePieceProcessor | None = None  # for encode_piece, made when first needed

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = -1) -> list[list[int]]:
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def encode_pieces(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)

    def encode_piece(self, piece: str) -> list[int]:
        """The ids this tokenizer splits a piece of another vocabulary into: the piece's text ("▁" a space)
        encoded without the dummy prefix, so that the ids cover exactly that text ("▁中国" -> "▁", bytes...)."""
        return self.encode_continuation(piece.replace("\u2581", " "))

    def encode_continuation(self, text: str) -> list[int]:
        """The ids of text that continues a sequence: without the dummy prefix (the space `encode` puts before
        a text's first word), so that the ids decode to exactly `text` after what precedes them."""
        if self._no_prefix is None:
            from sentencepiece import sentencepiece_model_pb2
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._no_prefix.encode(text)
