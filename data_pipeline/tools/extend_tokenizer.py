"""extend a SentencePiece BPE tokenizer with a new language's pieces (Chinese-LLaMA's vocabulary extension)

Cui et al. 2023, "Efficient and Effective Text Encoding for Chinese LLaMA and Alpaca", Sec. 2: LLaMA's
tokenizer holds few Chinese characters, so most Chinese text falls back to UTF-8 bytes, about three
tokens per character. They trained a 20,000-piece SentencePiece model on Chinese text and appended the
pieces LLaMA's 32,000 lacked (49,953 in all), then resized the embeddings. Appending keeps every old id,
piece, score and type, so the old embedding rows keep their meaning; this command is that first step.

Where the new pieces come from:
- ``BASE CORPUS --add N``: a BPE model with N learned pieces (plus the 3 specials and 256 byte pieces;
  ``--train-vocab-size`` for a larger one) is trained on CORPUS (text files, one document a line, JSONL
  or folders of them) with LLaMA's settings (``llama_pt.tokenizer.train_sentencepiece``);
- ``BASE --merge OTHER [--add N]``: an existing BPE model (Chinese-LLaMA's way; its pieces are taken as
  they are, so OTHER should share BASE's identity normalizer).
Its normal pieces that BASE lacks are appended in the order of their score in that model (BPE merge
order, then single characters by frequency), at most N. When BASE splits digits, pieces holding a digit
and anything else are left out, so numbers stay split into digits. ``--new-characters-only`` also leaves
out the pieces spelled wholly in characters BASE has pieces for (the new corpus's stray English words,
say): text written in BASE's characters then encodes exactly as before. BASE's trainer and normalizer
specs are kept as they are: byte fallback, digit splitting and the identity normalizer keep working.

Scores (``--scores``), which decide the order of BPE merges when encoding:
- ``below-base`` (default): the k-th appended piece scores ``lowest BASE score - 1 - k``. Every merge of
  BASE outranks every new one, so encoding runs BASE's merges to their end first, exactly as BASE does,
  and the new pieces only join what BASE left apart; old-language text changes only where a new piece
  spells a run of BASE's tokens. Scores fall with the id, so Hugging Face's converted tokenizer ranks the
  merges the same way.
- ``zero``: every appended piece scores 0 (Chinese-LLaMA's merge_tokenizers.py), above all of BASE's
  merges, so new merges pre-empt old ones and split words BASE kept whole; the tied scores also make
  transformers' converted tokenizer encode otherwise than SentencePiece. Kept to measure what it costs
  (benchmarks/RESULTS.md, "Vocabulary extension").

The command prints the new vocabulary size and, given held-out text of the old and the new language
(``--heldout-old``, ``--heldout-new``; keep it out of CORPUS), tokens per character before and after and
the share of documents whose token ids change.

    llama-data extend-tokenizer base.model zh_train.jsonl --add 20000 --out zh.model \\
        --heldout-old en_valid.jsonl --heldout-new zh_valid.jsonl
    llama-data extend-tokenizer base.model --merge chinese_sp.model --out zh.model
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from llama_pt.atomic import write_bytes_atomic
from llama_pt.tokenizer import Tokenizer, train_sentencepiece

from .text_inputs import input_files, iter_documents_text

FIXED_PIECES = 3 + 256  # <unk>, <s>, </s> and the 256 byte pieces of every model trained with LLaMA's settings
#: --scores: the score of the appended piece of rank k (0 = the new model's best), given BASE's lowest score.
SCORE_RULES = {"below-base": lambda lowest, k: lowest - 1 - k, "zero": lambda lowest, k: 0.0}
_NORMAL = sp_pb2.ModelProto.SentencePiece.NORMAL


@dataclass(frozen=True)
class HeldoutRow:
    """Held-out documents of one language encoded with BASE and with the extended model."""
    name: str
    docs: int
    chars: int
    base_tokens: int
    new_tokens: int
    changed_docs: int  # documents whose token ids differ

    @property
    def base_tokens_per_char(self) -> float:
        return self.base_tokens / self.chars

    @property
    def new_tokens_per_char(self) -> float:
        return self.new_tokens / self.chars


@dataclass(frozen=True)
class Extension:
    """What ``extend_tokenizer`` wrote and measured."""
    path: Path
    base_size: int
    new_size: int
    candidates: int  # pieces of the new model that BASE lacked and the filters kept (before the --add cap)
    scores: str
    new_characters_only: bool
    rows: tuple[HeldoutRow, ...]


def read_bpe_model(path: str | Path, what: str) -> sp_pb2.ModelProto:
    """The proto of a SentencePiece BPE model file; FileNotFoundError or ValueError naming ``what``."""
    tok = Tokenizer(path)  # checks that the file exists and that SentencePiece loads it
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tok.model_path.read_bytes())
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        kind = sp_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise ValueError(f"{what} {path} is a {kind} model, not BPE: extend-tokenizer appends BPE pieces, "
                         "reached by merges in the order of their scores")
    return proto


def pieces_to_add(base: sp_pb2.ModelProto, other: sp_pb2.ModelProto, new_characters_only: bool = False) -> list[str]:
    """``other``'s normal pieces that ``base`` lacks, highest score first (equal scores: lower id first).

    When ``base`` splits digits, pieces with a digit and another character are left out. With
    ``new_characters_only``, so are pieces whose every character is a single-character piece of ``base``:
    no appended piece can then be spelled by text written in those characters, which keeps its encoding.
    """
    have = {p.piece for p in base.pieces}
    base_chars = {p.piece for p in base.pieces if p.type == _NORMAL and len(p.piece) == 1}

    def wanted(piece: str) -> bool:
        if base.trainer_spec.split_digits and len(piece) > 1 and any(c.isdigit() for c in piece):
            return False
        return not new_characters_only or any(c not in base_chars for c in piece)

    ranked = sorted((-p.score, i, p.piece) for i, p in enumerate(other.pieces)
                    if p.type == _NORMAL and p.piece not in have and wanted(p.piece))
    return [piece for _, _, piece in ranked]


def extended_proto(base: sp_pb2.ModelProto, pieces: Sequence[str], scores: str = "below-base") -> sp_pb2.ModelProto:
    """``base`` with ``pieces`` appended as normal pieces, scored by the rule ``scores`` (``SCORE_RULES``)."""
    score = SCORE_RULES[scores]
    out = sp_pb2.ModelProto()
    out.CopyFrom(base)
    lowest = min(p.score for p in base.pieces)
    for rank, piece in enumerate(pieces):
        out.pieces.add(piece=piece, score=score(lowest, rank), type=_NORMAL)
    return out


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_FEW_FOR_CHARS = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_new_language_model(corpus: Sequence[Path], vocab_size: int, *, character_coverage: float,
                             input_sentence_size: int, threads: int, seed: int) -> sp_pb2.ModelProto:
    """A BPE model of ``vocab_size`` pieces trained on the documents of ``corpus`` with LLaMA's settings,
    in a scratch folder; SentencePiece's refusals become one-line ValueErrors."""
    texts = iter_documents_text(corpus)
    first = next(texts, None)
    if first is None:
        raise ValueError(f"no text in the corpus ({', '.join(map(str, corpus))})")
    with tempfile.TemporaryDirectory(prefix="extend-tokenizer-") as scratch:
        try:
            path = train_sentencepiece(itertools.chain([first], texts), Path(scratch) / "new", vocab_size,
                                       input_sentence_size=input_sentence_size, num_threads=threads, seed=seed,
                                       character_coverage=character_coverage)
        except RuntimeError as exc:
            too_high, too_few = _TOO_HIGH.search(str(exc)), _TOO_FEW_FOR_CHARS.search(str(exc))
            if too_high:
                most = int(too_high.group(2))
                raise ValueError(f"the corpus is too small to learn {vocab_size - FIXED_PIECES} pieces: "
                                 f"SentencePiece learns at most {most - FIXED_PIECES} from it (lower --add)") from None
            if too_few:
                raise ValueError(f"the corpus needs {int(too_few.group(2)) - FIXED_PIECES} single-character pieces "
                                 f"at --character-coverage {character_coverage:g}, more than the "
                                 f"{vocab_size - FIXED_PIECES} pieces to learn: raise --add (or "
                                 "--train-vocab-size) or lower --character-coverage") from None
            raise ValueError(f"SentencePiece training failed: {str(exc).splitlines()[0]}") from None
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
    return proto


