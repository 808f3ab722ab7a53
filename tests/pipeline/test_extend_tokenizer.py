"""`llama-data extend-tokenizer`: Chinese-LLaMA's vocabulary extension, on real text from Debian packages.

BASE is a 1,000-piece model with LLaMA's settings trained on the licence texts every Debian machine has;
the new language is Chinese (fortunes-zh: sayings, Tang and Song poems), nine documents in ten for
training and the tenth held out; the old language's held-out text is English fortunes, which BASE never saw.
"""
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from debian_text import fortunes
from data_pipeline.cli import main
from data_pipeline.tools.extend_tokenizer import FIXED_PIECES, extend_tokenizer
from llama_pt.tokenizer import Tokenizer, train_sentencepiece

LICENSES = [Path("/usr/share/common-licenses", name) for name in
            ("GPL-3", "GPL-2", "Apache-2.0", "GFDL-1.3", "LGPL-2.1", "MPL-2.0", "Artistic", "CC0-1.0")]
BASE_VOCAB = 1000
ADD = 7000  # fortunes-zh needs about 6,000 single-character pieces at LLaMA's character coverage
NORMAL = sp_pb2.ModelProto.SentencePiece.NORMAL


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def proto(path: Path) -> sp_pb2.ModelProto:
    m = sp_pb2.ModelProto()
    m.ParseFromString(Path(path).read_bytes())
    return m


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["extend-tokenizer", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("extend")
    missing = [str(p) for p in LICENSES if not p.is_file()]
    assert not missing, f"licence texts not found: {missing}"
    base = train_sentencepiece([p.read_text(encoding="utf-8") for p in LICENSES], root / "base", BASE_VOCAB)
    zh = fortunes("zh")
    zh_train = [d for i, d in enumerate(zh) if i % 10]
    seen = set(zh_train)
    zh_heldout = [d for i, d in enumerate(zh) if not i % 10 and d not in seen]
    en_heldout = fortunes("en")[::10]
    return {"root": root, "base": base, "zh_train": zh_train, "zh_heldout": zh_heldout, "en_heldout": en_heldout,
            "zh_train_file": write_jsonl(root / "zh_train.jsonl", zh_train),
            "zh_heldout_file": write_jsonl(root / "zh_heldout.jsonl", zh_heldout),
            "en_heldout_file": write_jsonl(root / "en_heldout.jsonl", en_heldout)}


def extend(data, out: Path, *extra) -> str:
    code, stdout, stderr = run_cli(data["base"], data["zh_train_file"], "--add", ADD, "--out", out,
                                   "--heldout-old", data["en_heldout_file"], "--heldout-new", data["zh_heldout_file"],
                                   *extra)
    assert code == 0, stderr
    return stdout


@pytest.fixture(scope="module")
def extended(data) -> dict:
    out = data["root"] / "zh_llama.model"
    return {"path": out, "stdout": extend(data, out)}


def table(stdout: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ") and "language" in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_old_ids_pieces_scores_and_types_are_unchanged(data, extended):
    base, new = proto(data["base"]), proto(extended["path"])
    assert len(base.pieces) == BASE_VOCAB
    for i, old in enumerate(base.pieces):
        assert (new.pieces[i].piece, new.pieces[i].score, new.pieces[i].type) == (old.piece, old.score, old.type), i
    assert new.trainer_spec == base.trainer_spec and new.normalizer_spec == base.normalizer_spec
    added = new.pieces[BASE_VOCAB:]
    assert 6000 < len(added) <= ADD
    assert f"vocabulary size: {len(new.pieces)}\n" in extended["stdout"]
    old_pieces = {p.piece for p in base.pieces}
    assert len({p.piece for p in added}) == len(added) and not old_pieces & {p.piece for p in added}
    assert all(p.type == NORMAL for p in added)
    # below-base: under every base score, falling with the id (the new model's order).
    scores = [p.score for p in added]
    assert scores[0] == min(p.score for p in base.pieces) - 1
    assert all(a - b == 1 for a, b in zip(scores, scores[1:]))


def test_appended_pieces_are_those_of_a_model_trained_with_llamas_settings(data, extended, tmp_path):
    """The corpus path trains the project's LLaMA-settings BPE (N learned pieces + specials + bytes) and
    appends the pieces BASE lacks in that model's score order; --merge of the same model writes the same file,
    and --merge --add K appends the first K of them."""
    other = train_sentencepiece(data["zh_train"], tmp_path / "zh", ADD + FIXED_PIECES)
    base_pieces = {p.piece for p in proto(data["base"]).pieces}
    expected = [p.piece for p in proto(other).pieces if p.type == NORMAL and p.piece not in base_pieces]
    assert [p.piece for p in proto(extended["path"]).pieces[BASE_VOCAB:]] == expected
    code, stdout, _ = run_cli(data["base"], "--merge", other, "--out", tmp_path / "merged.model")
    assert code == 0 and "vocabulary size: " in stdout
    assert (tmp_path / "merged.model").read_bytes() == extended["path"].read_bytes()
    code, _, _ = run_cli(data["base"], "--merge", other, "--add", 100, "--out", tmp_path / "first100.model")
    assert code == 0
    assert [p.piece for p in proto(tmp_path / "first100.model").pieces[BASE_VOCAB:]] == expected[:100]


def test_a_folder_stands_for_its_files_in_path_order(data, tmp_path):
    """A CORPUS folder is read as its (non-hidden) files sorted by path, subfolders included: it trains the
    same model as one text file holding the same lines."""
    lines = [line for doc in data["zh_train"] for line in doc.splitlines() if line.strip()]
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    half = len(lines) // 2
    (folder / "a.txt").write_text("\n".join(lines[:half]) + "\n", encoding="utf-8")
    (folder / "b" / "c.txt").write_text("\n".join(lines[half:]) + "\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("鬼鬼鬼 not read\n", encoding="utf-8")
    whole = tmp_path / "whole.txt"
    whole.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for corpus, out in ((folder, "from_folder.model"), (whole, "from_file.model")):
        code, _, err = run_cli(data["base"], corpus, "--add", ADD, "--out", tmp_path / out)
        assert code == 0, err
    assert (tmp_path / "from_folder.model").read_bytes() == (tmp_path / "from_file.model").read_bytes()


def unseen_cjk_character(tok: Tokenizer, corpus: list[str]) -> str:
    text = "".join(corpus)
    return next(chr(c) for c in range(0x4E00, 0xA000)
                if tok.encode_pieces(chr(c))[-1].startswith("<0x") and chr(c) not in text)


def test_digits_split_and_unseen_characters_fall_back_to_bytes_in_both_languages(data, extended):
    tok = Tokenizer(extended["path"])
    assert tok.encode_pieces("价格是2024元")[-5:] == ["2", "0", "2", "4", "元"]
    assert tok.encode_pieces("in 2024.")[-5:] == ["2", "0", "2", "4", "."]
    assert not [p.piece for p in proto(extended["path"]).pieces
                if p.type == NORMAL and len(p.piece) > 1 and any(c.isdigit() for c in p.piece)]
    rare = unseen_cjk_character(tok, data["zh_train"])
    for text, char in ((f"他说{rare}字。", rare), ("the llama 🦙 spits", "🦙")):
        pieces = tok.encode_pieces(text)
        as_bytes = [f"<0x{b:02X}>" for b in char.encode("utf-8")]
        start = pieces.index(as_bytes[0])
        assert pieces[start:start + len(as_bytes)] == as_bytes
        assert tok.unk_id not in tok.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert not any(p.startswith("<0x") for p in tok.encode_pieces("中文"))  # pieces now, not bytes
    for doc in data["zh_heldout"][:50] + data["en_heldout"][:50]:
        assert tok.decode(tok.encode(doc)) == doc


def boundaries(tok: Tokenizer, ids: list[int]) -> set[int]:
    """The UTF-8 byte offsets where the tokens ``ids`` end (a byte piece is one byte)."""
    ends, pos = set(), 0
    for i in ids:
        piece = tok.id_to_piece(i)
        pos += 1 if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else len(piece.replace("▁", " ").encode("utf-8"))
        ends.add(pos)
    return ends


def test_held_out_table_is_what_the_two_models_do(data, extended):
    base, new = Tokenizer(data["base"]), Tokenizer(extended["path"])
    rows = table(extended["stdout"])
    for name, docs in (("old language", data["en_heldout"]), ("new language", data["zh_heldout"])):
        before, after = base.encode_batch(docs), new.encode_batch(docs)
        chars = sum(map(len, docs))
        changed = sum(a != b for a, b in zip(before, after))
        assert rows[name] == [str(len(docs)), str(chars), f"{sum(map(len, before)) / chars:.4f}",
                              f"{sum(map(len, after)) / chars:.4f}", f"{changed} ({100 * changed / len(docs):.1f}%)"]
    zh_before, zh_after = float(rows["new language"][2]), float(rows["new language"][3])
    assert zh_after < 0.5 * zh_before  # bytes (3 a character) -> pieces
    en_before, en_after = float(rows["old language"][2]), float(rows["old language"][3])
    assert en_after <= en_before


def test_below_base_scores_only_join_base_tokens_zero_scores_do_not(data, extended, tmp_path):
    """With every new score under BASE's, encoding runs BASE's merges to their end first: the extended
    model's token boundaries on English are a subset of BASE's. Chinese-LLaMA's score 0 pre-empts BASE's
    merges and splits English words BASE kept whole (and costs English tokens)."""
    base, new = Tokenizer(data["base"]), Tokenizer(extended["path"])
    docs = data["en_heldout"]
    for doc, b, n in zip(docs, base.encode_batch(docs), new.encode_batch(docs)):
        assert boundaries(new, n) <= boundaries(base, b), doc
        assert b == n or any(i >= BASE_VOCAB for i in n)
    zero_out = extend(data, tmp_path / "zero.model", "--scores", "zero")
    zero = Tokenizer(tmp_path / "zero.model")
    split = sum(not boundaries(zero, z) <= boundaries(base, b)
                for b, z in zip(base.encode_batch(docs), zero.encode_batch(docs)))
    assert split > len(docs) // 4
    rows, zero_rows = table(extended["stdout"]), table(zero_out)
    assert float(zero_rows["old language"][3]) > float(rows["old language"][3])


def test_new_characters_only_leaves_text_in_base_characters_alone(data, tmp_path):
    ext = extend_tokenizer(data["base"], tmp_path / "new_chars.model", corpus=[data["zh_train_file"]], add=ADD,
                           new_characters_only=True, heldout_old=[data["en_heldout_file"]])
    base, new = Tokenizer(data["base"]), Tokenizer(ext.path)
    base_chars = {base.id_to_piece(i) for i in range(BASE_VOCAB) if len(base.id_to_piece(i)) == 1}
    added = [new.id_to_piece(i) for i in range(BASE_VOCAB, new.vocab_size)]
    assert len(added) > 6000 and all(any(c not in base_chars for c in piece) for piece in added)
    docs = data["en_heldout"]
    in_base_chars = [set(d.replace(" ", "▁")) <= base_chars | {"\n"} for d in docs]
    assert sum(in_base_chars) > 0.7 * len(docs)
    for doc, plain in zip(docs, in_base_chars):
        if plain:
            assert new.encode(doc) == base.encode(doc), doc
    (row,) = ext.rows
    assert row.changed_docs <= len(docs) - sum(in_base_chars)


def test_loads_in_transformers_and_encodes_the_same_ids(data, extended, tmp_path):
    """A folder with tokenizer.model and the tokenizer_config.json that llama_pt.hf_interop writes loads as
    transformers' LlamaTokenizer. Text that starts with whitespace is left out: there transformers 5's
    Metaspace adds no dummy prefix while SentencePiece does (llama_pt/hf_interop.py)."""
    from transformers import AutoTokenizer

    from llama_pt.config import ModelConfig
    from llama_pt.hf_interop import _tokenizer_files

    ours = Tokenizer(extended["path"])
    _tokenizer_files(extended["path"], tmp_path, ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=ours.vocab_size))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ in ("LlamaTokenizer", "LlamaTokenizerFast") and len(hf) == ours.vocab_size
    rare = unseen_cjk_character(ours, data["zh_train"])
    texts = data["zh_heldout"][:150] + data["en_heldout"][:150]
    texts += [f"价格是2024元，约合3.5万 {rare} 🦙", "Digits 2024 and 3.14159"]
    assert not any(t[:1].isspace() for t in texts)
    for text in texts:
        ids = ours.encode(text, bos=True)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def unigram_model(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("unigram") / "uni"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LICENSES[0].read_text(encoding="utf-8").splitlines()),
                                   model_prefix=str(prefix), model_type="unigram", vocab_size=300, minloglevel=2)
    return Path(f"{prefix}.model")


def test_merge_leaves_out_pieces_that_would_join_digits(data, tmp_path):
    """An OTHER trained without split_digits has pieces like "2024"; appending them would stop BASE
    from splitting numbers."""
    prefix = tmp_path / "digits"
    text = [f"第{n}章，共{n * 7}页，{1990 + n % 30}年" for n in range(3000)] + data["zh_train"][:500]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(prefix), model_type="bpe",
                                   vocab_size=5000, split_digits=False, byte_fallback=True,
                                   normalization_rule_name="identity", minloglevel=2)
    other_pieces = [p.piece for p in proto(f"{prefix}.model").pieces]
    assert any(len(p) > 1 and any(c.isdigit() for c in p) for p in other_pieces)
    code, _, err = run_cli(data["base"], "--merge", f"{prefix}.model", "--out", tmp_path / "out.model")
    assert code == 0, err
    tok = Tokenizer(tmp_path / "out.model")
    assert tok.vocab_size > BASE_VOCAB
    text = "第12章，1999年"
    assert [p for p in tok.encode_pieces(text) if any(c.isdigit() for c in p) and not p.startswith("<0x")] \
        == ["1", "2", "1", "9", "9", "9"]
    assert tok.decode(tok.encode(text)) == text


