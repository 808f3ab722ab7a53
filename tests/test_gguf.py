"""GGUF export (python -m llama_pt.pretrained export-gguf), checked in llama.cpp itself (the xllamacpp wheel, in
process) and read back with gguf-py: metadata and vocabulary, q/k row order, the types and their quantisation,
greedy tokens and perplexity in llama.cpp, the f16 fallback, merged adapters, and the one-line refusals.

Two tiny models are trained on real English text (licence texts, Apache-2.0 held out): "mha" (4 heads, 4 key/value
heads, vocab_size 520 for a 512-piece tokenizer: padded to 576 rows, 8 "[PAD]" pieces in the file) and "gqa"
(4 heads sharing 2 key/value heads).
"""
import math

import gguf
import numpy as np
import pytest
import torch

from support import english_text_files, make_config
from llama_pt.atomic import leftovers
from llama_pt.config import ModelConfig
from llama_pt.data import IndexedDatasetWriter, write_manifest
from llama_pt.generate import generate
from llama_pt.gguf_export import export_gguf, read_gguf
from llama_pt.gguf_export.export import interleave_heads
from llama_pt.gguf_export.llamacpp import LlamaCpp
from llama_pt.hf_interop import export_hf, import_hf
from llama_pt.model import VOCAB_ROWS, Llama
from llama_pt.pretrained import export_checkpoint, load_checkpoint_model, main
from llama_pt.tokenizer import Tokenizer
from llama_pt.train.checkpoint import list_checkpoints
from llama_pt.train.entry import run_training

HELD_OUT = "Apache-2.0"
MODELS = {"mha": ("model.n_kv_heads=4", "model.vocab_size=520"), "gqa": ()}
TRAIN = ("train.steps=300", "train.ckpt_every=300", "train.seq_len=64", "train.global_batch_tokens=1024",
         "train.micro_batch_size=8")
EXPORTS = {"mha": ("f32", "f16", "bf16", "q8_0", "q4_0"), "gqa": ("f32", "f16")}
LORA = ("peft=lora", "peft.rank=4", "peft.alpha=8", "peft.dropout=0.0", "peft.targets=[wq,wk,wv,wo,w1,w2,w3]")


