"""train the SentencePiece + KenLM 5-gram reference model of a language (CCNet perplexity step)

Writes <out>/<lang>.sp.model and <out>/<lang>.arpa.bin from reference text (text files with one
paragraph per line, or JSONL documents; .gz/.zst allowed). Needs KenLM's lmplz and build_binary:
`make kenlm` builds them. Then run `llama-data lm-cutoffs` on a sample of the language's documents.

    llama-data train-lm de dewiki_openings.txt.gz --out models/lm --memory 8G
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from llama_pt.atomic import atomic_path

from ..ccnet_normalization import normalize_for_lm
from ..step import batched
from ..steps.perplexity import model_files
from .text_inputs import iter_documents_text

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_KENLM_BIN = REPO_ROOT / "third_party" / "build" / "kenlm" / "bin"
CCNET_VOCAB_SIZE = 65536
CCNET_CHARACTER_COVERAGE = 0.9995
ENCODE_BATCH_LINES = 4096


def kenlm_binary(name: str) -> Path:
    """Path of the KenLM tool ``name`` (lmplz, build_binary): ``$KENLM_BIN``, the project's build, PATH."""
    candidates = []
    if os.environ.get("KENLM_BIN"):
        candidates.append(Path(os.environ["KENLM_BIN"]) / name)
    candidates.append(LOCAL_KENLM_BIN / name)
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"KenLM's {name} not found (looked in {', '.join(map(str, candidates))}); "
                            "build it with `make kenlm` (bash scripts/build_kenlm.sh) or set KENLM_BIN")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


def _normalized_lines(text_files: Iterable[str | Path]) -> Iterable[str]:
    for doc in iter_documents_text(text_files):
        for line in doc.split("\n"):
            line = normalize_for_lm(line)
            if line:
                yield line


def _write_normalized_text(text_files: list[Path], path: Path, max_lines: int | None) -> int:
    """The normalised, non-blank lines of ``text_files`` (the first ``max_lines``) into ``path``; their count."""
    n_lines = 0
    with open(path, "w", encoding="utf-8") as f:
        for line in itertools.islice(_normalized_lines(text_files), max_lines):
            f.write(line + "\n")
            n_lines += 1
    return n_lines


def _write_pieces(sp, text: Path, pieces: Path) -> None:
    """Each line of ``text`` as its SentencePiece pieces separated by spaces, into ``pieces``."""
    with open(text, encoding="utf-8") as src, open(pieces, "w", encoding="utf-8") as dst:
        for batch in batched((line.rstrip("\n") for line in src), ENCODE_BATCH_LINES):
            dst.writelines(" ".join(p) + "\n" for p in sp.encode(batch, out_type=str))


def _train_unigram_sentencepiece(text: Path, prefix: Path, vocab_size: int, sample_lines: int, threads: int,
                                 seed: int):
    """CCNet's SentencePiece model (unigram, soft vocabulary limit) of ``text`` -> ``<prefix>.model``
    and ``<prefix>.vocab``; returns it loaded."""
    import sentencepiece

    sentencepiece.set_random_generator_seed(seed)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=CCNET_CHARACTER_COVERAGE,
        input_sentence_size=sample_lines, shuffle_input_sentence=True, num_threads=threads, minloglevel=2)
    return sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")