def measure(name: str, docs: Sequence[str], base: spm.SentencePieceProcessor,
            new: spm.SentencePieceProcessor) -> HeldoutRow:
    """Token counts and changed documents of ``docs`` encoded with ``base`` and with ``new``."""
    before, after = base.encode(list(docs)), new.encode(list(docs))
    return HeldoutRow(name=name, docs=len(docs), chars=sum(map(len, docs)),
                      base_tokens=sum(map(len, before)), new_tokens=sum(map(len, after)),
                      changed_docs=sum(a != b for a, b in zip(before, after)))


def _heldout(paths: Sequence[str | Path], what: str) -> list[str]:
    docs = list(iter_documents_text(paths))
    if paths and not docs:
        raise ValueError(f"no documents in {what} ({', '.join(map(str, paths))})")
    return docs


def extend_tokenizer(base_path: str | Path, out_path: str | Path, *, corpus: Sequence[str | Path] = (),
                     merge: str | Path | None = None, add: int | None = None, train_vocab_size: int | None = None,
                     scores: str = "below-base", new_characters_only: bool = False,
                     character_coverage: float = 0.99995,
                     input_sentence_size: int = 1_000_000, threads: int = 2, seed: int = 0,
                     heldout_old: Sequence[str | Path] = (), heldout_new: Sequence[str | Path] = ()) -> Extension:
    """Append a new language's pieces to the BPE model ``base_path`` and write ``out_path`` (module docstring).

    Exactly one of ``corpus`` (train a model with ``add`` learned pieces, or ``train_vocab_size`` pieces in
    all) and ``merge`` (an existing BPE model) gives the pieces; at most ``add`` are appended, scored by the
    rule ``scores``, only those with a character BASE lacks if ``new_characters_only``. Every input is
    checked before anything is trained; ``out_path`` is written atomically, last, and never over BASE.
    Returns the sizes and, for the held-out text given, what the extension did to it.
    """
    base_path, out_path = Path(base_path), Path(out_path)
    if bool(corpus) == (merge is not None):
        raise ValueError("give either a CORPUS to train on or --merge OTHER.model, not both" if corpus
                         else "nothing to add: give a CORPUS to train on or --merge OTHER.model")
    if add is not None and add <= 0:
        raise ValueError(f"--add {add}: the number of pieces to add must be positive")
    if corpus and add is None:
        raise ValueError("--add N (the number of pieces to learn) is required with a CORPUS")
    if scores not in SCORE_RULES:
        raise ValueError(f"--scores {scores!r} is unknown (known: {', '.join(SCORE_RULES)})")
    base = read_bpe_model(base_path, "BASE")
    if out_path.resolve() == base_path.resolve():
        raise ValueError(f"--out {out_path} is BASE itself: write the extended model to a new file")
    old_docs, new_docs = _heldout(heldout_old, "--heldout-old"), _heldout(heldout_new, "--heldout-new")
    if merge is not None:
        other = read_bpe_model(merge, "--merge")
    else:
        vocab_size = add + FIXED_PIECES if train_vocab_size is None else train_vocab_size
        if vocab_size < add + FIXED_PIECES:
            raise ValueError(f"--train-vocab-size {vocab_size} leaves no room to learn --add {add} pieces "
                             f"(it must be at least {add + FIXED_PIECES})")
        other = train_new_language_model(list(input_files(corpus)), vocab_size, character_coverage=character_coverage,
                                         input_sentence_size=input_sentence_size, threads=threads, seed=seed)

    candidates = pieces_to_add(base, other, new_characters_only)
    extended = extended_proto(base, candidates[:add], scores)
    data = extended.SerializeToString()
    base_sp = spm.SentencePieceProcessor(model_proto=base.SerializeToString())
    new_sp = spm.SentencePieceProcessor(model_proto=data)
    rows = tuple(measure(name, docs, base_sp, new_sp)
                 for name, docs in (("old language", old_docs), ("new language", new_docs)) if docs)
    write_bytes_atomic(out_path, data)
    return Extension(path=out_path, base_size=len(base.pieces), new_size=len(extended.pieces),
                     candidates=len(candidates), scores=scores, new_characters_only=new_characters_only, rows=rows)