def bad_cases(data, unigram_model) -> dict[str, tuple[list, str]]:
    root, base, corpus = data["root"], data["base"], data["zh_train_file"]
    garbage = root / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    tiny = root / "tiny.txt"
    tiny.write_text("白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n", encoding="utf-8")
    blank = root / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    return {
        "base missing": ([root / "nope.model", corpus, "--add", 10], "tokenizer model not found: "),
        "base not a model": ([garbage, corpus, "--add", 10], "garbage.model: not a SentencePiece model"),
        "base not BPE": ([unigram_model, corpus, "--add", 10], "is a UNIGRAM model, not BPE"),
        "add zero": ([base, corpus, "--add", 0], "--add 0: the number of pieces to add must be positive"),
        "add negative": ([base, corpus, "--add", -5], "--add -5: the number of pieces to add must be positive"),
        "merge add zero": ([base, "--merge", base, "--add", 0], "--add 0: the number"),
        "no add with corpus": ([base, corpus], "--add N (the number of pieces to learn) is required"),
        "neither": ([base, "--add", 10], "nothing to add: give a CORPUS to train on or --merge"),
        "both": ([base, corpus, "--merge", base, "--add", 10], "give either a CORPUS to train on or --merge"),
        "corpus too small": ([base, tiny, "--add", 500], "the corpus is too small to learn 500 pieces: "
                                                         "SentencePiece learns at most"),
        "too few pieces for the characters": ([base, corpus, "--add", 100], "single-character pieces at "
                                                                            "--character-coverage 0.99995"),
        "corpus missing": ([base, root / "nope.jsonl", "--add", 10], "input file not found: "),
        "corpus empty": ([base, blank, "--add", 10], "no text in the corpus"),
        "other not BPE": ([base, "--merge", unigram_model], "--merge " + str(unigram_model) + " is a UNIGRAM model"),
        "other missing": ([base, "--merge", root / "nope.model"], "tokenizer model not found: "),
        "heldout missing": ([base, corpus, "--add", 10, "--heldout-old", root / "nope.txt"], "input file not found: "),
        "heldout empty": ([base, corpus, "--add", 10, "--heldout-new", blank], "no documents in --heldout-new"),
        "train vocab too small": ([base, corpus, "--add", 1000, "--train-vocab-size", 1100],
                                  "--train-vocab-size 1100 leaves no room to learn --add 1000 pieces"),
    }


CASES = ["base missing", "base not a model", "base not BPE", "add zero", "add negative", "merge add zero",
         "no add with corpus", "neither", "both", "corpus too small", "too few pieces for the characters",
         "corpus missing", "corpus empty", "other not BPE", "other missing", "heldout missing", "heldout empty",
         "train vocab too small"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(data, unigram_model, tmp_path, case):
    argv, message = bad_cases(data, unigram_model)[case]
    out = tmp_path / "out" / "new.model"
    code, stdout, stderr = run_cli(*argv, "--out", out)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("llama-data: error: "), stderr
    assert message in stderr, stderr
    assert not out.parent.exists()


def test_refuses_to_write_over_base(data, tmp_path):
    base = tmp_path / "base.model"
    base.write_bytes(data["base"].read_bytes())
    for out in (base, tmp_path / "sub" / ".." / "base.model"):
        code, stdout, stderr = run_cli(base, data["zh_train_file"], "--add", 10, "--out", out)
        assert (code, stdout) == (2, "") and stderr.count("\n") == 1
        assert re.search(r"--out .*base\.model is BASE itself", stderr), stderr
    assert base.read_bytes() == data["base"].read_bytes() and sorted(tmp_path.iterdir()) == [base]