def _shards(root, name, files, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    docs = [np.array(tok.encode(f.read_text(encoding="utf-8"), eos=True)) for f in files]
    prefix = root / name / "shard_00000"
    prefix.parent.mkdir(parents=True)
    with IndexedDatasetWriter(prefix, tok.vocab_size) as writer:
        for doc in docs:
            writer.add_document(doc)
    entry = {"name": name, "prefixes": [prefix], "documents": len(docs), "tokens": int(sum(map(len, docs))),
             "weight": 1.0, "epochs": None}
    return write_manifest(root / f"{name}.json", [entry], tokenizer_path, vocab_size=tok.vocab_size, eos_id=tok.eos_id)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread and one llama.cpp thread: the models are tiny, and two threads on two shared cores mostly
    wait for each other (training here took 4 s on one thread, 24 s on two, with the cores busy elsewhere)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama_cpp(path, **kwargs) -> LlamaCpp:
    return LlamaCpp(path, threads=1, **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer_512):
    """Token shards of the licence texts but one, and that one (Apache-2.0) as held-out ids with BOS."""
    root = tmp_path_factory.mktemp("gguf_text")
    files = english_text_files()
    held_out = [f for f in files if f.name == HELD_OUT]
    return {"manifest": _shards(root, "train", [f for f in files if f.name != HELD_OUT], tokenizer_512),
            "valid_manifest": _shards(root, "valid", held_out, tokenizer_512),
            "held_out": Tokenizer(tokenizer_512).encode(held_out[0].read_text(encoding="utf-8"), bos=True)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """name -> the last checkpoint of a tiny model trained for 300 steps."""
    root = tmp_path_factory.mktemp("gguf_runs")
    for name, overrides in MODELS.items():
        run_training(make_config(root / name, corpus, *TRAIN, *overrides))
    return {name: list_checkpoints(root / name / "checkpoints")[-1] for name in MODELS}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    """(model name, type) -> the GGUF file the command wrote from the checkpoint (tokenizer found from its manifest)."""
    root = tmp_path_factory.mktemp("gguf_files")
    files = {}
    for name, types in EXPORTS.items():
        for kind in types:
            files[name, kind] = root / f"{name}-{kind}.gguf"
            assert main(["export-gguf", str(trained[name]), str(files[name, kind]), "--type", kind]) == 0
    return files


@pytest.fixture(scope="module")
def ours(trained):
    return {name: load_checkpoint_model(path)[0] for name, path in trained.items()}


def trimmed(model: Llama) -> dict[str, torch.Tensor]:
    """The model's tensors as a GGUF file holds them: the vocabulary's padding rows left out."""
    return {k: v[:model.cfg.vocab_size] if k in VOCAB_ROWS else v for k, v in model.state_dict().items()}


def with_weights(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> Llama:
    """Llama(cfg) holding `tensors` (read back from a file), the vocabulary padded again with zero rows."""
    model = Llama(cfg)
    model.load_state_dict({k: torch.cat([v, v.new_zeros(cfg.padded_vocab_size - len(v), v.shape[1])])
                           if k in VOCAB_ROWS else v for k, v in tensors.items()})
    return model.eval()


def our_logprobs(model: Llama, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :, :model.cfg.vocab_size].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def windows(ids: list[int], n: int, size: int) -> list[list[int]]:
    return [ids[i * size:(i + 1) * size] for i in range(n)]


# ----------------------------------------------------------------------------------------------- the file
def test_metadata_and_vocabulary(exported, ours, tokenizer_512):
    contents = read_gguf(exported["mha", "f32"])
    meta, cfg = contents.metadata, ours["mha"].cfg
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert {k: meta[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count",
                                            "feed_forward_length", "attention.head_count",
                                            "attention.head_count_kv", "rope.dimension_count", "vocab_size")} == {
        "context_length": cfg.max_seq_len, "embedding_length": cfg.dim, "block_count": cfg.n_layers,
        "feed_forward_length": cfg.ffn_hidden_dim, "attention.head_count": 4, "attention.head_count_kv": 4,
        "rope.dimension_count": cfg.head_dim, "vocab_size": 520}
    assert meta["llama.rope.freq_base"] == cfg.rope_theta
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps, rel=1e-6)  # a float32
    assert read_gguf(exported["gqa", "f16"]).metadata["llama.attention.head_count_kv"] == 2
    assert read_gguf(exported["gqa", "f16"]).metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16

    tok = Tokenizer(tokenizer_512)
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == pieces + [f"[PAD{i}]" for i in range(512, 520)]
    types = meta["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert all(types[i] == gguf.TokenType.BYTE and pieces[i] == f"<0x{i - 3:02X}>" for i in range(3, 259))
    assert set(types[259:512]) == {gguf.TokenType.NORMAL} and set(types[512:]) == {gguf.TokenType.UNUSED}
    scores = meta["tokenizer.ggml.scores"]
    assert scores[300] > scores[400] and scores[512:] == [-10000.0] * 8  # BPE merge order, then the padding
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is True


def test_f32_reads_back_exactly_with_q_and_k_rows_interleaved(exported, ours):
    for name in ("mha", "gqa"):
        want = trimmed(ours[name])
        contents = read_gguf(exported[name, "f32"])
        assert contents.tensors.keys() == want.keys()
        assert all(torch.equal(contents.tensors[k], want[k]) for k in want)
        assert set(contents.types.values()) == {"f32"}
    # In the file: ggml's reversed shapes, and the rows of q and k in adjacent pairs per head.
    cfg = ours["gqa"].cfg
    raw = {t.name: t for t in gguf.GGUFReader(str(exported["gqa", "f32"])).tensors}
    wq, wk = ours["gqa"].layers[1].attention.wq.weight, ours["gqa"].layers[1].attention.wk.weight
    assert list(raw["blk.1.attn_k.weight"].shape) == [cfg.dim, cfg.kv_heads * cfg.head_dim]
    assert torch.equal(torch.from_numpy(raw["blk.1.attn_q.weight"].data.copy()), interleave_heads(wq, 4))
    assert torch.equal(torch.from_numpy(raw["blk.1.attn_k.weight"].data.copy()), interleave_heads(wk, 2))
    half, head = cfg.head_dim // 2, interleave_heads(wk, 2)[:cfg.head_dim]  # the first head: rows j, j + half
    assert torch.equal(head[0::2], wk[:half]) and torch.equal(head[1::2], wk[half:2 * half])  # -> rows 2j, 2j + 1


# Largest error of one value, as a fraction of the largest |value| of its block of 32: q8_0 rounds to d/2 with
# d = amax/127, q4_0 to d with d = amax/8 (the clipped top end); plus up to 127 (q8_0) or 8 (q4_0) times the
# f16 rounding of d, 2^-11 d at most.
BOUNDS = {"q8_0": (0.5 + 127 * 2**-11) / 127, "q4_0": (1 + 8 * 2**-11) / 8}


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q4_0"])
def test_types_read_back_as_gguf_quants_gives_them(exported, ours, kind):
    contents = read_gguf(exported["mha", kind])
    for name, t in trimmed(ours["mha"]).items():
        back = contents.tensors[name]
        if t.dim() == 1:
            assert contents.types[name] == "f32" and torch.equal(back, t)
            continue
        assert contents.types[name] == kind
        if kind == "f16":
            assert torch.equal(back, t.half().float())
        elif kind == "bf16":
            assert torch.equal(back, t.bfloat16().float())  # round to nearest even, as ggml
        else:
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            again = gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), qtype), qtype)
            assert torch.equal(back, torch.from_numpy(again))  # blocks run along rows: the row order is immaterial
            blocks, err = t.reshape(-1, 32), (back - t).reshape(-1, 32)
            assert bool((err.abs() <= BOUNDS[kind] * blocks.abs().amax(dim=1, keepdim=True)).all())
            assert err.abs().max() > 0


