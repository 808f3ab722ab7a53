"""Autoregressive sampling with a KV cache: greedy, temperature and nucleus (top-p) sampling.

Nucleus sampling (Holtzman et al. 2020, Section 3.1): sample from the smallest set of most likely
tokens whose cumulative probability reaches p, renormalised. Prompts of different lengths are decoded
together the way Meta's reference sampler does it: every row advances from the shortest prompt's end,
and a row whose prompt is longer keeps its prompt token at that position instead of the sample. Causal
attention makes this exact: a position only ever attends to real (prompt or generated) tokens.
The padding ids of the vocabulary are never chosen (llama_pt.model.vocab).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from .model import KVCache, Llama, mask_padded_vocab


def sample_top_p(probs: torch.Tensor, top_p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of probs [batch, vocab] from the nucleus of mass top_p; returns [batch] ids.

    A token is kept when the mass of the tokens ranked above it is at most top_p, so the most likely
    token is always kept and top_p=0 is greedy.
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_above > top_p, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return torch.gather(order, -1, choice).squeeze(-1)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token for each row of logits [batch, vocab]; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator)


@torch.inference_mode()
def generate(model: Llama, prompt_tokens: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.8, top_p: float = 0.95, eos_id: Optional[int] = None,
             seed: Optional[int] = None) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens; returns the new tokens only (not the prompt).

    A continuation ends before the first eos_id it produces. `seed` makes sampling reproducible.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in [0, 1]")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    cfg = model.cfg
    lengths = [len(p) for p in prompt_tokens]
    total = max(lengths) + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"longest prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds model.max_seq_len={cfg.max_seq_len}")
    param = next(model.parameters())
    device, batch = param.device, len(prompt_tokens)
    tokens = torch.zeros((batch, total), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompt_tokens):
        tokens[row, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long, device=device)
    in_prompt = torch.arange(total, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    caches = [KVCache.empty(cfg, batch, total, device, param.dtype) for _ in range(cfg.n_layers)]
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    try:
        prev = 0
        for pos in range(min(lengths), total):
            logits = model(tokens[:, prev:pos], start_pos=prev, caches=caches)[:, -1]
            chosen = next_tokens(mask_padded_vocab(logits, cfg.vocab_size), temperature, top_p, generator)
            tokens[:, pos] = torch.where(in_prompt[:, pos], tokens[:, pos], chosen)
            if eos_id is not None:
                done |= ~in_prompt[:, pos] & (tokens[:, pos] == eos_id)
                if bool(done.all()):
                    break
            prev = pos
    finally:
        model.train(was_training)

    out = []
    for row, n in enumerate(lengths):
        new = tokens[row, n:n + max_new_tokens].tolist()
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id)]
        out.append(new)
    return out


@torch.inference_mode()
def stream_tokens(model: Llama, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.8,
                  top_p: float = 0.95, eos_id: Optional[int] = None,
                  generator: Optional[torch.Generator] = None) -> Iterator[int]:
    """The continuation of one prompt, one token at a time as each is chosen (for streaming to a terminal); it
    ends before eos_id, or after max_new_tokens. The same choices as `generate` with the same generator."""
    cfg = model.cfg
    if not prompt or len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new exceeds model.max_seq_len="
                         f"{cfg.max_seq_len} (or is empty)")
    param = next(model.parameters())
    caches = [KVCache.empty(cfg, 1, len(prompt) + max_new_tokens, param.device, param.dtype)
              for _ in range(cfg.n_layers)]
    was_training = model.training
    model.eval()
    try:
        window, start = torch.tensor([list(prompt)], dtype=torch.long, device=param.device), 0
        for _ in range(max_new_tokens):
            logits = model(window, start_pos=start, caches=caches)[:, -1]
            token = int(next_tokens(mask_padded_vocab(logits, cfg.vocab_size), temperature, top_p, generator)[0])
            if token == eos_id:
                return
            yield token
            start += window.shape[1]
            window = torch.tensor([[token]], dtype=torch.long, device=param.device)
    finally:
        model.train(was_training)


def sample_text(model: Llama, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                top_p: float = 0.95, seed: Optional[int] = None) -> str:
    """The prompt followed by a sampled continuation (BOS prepended, stops at the tokenizer's EOS)."""
    prompt_ids = tokenizer.encode(prompt, bos=True)
    new = generate(model, [prompt_ids], max_new_tokens, temperature=temperature, top_p=top_p,
                   eos_id=tokenizer.eos_id, seed=seed)[0]
    return tokenizer.decode(prompt_ids + new)
