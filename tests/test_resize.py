"""A model grown to a tokenizer that extends its vocabulary (Chinese-LLaMA, Cui et al. 2023): the `resize`
command on Hugging Face and checkpoint folders, its rules and refusals, and train.init_tokenizer.

The extended tokenizers are made here as Chinese-LLaMA made its own: pieces appended to the SentencePiece
proto of the base model (tests/conftest.py's tokenizer_512, trained on English licence texts).
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentencepiece import sentencepiece_model_pb2
from support import final_weights, losses, make_config, write_token_corpus

from llama_pt.config import ConfigError, resolve
from llama_pt.hf_interop import export_hf, import_hf
from llama_pt.model import Llama, get_preset
from llama_pt.pretrained import main
from llama_pt.tokenizer import Tokenizer
from llama_pt.train.checkpoint import list_checkpoints
from llama_pt.train.entry import run_training

# Word-initial pieces, a word-internal one, one the base tokenizer only has bytes for, a control-like one.
NEW_PIECES = ["▁sublicensable", "▁llama", "▁copyleft", "ingly", "▁中国", "<pad>"]
TINY = get_preset("tiny")  # vocab_size 512, the pieces of tokenizer_512


def edited_tokenizer(base: Path, out: Path, append=(), replace=None, keep=None) -> Path:
    """`base`'s proto with pieces appended (score 0, as Chinese-LLaMA's merge script does), one piece renamed
    (replace=(id, piece)), or only the first `keep` pieces."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(base.read_bytes())
    for piece in append:
        added = proto.pieces.add()
        added.piece, added.score = piece, 0.0
    if replace is not None:
        proto.pieces[replace[0]].piece = replace[1]
    if keep is not None:
        del proto.pieces[keep:]
    out.write_bytes(proto.SerializeToString())
    return out