def report_lines(ext: Extension) -> list[str]:
    """What the command prints: sizes, then the held-out table (Markdown)."""
    kept = "pieces with a character BASE lacks" if ext.new_characters_only else "pieces"
    lines = [f"wrote {ext.path}: BASE's {ext.base_size} pieces + {ext.new_size - ext.base_size} appended "
             f"(of {ext.candidates} new {kept}; scores {ext.scores})", f"vocabulary size: {ext.new_size}"]
    if ext.rows:
        lines += ["", "| held-out text | docs | chars | tokens/char before | tokens/char after "
                  "| docs with changed ids |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r.name} | {r.docs} | {r.chars} | {r.base_tokens_per_char:.4f} | {r.new_tokens_per_char:.4f} "
                  f"| {r.changed_docs} ({100 * r.changed_docs / r.docs:.1f}%) |" for r in ext.rows]
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", metavar="BASE.model", help="the SentencePiece BPE model to extend")
    p.add_argument("corpus", nargs="*", metavar="CORPUS",
                   help="new-language text to train on: text files (one document a line), JSONL, folders")
    p.add_argument("--add", type=int, default=None, metavar="N",
                   help="pieces to learn from CORPUS (required with it); with --merge, the most to append")
    p.add_argument("--merge", default=None, metavar="OTHER.model", help="append this BPE model's pieces instead")
    p.add_argument("--out", required=True, metavar="NEW.model", help="the extended model to write")
    p.add_argument("--scores", choices=SCORE_RULES, default="below-base", help="scores of the appended pieces")
    p.add_argument("--new-characters-only", action="store_true",
                   help="append only pieces holding a character BASE has no piece for")
    p.add_argument("--train-vocab-size", type=int, default=None,
                   help="size of the model trained on CORPUS (default N + 259: N learned pieces)")
    p.add_argument("--character-coverage", type=float, default=0.99995, help="of CORPUS's characters (LLaMA's)")
    p.add_argument("--input-sentence-size", type=int, default=1_000_000, help="lines of CORPUS sampled to train")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-old", nargs="+", default=[], metavar="FILE", help="held-out old-language text")
    p.add_argument("--heldout-new", nargs="+", default=[], metavar="FILE", help="held-out new-language text")


def run(args: argparse.Namespace) -> int:
    try:
        ext = extend_tokenizer(args.base, args.out, corpus=args.corpus, merge=args.merge, add=args.add,
                               train_vocab_size=args.train_vocab_size, scores=args.scores,
                               new_characters_only=args.new_characters_only,
                               character_coverage=args.character_coverage,
                               input_sentence_size=args.input_sentence_size, threads=args.threads, seed=args.seed,
                               heldout_old=args.heldout_old, heldout_new=args.heldout_new)
    except (FileNotFoundError, ValueError) as exc:
        print(f"llama-data: error: {exc}", file=sys.stderr)
        return 2
    for line in report_lines(ext):
        print(line)
    return 0