# ----------------------------------------------------------------------------------------------- in llama.cpp
def greedy_agrees(got: list[int], want: list[int], model: Llama, ids: list[int], eos_id: int,
                  margin: float = 1e-3) -> bool:
    """llama.cpp's greedy tokens `got` are ours `want` (both up to EOS), or are up to a step where our two best
    logits tie within `margin` (float differences between the two implementations, ~1e-4 in the
    log-probabilities, may break such a tie either way) and llama.cpp took the other of the two."""
    if got == want:
        return True
    got, want = got + [eos_id], want + [eos_id]  # a continuation that ended chose EOS at that step
    k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.no_grad():
        top = model(torch.tensor([ids + want[:k]]))[0, -1, :model.cfg.vocab_size].topk(2)
    return set(top.indices.tolist()) == {got[k], want[k]} and float(top.values[0] - top.values[1]) < margin


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_llamacpp_greedy_tokens_equal_ours(exported, ours, tokenizer_512, name):
    tok = Tokenizer(tokenizer_512)
    for kind in ("f32", "f16"):
        llama = llama_cpp(exported[name, kind], n_ctx=256)
        # The f16 file is compared with our model holding its f16 weights.
        model = ours[name] if kind == "f32" else with_weights(ours[name].cfg, read_gguf(exported[name, kind]).tensors)
        for prompt in ("This License", "You may", "the terms of"):
            ids = tok.encode(prompt, bos=True)
            want = generate(model, [ids], 48, temperature=0, eos_id=tok.eos_id)[0]
            got = llama.greedy(ids, 48)
            assert greedy_agrees(got, want, model, ids, tok.eos_id), (name, kind, prompt, got, want)
            assert len(set(want)) >= 5, (prompt, tok.decode(want))  # text, not one token repeated


