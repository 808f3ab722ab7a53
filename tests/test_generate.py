"""Sampling with a KV cache: exactness against full recompute and against transformers' greedy search."""
from pathlib import Path

import pytest
import torch

from llama_pt.generate import generate, sample_text, sample_top_p
from llama_pt.model import Llama, ModelConfig

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
PROMPTS = [[1, 5, 9, 33, 7, 100, 3], [1, 42], [1, 17, 17, 17, 90]]


@pytest.fixture(scope="module")
def model() -> Llama:
    """Random weights scaled up so the next-token distribution is peaked (greedy margins well above noise)."""
    torch.manual_seed(0)
    m = Llama(CFG).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    return m


def greedy_full_recompute(model: Llama, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Reference: re-run the whole sequence for every new token, no cache."""
    seq, step_logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            step_logits.append(logits)
            seq.append(int(logits.argmax()))
    return seq[len(prompt):], step_logits


def test_kv_cache_greedy_equals_full_recompute(model):
    out = generate(model, PROMPTS, max_new_tokens=20, temperature=0.0)
    for prompt, new in zip(PROMPTS, out):
        expected, _ = greedy_full_recompute(model, prompt, 20)
        assert new == expected
    assert len({tuple(x) for x in out}) == len(PROMPTS)  # the prompts do steer the model


def test_cached_logits_match_full_forward(model):
    """Decoding token by token through the cache reproduces the full causal forward pass."""
    from llama_pt.model import KVCache
    tokens = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    caches = [KVCache.empty(CFG, 2, 24, "cpu", torch.float32) for _ in range(CFG.n_layers)]
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :10], 0, caches)] + [model(tokens[:, t:t + 1], t, caches) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_top_p_to_zero_is_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=15, temperature=0.0)
    assert generate(model, PROMPTS, max_new_tokens=15, temperature=1.0, top_p=0.0, seed=3) == greedy
    assert generate(model, PROMPTS, max_new_tokens=15, temperature=1.0, top_p=1e-9, seed=4) == greedy


def test_sampling_is_seeded_and_differs_from_greedy(model):
    a = generate(model, PROMPTS, max_new_tokens=30, temperature=1.0, top_p=0.95, seed=11)
    b = generate(model, PROMPTS, max_new_tokens=30, temperature=1.0, top_p=0.95, seed=11)
    c = generate(model, PROMPTS, max_new_tokens=30, temperature=1.0, top_p=0.95, seed=12)
    assert a == b and a != c
    assert a != generate(model, PROMPTS, max_new_tokens=30, temperature=0.0)


def test_nucleus_sampling_keeps_only_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).repeat(4000, 1)
    picks = sample_top_p(probs, 0.7, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=4)
    # Nucleus of mass 0.7: tokens 1 (0.5) and 3 (0.3, mass above it 0.5 <= 0.7), renormalised to 5/8, 3/8.
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() / 4000 - 0.625) < 0.03
    assert (sample_top_p(probs[:5], 1.0, torch.Generator().manual_seed(0)) < 4).all()


def test_padding_ids_are_never_generated():
    """Vocabulary 1000 padded to 1024: even when the padding logits are huge, no sampled or greedy id is >= 1000,
    and greedy decoding picks what it picks over the first 1000 logits alone."""
    cfg = ModelConfig(**{**CFG.to_dict(), "vocab_size": 1000})
    torch.manual_seed(0)
    lm = Llama(cfg).eval()
    greedy = generate(lm, PROMPTS, max_new_tokens=10, temperature=0.0)
    lm.output.register_forward_hook(lambda module, args, logits: logits + 1e4 * (torch.arange(1024) >= 1000))
    with torch.no_grad():
        assert lm(torch.tensor([PROMPTS[0]]))[0, -1].argmax() >= 1000  # unmasked, the padding would win
    assert generate(lm, PROMPTS, max_new_tokens=10, temperature=0.0) == greedy
    sampled = generate(lm, PROMPTS, max_new_tokens=40, temperature=1.0, top_p=1.0, seed=0)
    assert max(max(row) for row in sampled) < 1000 and len({t for row in sampled for t in row}) > 20


def test_eos_ends_a_continuation(model):
    greedy = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)
    eos = greedy[0][5]
    stopped = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=eos)
    for full, cut in zip(greedy, stopped):
        assert cut == (full[:full.index(eos)] if eos in full else full)


def test_batch_equals_one_prompt_at_a_time(model):
    batched = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0)
    assert batched == [generate(model, [p], max_new_tokens=10, temperature=0.0)[0] for p in PROMPTS]


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 60], max_new_tokens=5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=1, top_p=1.5)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [[]], max_new_tokens=1)


def test_greedy_matches_transformers_generate(model, tmp_path):
    from transformers import LlamaForCausalLM

    from llama_pt.hf_interop import export_hf
    hf = LlamaForCausalLM.from_pretrained(export_hf(model, CFG, tmp_path / "hf"), dtype=torch.float32).eval()
    first = generate(model, PROMPTS, max_new_tokens=1, temperature=0.0)[1][0]
    for eos in (None, first):  # the greedy choice at once for one of the prompts: an empty continuation
        ours = generate(model, PROMPTS, max_new_tokens=24, temperature=0.0, eos_id=eos)
        for prompt, new in zip(PROMPTS, ours):
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                              eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
            if eos is None:
                assert len(out) == 24
            elif eos in out:
                out = out[:out.index(eos)]
            assert out == new
    assert [] in ours


def test_sample_text_continues_the_prompt(model, tmp_path):
    from llama_pt.tokenizer import Tokenizer, train_sentencepiece
    text = Path("/usr/share/common-licenses/GPL-3").read_text(encoding="utf-8")
    tok = Tokenizer(train_sentencepiece([text], tmp_path / "spm", CFG.vocab_size + 300))
    cfg = ModelConfig(**{**CFG.to_dict(), "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    lm = Llama(cfg)
    prompt = "The GNU General Public License"
    out = sample_text(lm, tok, prompt, max_new_tokens=12, seed=0)
    assert out.startswith(prompt) and len(out) > len(prompt)
    assert out == sample_text(lm, tok, prompt, max_new_tokens=12, seed=0)