@pytest.fixture(scope="module")
def new_tokenizer(tmp_path_factory, tokenizer_512) -> Path:
    return edited_tokenizer(tokenizer_512, tmp_path_factory.mktemp("tok") / "extended.model", NEW_PIECES)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer_512) -> Path:
    """A random tiny model (norm weights too) with the base tokenizer, as a Hugging Face folder."""
    torch.manual_seed(0)
    model = Llama(TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return export_hf(model, TINY, tmp_path_factory.mktemp("hf") / "base", tokenizer_path=tokenizer_512)


def load(folder: Path) -> Llama:
    cfg, state = import_hf(folder)
    model = Llama(cfg).eval()
    model.load_state_dict(state)
    return model


def test_resize_keeps_old_rows_and_logits_and_averages_subtokens(tmp_path, hf_folder, new_tokenizer, tokenizer_512,
                                                                 capsys):
    out = tmp_path / "grown"
    assert main(["resize", str(hf_folder), str(new_tokenizer), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 512 + len(NEW_PIECES) == Tokenizer(out / "tokenizer.model").vocab_size
    old, new = load(hf_folder), load(out)
    assert new.cfg.padded_vocab_size == 576
    before, after = old.state_dict(), new.state_dict()
    for name, value in before.items():
        if name in ("tok_embeddings.weight", "output.weight"):
            assert torch.equal(after[name][:512], value[:512]), name  # old rows bit for bit
            assert torch.count_nonzero(after[name][518:]) == 0, name  # padding
        else:
            assert torch.equal(after[name], value), name

    # subtoken_mean by hand: the base tokenizer's split of the new piece's text, rows averaged.
    base = Tokenizer(tokenizer_512)
    for k, piece in enumerate(NEW_PIECES):
        if piece.startswith("▁"):  # encode() adds the "▁" of a word start itself (the dummy prefix)
            ids = base.encode(piece[1:])
        else:
            ids = base.encode_piece(piece)
        assert "".join(base.id_to_piece(i) for i in ids if not base.id_to_piece(i).startswith("<0x")) \
            == piece.replace("中国", "")  # the Chinese characters come as UTF-8 bytes
        for name in ("tok_embeddings.weight", "output.weight"):
            want = torch.stack([before[name][i].double() for i in ids]).mean(dim=0).float()
            torch.testing.assert_close(after[name][512 + k], want, rtol=0, atol=1e-7)

    # Inputs of old ids: the logits of the old ids are unchanged at every position; the new ids' logits join
    # the softmax and take probability mass, so the loss of the same text grows (by design).
    tokens = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = old(tokens), new(tokens)
    assert (a[..., :512] - b[..., :512]).abs().max() <= 1e-6  # bitwise on CPU; a wider head may block differently
    assert b[..., 512:518].abs().min() > 0
    loss_old = F.cross_entropy(a[:, :-1, :512].reshape(-1, 512), tokens[:, 1:].reshape(-1))
    loss_new = F.cross_entropy(b[:, :-1, :518].reshape(-1, 518), tokens[:, 1:].reshape(-1))
    assert loss_new > loss_old


@pytest.mark.parametrize("init", ["mean", "normal"])
def test_mean_and_normal_rules(tmp_path, hf_folder, new_tokenizer, init):
    out = tmp_path / init
    assert main(["resize", str(hf_folder), str(new_tokenizer), str(out), "--init", init]) == 0
    before, after = load(hf_folder).state_dict(), load(out).state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):
        assert torch.equal(after[name][:512], before[name][:512])
        rows = after[name][512:518]
        if init == "mean":
            torch.testing.assert_close(rows, before[name][:512].double().mean(0).float().expand(6, -1),
                                       rtol=0, atol=1e-7)
        else:
            assert abs(rows.std().item() - TINY.init_std) < 0.1 * TINY.init_std and len(set(rows[:, 0].tolist())) == 6


def test_the_model_s_own_tokenizer_changes_nothing(tmp_path, hf_folder, tokenizer_512):
    assert main(["resize", str(hf_folder), str(tokenizer_512), str(tmp_path / "same")]) == 0
    before, after = load(hf_folder).state_dict(), load(tmp_path / "same").state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_resize_a_training_checkpoint(tmp_path, token_corpus, new_tokenizer):
    """The base tokenizer comes from the checkpoint's training manifest; float32 stays float32."""
    run_training(make_config(tmp_path / "run", token_corpus, "train.steps=2", "train.ckpt_every=2"))
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert main(["resize", str(ckpt), str(new_tokenizer), str(tmp_path / "hf")]) == 0
    from llama_pt.pretrained import load_checkpoint_model
    trained = load_checkpoint_model(ckpt)[0].state_dict()
    grown = load(tmp_path / "hf").state_dict()
    assert grown["output.weight"].dtype == torch.float32
    assert all(torch.equal(grown[k][:512], v[:512]) for k, v in trained.items())  # the old rows, every other weight


def test_refusals_are_one_line_before_any_work(tmp_path, hf_folder, new_tokenizer, tokenizer_512, capsys):
    changed = edited_tokenizer(tokenizer_512, tmp_path / "changed.model", NEW_PIECES, replace=(300, "▁zzzz"))
    other_base = edited_tokenizer(tokenizer_512, tmp_path / "other_base.model", replace=(300, "▁zzzz"))
    fewer = edited_tokenizer(tokenizer_512, tmp_path / "fewer.model", keep=500)
    bare = tmp_path / "bare"  # a Hugging Face folder without its tokenizer
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((hf_folder / f).read_bytes())
    cases = [
        ([str(hf_folder), str(new_tokenizer), "OUT", "--init", "zeros"], "--init=zeros is unknown"),
        ([str(hf_folder), str(changed), "OUT"], "id 300 is '▁zzzz' there"),
        ([str(hf_folder), str(fewer), "OUT"], "500 pieces, fewer than the model's vocab_size=512"),
        ([str(bare), str(new_tokenizer), "OUT"], "pass --base-tokenizer"),
        ([str(bare), str(new_tokenizer), "OUT", "--base-tokenizer", str(other_base)], "does not extend"),
        ([str(bare), str(new_tokenizer), "OUT", "--base-tokenizer", str(changed)], "518 pieces do not fit"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert main(["resize", *[str(out) if a == "OUT" else a for a in args]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
        assert not out.exists()
    assert main(["resize", str(bare), str(new_tokenizer), str(tmp_path / "out"), "--base-tokenizer",
                 str(tokenizer_512)]) == 0


def test_continued_pretraining_grows_the_model_at_start_up(tmp_path, hf_folder, new_tokenizer, token_corpus, capsys):
    """train.init_from + train.init_tokenizer: the folder's model grown by subtoken_mean, trained on data tokenized
    with the new tokenizer (the model's vocab_size is the new tokenizer's)."""
    corpus = {"manifest": write_token_corpus(tmp_path / "tokens", {"web": 200}, new_tokenizer, vocab=518),
              "valid_manifest": write_token_corpus(tmp_path / "valid", {"web": 20}, new_tokenizer, vocab=518, seed=1,
                                                   name="valid.json")}
    grow = [f"train.init_from={hf_folder}", f"train.init_tokenizer={new_tokenizer}", "train.resume=none"]
    cfg = make_config(tmp_path / "run", corpus, "train.steps=1", "train.ckpt_every=1", "optim.lr=1e-9", *grow)
    from omegaconf import OmegaConf
    run = resolve(OmegaConf.to_container(cfg, resolve=True))
    assert (run.model.vocab_size, run.model.padded_vocab_size) == (518, 576)
    run_training(cfg)
    assert main(["resize", str(hf_folder), str(new_tokenizer), str(tmp_path / "grown")]) == 0
    trained, grown = final_weights(tmp_path / "run"), load(tmp_path / "grown").state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):  # one step at lr 1e-9: the start-up weights
        torch.testing.assert_close(trained[name], grown[name], rtol=0, atol=1e-6)
    assert math.isfinite(losses(tmp_path / "run")[1])

    # The data must be tokenized with the new tokenizer; init_tokenizer needs init_from.
    capsys.readouterr()
    for overrides, field in ((grow, "data.manifest"), ([f"train.init_tokenizer={new_tokenizer}"], "train.init_from")):
        with pytest.raises(SystemExit):
            run_training(make_config(tmp_path / "bad", token_corpus, "train.steps=1", *overrides))
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and field in err[0], err
    with pytest.raises(ConfigError, match="model.vocab_size=600 cannot be set with train.init_tokenizer"):
        resolve(OmegaConf.to_container(make_config(tmp_path / "bad", corpus, "model.vocab_size=600", *grow),
                                       resolve=True))