def test_llamacpp_tokenizes_like_ours(exported, tokenizer_512):
    llama, tok = llama_cpp(exported["gqa", "f16"]), Tokenizer(tokenizer_512)
    for text in ("Licensed under the Apache License, Version 2.0", " leading space, then  two", "tab\tand\nnew line",
                 "naïve café 2024: ünïcödé, 中文 and \U0001F600", ""):
        assert llama.tokenize(text) == tok.encode(text, bos=True), text


def test_llamacpp_log_probabilities_equal_ours(exported, ours, corpus):
    """On held-out text, and for every id of the vocabulary as the next token (EOS, byte and "[PAD]" pieces
    included, which llama_pt.gguf_export.llamacpp reads from the whole distribution)."""
    every_id = torch.randperm(520, generator=torch.Generator().manual_seed(0)).tolist()
    exact = llama_cpp(exported["mha", "f32"], f32_attention=True)
    for ids in [corpus["held_out"][:96]] + [[1] + every_id[i:i + 130] for i in range(0, 520, 130)]:
        got, want = exact.token_logprobs(ids), our_logprobs(ours["mha"], ids)
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    ids = corpus["held_out"][:96]
    default = llama_cpp(exported["mha", "f32"]).token_logprobs(ids)  # f16 keys and values, flash attention
    assert max(abs(a - b) for a, b in zip(default, our_logprobs(ours["mha"], ids))) < 1e-2


def test_quantised_perplexity_in_llamacpp(exported, ours, corpus):
    """Perplexity of 4 held-out windows of 64 tokens: llama.cpp on the f32, f16, q8_0 and q4_0 files, ours on f32."""
    held_out = windows(corpus["held_out"], 4, 64)
    logprobs = [lp for w in held_out for lp in our_logprobs(ours["mha"], w)]
    ppl = {"ours f32": math.exp(-sum(logprobs) / len(logprobs))}
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        ppl[kind] = llama_cpp(exported["mha", kind]).perplexity(held_out)
    print("held-out perplexity:", {k: round(v, 3) for k, v in ppl.items()})
    assert ppl["f32"] == pytest.approx(ppl["ours f32"], rel=1e-3)
    assert ppl["f16"] == pytest.approx(ppl["f32"], rel=1e-3)
    assert ppl["q8_0"] == pytest.approx(ppl["f16"], rel=0.01)
    assert ppl["q4_0"] == pytest.approx(ppl["f16"], rel=0.25) and ppl["q4_0"] != ppl["q8_0"]
    assert ppl["f32"] < 100  # a trained model: uniform over the vocabulary would be 520


