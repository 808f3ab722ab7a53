"""Held-out perplexity against a computation by hand on the tiny model."""
import math

import numpy as np
import pytest
import torch

from llama_pt.data import IndexedDatasetWriter, SequentialWindows
from llama_pt.evaluation import evaluate_perplexity
from llama_pt.model import Llama, ModelConfig, get_preset

EOS = 2
SEQ = 16


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    rng = np.random.default_rng(5)
    docs = [np.append(rng.integers(3, 512, size=int(k)), EOS) for k in rng.integers(5, 40, size=9)]
    prefixes = [root / "valid_00000", root / "valid_00001"]
    for prefix, part in zip(prefixes, (docs[:4], docs[4:])):
        with IndexedDatasetWriter(prefix, 512) as w:
            for d in part:
                w.add_document(d)
    return prefixes, np.concatenate(docs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(get_preset("tiny"))


def nll_by_hand(model, stream, first_window=0, last_window=None, skip=None):
    """Sum and count of -log p(target) over windows [k*SEQ, k*SEQ+SEQ+1), one window at a time, float64."""
    total, count, k = 0.0, 0, first_window
    while k * SEQ + 1 < len(stream) and (last_window is None or k < last_window):
        w = torch.from_numpy(stream[k * SEQ:k * SEQ + SEQ + 1].astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(model(w[None, :-1])[0, :, :model.cfg.vocab_size].double(), dim=-1)
        for pos, target in enumerate(w[1:].tolist()):
            if target != skip:
                total -= logp[pos, target].item()
                count += 1
        k += 1
    return total, count


def test_perplexity_matches_hand_computation(held_out, model):
    prefixes, stream = held_out
    assert (len(stream) - 1) % SEQ != 0  # there is a short tail window
    model.train()
    out = evaluate_perplexity(model, prefixes, SEQ, batch_size=3, device="cpu")
    assert model.training  # mode restored
    total, count = nll_by_hand(model, stream)
    assert out["tokens"] == count == len(stream) - 1  # every token after the first, once
    assert out["nll"] == pytest.approx(total / count, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)
    n_full = (len(stream) - 1) // SEQ
    assert out["batches"] == math.ceil(n_full / 3) + 1
    # an untrained model is close to uniform over the vocabulary
    assert abs(out["nll"] - math.log(512)) < 0.5


def test_eos_targets_can_be_left_out_and_batches_capped(held_out, model):
    prefixes, stream = held_out
    out = evaluate_perplexity(model, prefixes, SEQ, batch_size=2, eos_id=EOS)
    total, count = nll_by_hand(model, stream, skip=EOS)
    assert out["tokens"] == count == len(stream) - 1 - int((stream[1:] == EOS).sum())
    assert out["nll"] == pytest.approx(total / count, rel=1e-6)
    capped = evaluate_perplexity(model, prefixes, SEQ, batch_size=2, max_batches=2)
    total, count = nll_by_hand(model, stream, last_window=4)
    assert capped["tokens"] == count == 4 * SEQ and capped["batches"] == 2
    assert capped["nll"] == pytest.approx(total / count, rel=1e-6)


def test_padding_ids_take_no_probability_mass(held_out):
    """Vocabulary 1000 padded to 1024: the perplexity is over the first 1000 logits, however large the others."""
    prefixes, stream = held_out
    torch.manual_seed(0)
    lm = Llama(ModelConfig(**{**get_preset("tiny").to_dict(), "vocab_size": 1000}))
    lm.output.register_forward_hook(lambda module, args, logits: logits + 1e4 * (torch.arange(1024) >= 1000))
    out = evaluate_perplexity(lm, prefixes, SEQ, batch_size=3)
    total, count = nll_by_hand(lm, stream)
    assert out["nll"] == pytest.approx(total / count, rel=1e-6) and abs(out["nll"] - math.log(1000)) < 0.5


def test_sequential_windows_cover_the_shards_in_order(held_out):
    prefixes, stream = held_out
    windows = SequentialWindows(prefixes, SEQ)
    pieces = [windows[k] for k in range(len(windows))]
    assert all(len(p) == SEQ + 1 for p in pieces[:-1]) and 2 <= len(pieces[-1]) <= SEQ
    rebuilt = np.concatenate([pieces[0]] + [p[1:] for p in pieces[1:]])
    assert np.array_equal(rebuilt, stream)
    with pytest.raises(ValueError, match="no held-out shard prefixes"):
        SequentialWindows([], SEQ)