def _move_into_place(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        os.replace(src, tmp)


def train_reference_lm(lang: str, text_files: Iterable[str | Path], out_dir: str | Path, *,
                       vocab_size: int = CCNET_VOCAB_SIZE, order: int = 5, memory: str = "1G",
                       max_lines: int | None = None, spm_sample_lines: int = 1_000_000,
                       threads: int = 2, seed: int = 0, keep_arpa: bool = False) -> tuple[Path, Path]:
    """Train ``<out_dir>/<lang>.sp.model`` and ``<out_dir>/<lang>.arpa.bin`` from reference text.

    CCNet's recipe (Sec. 3.3 and its Makefile):
    1. normalise every line of the reference text (``ccnet_normalization.normalize_for_lm``);
    2. train a **unigram** SentencePiece model, 65,536 pieces as a soft limit, character coverage 0.9995
       (CCNet's published ``<lang>.sp.model`` files are unigram models; unigram segmentation is also the
       one whose pieces follow the text's own statistics — the LLaMA BPE tokenizer is a different tool
       for a different job, training, and is not what the CCNet perplexities and cutoffs were defined with);
    3. tokenize the text into pieces and run ``lmplz -o 5 -S <memory> --discount_fallback``;
    4. ``build_binary`` the ARPA file into ``<lang>.arpa.bin``.
    KenLM's ``lmplz``/``build_binary`` are built from the kenlm source package by
    ``scripts/build_kenlm.sh`` (``make kenlm``) into ``third_party/build/kenlm/bin``; ``KENLM_BIN`` may
    name another folder.

    ``text_files``: text files (one paragraph per line; .gz/.zst allowed) or JSONL documents (each
    document's lines are taken). ``vocab_size`` is a soft limit (small corpora get fewer pieces).
    ``order``: n-gram order (CCNet: 5). ``memory``: lmplz's ``-S`` (always passed, or it reserves most of
    RAM). ``max_lines``: use only the first lines (CCNet: the openings of 1M Wikipedia articles).
    ``spm_sample_lines``: lines SentencePiece samples for training. ``keep_arpa``: also keep the text
    ARPA file. The work is done in a scratch folder; each output is moved into place atomically, the
    KenLM binary last. Returns both paths.
    """
    if vocab_size < 16:
        raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
    lmplz, build_binary = kenlm_binary("lmplz"), kenlm_binary("build_binary")
    text_files = [Path(p) for p in text_files]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sp_out, lm_out = model_files(out_dir, lang)
    with tempfile.TemporaryDirectory(prefix=f".train-lm-{lang}-", dir=out_dir) as scratch:
        scratch = Path(scratch)
        text = scratch / "normalized.txt"
        if _write_normalized_text(text_files, text, max_lines) == 0:
            raise ValueError(f"{lang}: no text in the reference files {[str(p) for p in text_files]}")

        sp = _train_unigram_sentencepiece(text, scratch / "sp", vocab_size, spm_sample_lines, threads, seed)
        pieces = scratch / "pieces.txt"
        _write_pieces(sp, text, pieces)

        arpa = scratch / "lm.arpa"
        _run([str(lmplz), "-o", str(order), "-S", memory, "-T", str(scratch), "--discount_fallback",
              "--text", str(pieces), "--arpa", str(arpa)], "lmplz")
        _run([str(build_binary), str(arpa), str(scratch / "lm.bin")], "build_binary")

        _move_into_place(scratch / "sp.model", sp_out)
        _move_into_place(scratch / "sp.vocab", out_dir / f"{lang}.sp.vocab")
        if keep_arpa:
            _move_into_place(arpa, out_dir / f"{lang}.arpa")
        _move_into_place(scratch / "lm.bin", lm_out)
    return sp_out, lm_out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lang", help="language code, as the LID step writes it (e.g. en, de)")
    p.add_argument("inputs", nargs="+", help="reference text files")
    p.add_argument("--out", required=True, help="model folder")
    p.add_argument("--vocab-size", type=int, default=CCNET_VOCAB_SIZE, help="SentencePiece pieces (soft limit)")
    p.add_argument("--order", type=int, default=5, help="n-gram order")
    p.add_argument("--memory", default="1G", help="lmplz -S (memory for sorting), e.g. 8G or 50%%")
    p.add_argument("--max-lines", type=int, default=None, help="use only the first lines")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-arpa", action="store_true", help="also keep the text ARPA file")


def run(args: argparse.Namespace) -> int:
    try:
        sp, lm = train_reference_lm(args.lang, args.inputs, args.out, vocab_size=args.vocab_size, order=args.order,
                                    memory=args.memory, max_lines=args.max_lines, threads=args.threads,
                                    keep_arpa=args.keep_arpa)
        print(f"wrote {sp} and {lm}")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"llama-data: error: {exc}", file=sys.stderr)
        return 2
    return 0