# ----------------------------------------------------------------------------------------------- other inputs
def test_rows_off_the_block_fall_back_to_f16(tmp_path, tokenizer_512, capsys):
    """dim 48 is no multiple of q4_0's 32: those weights are written in f16 and named in one line; w2's rows
    (the SwiGLU width, 128) stay q4_0. The model comes from a Hugging Face folder here."""
    cfg = ModelConfig(dim=48, n_layers=1, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    export_hf(model, cfg, tmp_path / "hf", tokenizer_path=tokenizer_512)
    capsys.readouterr()
    assert main(["export-gguf", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--type", "q4_0"]) == 0
    out, err = capsys.readouterr()
    fallbacks = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                 "blk.0.attn_output.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "output.weight"]
    assert out.strip() == str(tmp_path / "m.gguf")
    assert err == f"note: 8 weight(s) written as f16, their rows not a multiple of q4_0's block of 32: " \
                  f"{', '.join(fallbacks)}\n"
    contents = read_gguf(tmp_path / "m.gguf")
    assert contents.types["layers.0.feed_forward.w2.weight"] == "q4_0"
    assert contents.types["layers.0.attention.wq.weight"] == "f16" and contents.types["norm.weight"] == "f32"
    # llama.cpp runs the mixed file like our model holding the same weights.
    ids = list(range(1, 40))
    got = llama_cpp(tmp_path / "m.gguf", n_ctx=64).token_logprobs(ids)
    want = our_logprobs(with_weights(cfg, contents.tensors), ids)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-2


def test_lora_checkpoint_is_exported_with_its_adapters_merged(tmp_path, corpus, trained):
    base = export_checkpoint(trained["gqa"], tmp_path / "base", dtype="float32")
    run_training(make_config(tmp_path / "run", corpus, *LORA, f"train.init_from={base}", "train.steps=3",
                             "train.ckpt_every=3", "optim.lr=1e-2", "train.seq_len=64"))
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert main(["export-gguf", str(ckpt), str(tmp_path / "lora.gguf"), "--type", "f32"]) == 0
    merged = import_hf(export_checkpoint(ckpt, tmp_path / "merged", dtype="float32"))[1]
    back = read_gguf(tmp_path / "lora.gguf").tensors
    assert all(torch.equal(back[k], merged[k][:512]) for k in back)
    assert not torch.equal(back["layers.0.attention.wq.weight"], import_hf(base)[1]["layers.0.attention.wq.weight"])


def test_unknown_type_and_missing_tokenizer_are_refused(tmp_path, trained, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export-gguf", str(trained["gqa"]), str(tmp_path / "m.gguf"), "--type", "q5_k"])
    assert exit_.value.code == 2 and "invalid choice: 'q5_k'" in capsys.readouterr().err
    model = Llama(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=32))
    export_hf(model, model.cfg, tmp_path / "no_tokenizer")  # a folder without tokenizer.model
    assert main(["export-gguf", str(tmp_path / "no_tokenizer"), str(tmp_path / "m.gguf")]) == 2
    assert capsys.readouterr().err == f"error: no tokenizer found for {tmp_path / 'no_tokenizer'}: pass --tokenizer\n"
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_one_line(tmp_path, tokenizer_512, capsys):
    small = Llama(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=300, multiple_of=32))
    export_hf(small, small.cfg, tmp_path / "small")
    assert main(["export-gguf", str(tmp_path / "small"), str(tmp_path / "m.gguf"),
                 "--tokenizer", str(tokenizer_512)]) == 2
    assert capsys.readouterr().err == f"error: {tokenizer_512}: 512 pieces do not fit model.vocab_size=300\n"
    assert not (tmp_path / "m.gguf").exists()


def test_unmerged_adapters_and_other_shapes_are_refused(tmp_path, tokenizer_512):
    from llama_pt.adapters.apply import apply_peft
    from llama_pt.config import PeftConfig
    model = Llama(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=32))
    other = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=512, multiple_of=32)
    with pytest.raises(ValueError, match=r"parameter 'layers.0.attention.wk.weight' has shape \(32, 32\), "
                                         r"config says \(16, 32\)"):
        export_gguf(model.state_dict(), other, tmp_path / "m.gguf", tokenizer_512)
    apply_peft(model, PeftConfig(method="lora", rank=2))
    with pytest.raises(ValueError, match="is not one of Llama's \\(adapters must be merged first\\)"):
        export_gguf(model.state_dict(), model.cfg, tmp_path / "m.gguf", tokenizer_512)
    assert not (tmp_path / "m.gguf").exists()


def test_an_export_that_fails_midway_leaves_the_previous_file(tmp_path, tokenizer_512, monkeypatch):
    model = Llama(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=32))
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    quantize, calls = gguf.quants.quantize, []

    def fails_at_the_fifth_tensor(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return quantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", fails_at_the_fifth_tensor)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(model.state_dict(), model.cfg, out, tokenizer_512, "q8_0")
    assert out.read_bytes() == b"previous" and not leftovers(out)
    monkeypatch.undo()
    export_gguf(model.state_dict(), model.cfg, out, tokenizer_512, "q8_0")
    assert out.read_bytes()[:4] == b"GGUF" and not leftovers(out)
