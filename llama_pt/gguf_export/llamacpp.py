"""llama.cpp itself running a GGUF file, in this process: the `xllamacpp` wheel, a prebuilt CPU build of llama.cpp's
server (no compiler, nothing fetched). `xllamacpp.Server` loads the file and answers completion requests in-process
(`handle_completions`, the OpenAI-style /v1/completions of llama.cpp's tools/server); it also listens on
127.0.0.1 at a random port, where the server's native /completion and /tokenize endpoints are reached.

- `greedy`: llama.cpp's greedy continuation of a prompt given as token ids (temperature 0, up to end of generation).
- `tokenize`: llama.cpp's tokenizer (the GGUF file's vocabulary), BOS added as the file says.
- `token_logprobs` / `perplexity`: log p(token | the tokens before it) from llama.cpp's logits. One completion of
  one token per position, the prompt the tokens so far: the server reuses its KV cache for the common prefix
  (`cache_prompt`), so each request evaluates one new token. The server reports probabilities before sampling
  (the softmax of the raw logits, its `populate_token_probs`) for the token it samples, which a one-token grammar
  `root ::= <[id]>` (llama.cpp's GBNF token-id syntax) forces to be the true next token. Two kinds of token cannot
  be forced so: a byte piece 0x80-0xFF, whose text leaves the output inside a UTF-8 character, so that the server
  withholds it and its probabilities (its `process_token`); and control pieces such as EOS, which the grammar
  sampler allows only where the grammar may end (and the NUL byte piece, which it refuses as well). For those a
  normal piece is forced instead and the true token's log-probability is read from the whole distribution
  (`n_probs` = the vocabulary size).
"""
from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

import gguf


def _token_classes(path: Path) -> tuple[int, set[int], int]:
    """(vocabulary size, the ids a one-token grammar cannot force, the first normal piece) of a GGUF file.

    Forced are normal and user-defined pieces and the byte pieces 0x01-0x7F; not the byte pieces 0x80-0xFF (never
    complete UTF-8 alone) and 0x00, nor control, unknown and unused pieces (the grammar sampler allows an end of
    generation token only where the grammar may end, and refuses the others here; tests/test_gguf.py scores every
    id of a vocabulary)."""
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    text = (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED)
    unforceable = {i for i, (piece, kind) in enumerate(zip(tokens, types))
                   if kind not in text and not (kind == gguf.TokenType.BYTE and 0 < int(piece[3:5], 16) < 0x80)}
    return len(tokens), unforceable, types.index(gguf.TokenType.NORMAL)


class LlamaCpp:
    """A GGUF file loaded by llama.cpp (xllamacpp.Server), one sequence at a time, `n_ctx` tokens of context.

    By default it runs as llama.cpp does out of the box: keys and values cached in f16, flash attention chosen by
    llama.cpp (on in this CPU build, whose kernel rounds to f16 along the way even over an f32 cache).
    `f32_attention` caches them in f32 and turns flash attention off: attention then runs in float32 throughout,
    which is how an f32 file is compared with our float32 model to within float rounding."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int = 2, f32_attention: bool = False):
        import xllamacpp
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self.n_vocab, self._unforceable, self._complete_piece = _token_classes(self.path)
        params = xllamacpp.CommonParams()
        params.model.path = str(self.path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        if f32_attention:
            params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
            params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.verbosity = -1
        self._server = xllamacpp.Server(params)

    def _complete(self, request: dict) -> dict:
        response = self._server.handle_completions({"temperature": 0.0, "cache_prompt": True, **request})
        if "error" in response:
            raise RuntimeError(f"llama.cpp ({self.path.name}): {response['error'].get('message', response['error'])}")
        return response["choices"][0]

    def _post(self, endpoint: str, body: dict) -> dict:
        """A request to the server's own HTTP endpoint (llama.cpp's native API, not the OpenAI-style one)."""
        request = urllib.request.Request(f"{self._server.listening_address}{endpoint}", method="POST",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as answer:
            return json.loads(answer.read())

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """The ids llama.cpp's greedy decoding appends to `prompt` (ids; no BOS added), at most `max_new_tokens`,
        ending before the first end-of-generation token, as `llama_pt.generate.generate` with eos_id does.
        (llama.cpp's `ignore_eos` is not used: it biases those tokens to -inf, which changes the argmax.) The
        native /completion endpoint returns every id (`return_tokens`); the per-token probabilities of the
        OpenAI-style one leave out the byte pieces it withholds (see the module's docstring)."""
        answer = self._post("/completion", {"prompt": [int(t) for t in prompt], "n_predict": max_new_tokens,
                                            "temperature": 0.0, "return_tokens": True, "cache_prompt": True})
        ids = [int(t) for t in answer["tokens"]]
        return ids[:-1] if answer.get("stop_type") == "eos" else ids

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids for `text`, with BOS if the file's tokenizer.ggml.add_bos_token says so."""
        return self._post("/tokenize", {"content": text, "add_special": True})["tokens"]

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = 1 ... len(ids) - 1."""
        out = []
        for i in range(1, len(ids)):
            target = int(ids[i])
            whole = target in self._unforceable
            forced = self._complete_piece if whole else target
            choice = self._complete({"prompt": [int(t) for t in ids[:i]], "n_predict": 1,
                                     "grammar": f"root ::= <[{forced}]>", "n_probs": self.n_vocab if whole else 1})
            entry = choice["logprobs"]["content"][0]
            if whole:
                out.append(next(e["logprob"] for e in entry["top_logprobs"] if e["id"] == target))
            else:
                out.append(entry["logprob"])
        return out

    def perplexity(self, windows: Iterable[Sequence[int]]) -> float:
        """exp of the mean negative log-likelihood of every token but the first of each window (each window is
        scored from an empty context)."""
        logprobs = [lp for window in windows for lp in self.token_logprobs(window)]
        return math.exp(-sum(logprobs) / len(logprobs))
