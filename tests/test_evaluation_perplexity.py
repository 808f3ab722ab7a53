"""Strided (sliding-window) perplexity against transformers running Hugging Face's "Perplexity of fixed-length
models" recipe on our export, and the perplexity command's --stride."""
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from support import english_text_files

from llama_pt.evaluation import strided_perplexity, strided_windows
from llama_pt.hf_interop import export_hf
from llama_pt.model import Llama, ModelConfig
from llama_pt.pretrained import main
from llama_pt.tokenizer import Tokenizer

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_512):
    torch.manual_seed(0)
    model = Llama(CFG).eval()
    folder = export_hf(model, CFG, tmp_path_factory.mktemp("hf") / "model", tokenizer_path=tokenizer_512,
                       dtype="float32")
    return model, LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), folder


def recipe(hf: LlamaForCausalLM, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The recipe as its page writes it, each window's mean loss weighted by the targets it averaged."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        averaged = int((target_ids[:, 1:] != -100).sum())  # the labels left after transformers' shift
        nll_sum += loss.double().item() * averaged
        n_tokens += averaged
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("max_length,stride", [(64, 16), (64, 64), (48, 20), (64, 1)])
def test_strided_perplexity_equals_the_recipe_with_transformers(exported, max_length, stride):
    ours, hf, _ = exported
    ids = torch.randint(3, CFG.vocab_size, (1, 301), generator=torch.Generator().manual_seed(1))
    if stride == 1:
        ids = ids[:, :72]  # one window per token: keep it short
    want, count = recipe(hf, ids, max_length, stride)
    got = strided_perplexity(ours, ids[0].tolist(), max_length, stride, batch_size=3)
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(want, rel=1e-5)
    assert got["windows"] == len(strided_windows(ids.size(1), max_length, stride))


def test_every_token_is_scored_once_with_up_to_max_length_context():
    for n, max_length, stride in [(301, 64, 16), (64, 64, 16), (100, 10, 10), (7, 4, 3)]:
        scored = [t for begin, end, first in strided_windows(n, max_length, stride) for t in range(first, end)]
        windows = strided_windows(n, max_length, stride)
        if stride < max_length:
            assert scored == list(range(1, n))  # every token but the first, in order, once
        else:  # disjoint windows: each window's first token has no context and goes unscored, as in the recipe
            assert scored == [t for t in range(1, n) if t % max_length]
        assert all(end - begin <= max_length for begin, end, _ in windows)
    with pytest.raises(ValueError, match="stride=65 must be in"):
        strided_windows(100, 64, 65)


def test_perplexity_command_with_stride(exported, tmp_path, tokenizer_512, capsys):
    ours, hf, folder = exported
    text = tmp_path / "wiki.test.raw"
    text.write_text(english_text_files()[0].read_text()[:3000])  # a licence, as WikiText's raw test file
    assert main(["perplexity", str(folder), "--text", str(text), "--stride", "16", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    ids = torch.tensor([Tokenizer(tokenizer_512).encode(text.read_text(), bos=True)])
    want, count = recipe(hf, ids, CFG.max_seq_len, 16)
    assert got["tokens"] == count and got["nll"] == pytest.approx(want, rel=1e-5)
    assert main(["perplexity", str(folder), "--text", str(text)]) == 2
    assert "--text needs --stride" in capsys.readouterr().err
