"""Document masking: packed documents compute what each computes alone, in the kernels, the model (every
activation mode) and the loss; the loss mask's gradient and target invariance."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_pt.blocks import apply_activation_mode
from llama_pt.data.batch import documents_from_eos, read_micro_batch
from llama_pt.model import Llama, get_preset
from llama_pt.ops.attention import causal_attention
from llama_pt.ops.attention_kernels import attention_backward, attention_forward
from llama_pt.ops.documents import DocumentMask, document_positions
from llama_pt.parallel.cross_entropy import vocab_parallel_cross_entropy

LENGTHS = [[5, 1, 11, 7], [24]]  # two rows of 24 tokens; a one-token document, a row that is one document


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _documents(lengths=LENGTHS) -> torch.Tensor:
    """[rows, 24] document numbers, deliberately not 0, 1, 2 (only the runs matter)."""
    return torch.stack([torch.cat([torch.full((n,), 7 * i + 3) for i, n in enumerate(row)]) for row in lengths])


def test_mask_forms_agree_with_the_documents():
    mask = DocumentMask(_documents())
    assert mask.positions[0].tolist() == [*range(5), 0, *range(11), *range(7)]
    assert mask.positions[1].tolist() == list(range(24))
    assert torch.equal(document_positions(_documents()), mask.positions)
    assert mask.lengths() == [5, 1, 11, 7, 24]
    cu, longest = mask.cu_seqlens()
    assert cu.tolist() == [0, 5, 6, 17, 24, 48] and cu.dtype == torch.int32 and longest == 24
    visible = mask.visible()[:, 0]
    runs = mask.run_ids()
    for b in range(2):
        for i in range(24):
            for j in range(24):
                assert visible[b, i, j] == (j <= i and runs[b, i] == runs[b, j])
    additive = mask.additive(torch.float32, key_align=16)
    assert additive.shape == (2, 1, 24, 24) and additive.stride(-2) == 32
    assert torch.equal(additive == 0, mask.visible())


def test_documents_from_eos_end_each_document_with_its_eos():
    tokens = torch.tensor([[5, 6, 2, 7, 2, 2, 8, 9]])
    assert documents_from_eos(tokens, 2).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    micro = read_micro_batch(torch.tensor([[5, 6, 2, 7, 8]]), document_mask=True, eos_id=2)
    assert micro.documents.tolist() == [[0, 0, 0, 1]] and micro.scored is None


def _alone(q, k, v, lengths, fn):
    """fn(q, k, v) of every document on its own, concatenated back into rows."""
    rows = []
    for b, row in enumerate(lengths):
        starts = [sum(row[:i]) for i in range(len(row))]
        rows.append(torch.cat([fn(q[b:b + 1, a:a + n], k[b:b + 1, a:a + n], v[b:b + 1, a:a + n])
                               for a, n in zip(starts, row)], dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kernels_with_documents_match_each_document_alone(kernel, dtype, tol):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, h, 8, generator=g, dtype=dtype) for h in (4, 2, 2))
    grad = torch.randn(2, 24, 4, 8, generator=g, dtype=dtype)
    mask = DocumentMask(_documents())
    state = attention_forward(q, k, v, kernel, mask)
    want = _alone(q, k, v, LENGTHS, lambda *t: causal_attention(*t))
    torch.testing.assert_close(state.out, want, rtol=tol, atol=tol)
    # The log-sum-exp is that of each query's own document's causal scores.
    want_lse = _alone(q, k, v, LENGTHS, lambda q1, k1, v1: attention_forward(q1, k1, v1, "math").lse.transpose(1, 2))
    torch.testing.assert_close(state.lse, want_lse.transpose(1, 2).to(state.lse.dtype), rtol=tol, atol=tol)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _alone(*leaves, LENGTHS, lambda *t: causal_attention(*t)).backward(grad)
    for got, leaf in zip(attention_backward(grad, q, k, v, state), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=tol, atol=tol)


def test_plain_path_with_documents_is_block_diagonal_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 24, h, 8, generator=g, dtype=torch.float64) for h in (4, 1, 1))
    got = causal_attention(q, k, v, documents=DocumentMask(_documents()))
    torch.testing.assert_close(got, _alone(q, k, v, LENGTHS, lambda *t: causal_attention(*t)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="KV cache"):
        causal_attention(q[:, :1], k, v, q_offset=23, documents=DocumentMask(_documents()))


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_packed_examples_give_the_logits_and_gradients_of_each_alone(mode):
    """fp32, tiny model: every example's logits in the packed row equal those of the example run alone
    (positions restarting, no attention across); so do the gradients of the summed losses."""
    torch.manual_seed(0)
    model = apply_activation_mode(Llama(get_preset("tiny")), mode)
    lengths = [9, 30, 4, 21]
    examples = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    tokens = torch.cat(examples)[None]
    documents = _documents([lengths])
    packed = model(tokens, positions=document_positions(documents), documents=documents)
    F.cross_entropy(packed[0, :-1], tokens[0, 1:], reduction="sum").backward()  # cross-example targets too
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.cat([model(e[None]) for e in examples], dim=1)
    targets = tokens[0, 1:].clone()
    loss = F.cross_entropy(alone[0, :-1], targets, reduction="sum")
    loss.backward()
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        err = ((want_grads[name] - p.grad).norm() / p.grad.norm()).item()
        assert err <= 1e-5, (name, err)


def test_the_loss_mask_zeroes_prompt_gradients_and_ignores_prompt_targets():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 16, 64, generator=g, requires_grad=True)
    targets = torch.randint(0, 60, (2, 16), generator=g)
    scored = torch.rand(2, 16, generator=g) < 0.4
    loss = vocab_parallel_cross_entropy(logits, targets, None, 60, scored=scored, normalizer=5.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(grad[~scored]) == 0 and torch.count_nonzero(grad[scored]) > 0
    other = torch.where(scored, targets, (targets + 17) % 60)
    assert torch.equal(vocab_parallel_cross_entropy(logits, other, None, 60, scored=scored, normalizer=5.0), loss)
    want = F.cross_entropy(logits[..., :60][scored], targets[scored], reduction="sum") / 5.0
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    mean = vocab_parallel_cross_entropy(logits, targets, None, 60, scored=scored)  # default: over the scored
    torch.testing.assert_close(mean, F.cross_entropy(logits[..., :60][scored], targets[scored]), rtol=1e-6, atol=0)
