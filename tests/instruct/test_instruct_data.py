"""Instruction data: readers that skip bad records by reason, templates whose loss mask is exactly the responses,
and packed windows that are a pure function of (seed, index)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llama_pt.config import ConfigError, known_templates
from llama_pt.data.batch import DOCUMENTS, SCORED, TOKENS
from llama_pt.instruct import (Conversation, InstructSamples, build_examples, encode, load_template,
                               read_conversations)
from llama_pt.tokenizer import Tokenizer
from support import REPO
from support.instruct_data import short_records

DATA = [REPO / "data" / "instruct" / "alpaca_stdlib.jsonl", REPO / "data" / "instruct" / "sharegpt_stdlib.json"]


def test_readers_count_and_skip_bad_records_with_file_and_line(tmp_path):
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text("\n".join([
        json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}),
        '{"instruction": "broken", ',
        json.dumps({"instruction": "No output.", "input": ""}),
        "",
        json.dumps({"instruction": "Bad input.", "input": 3, "output": "x"}),
        json.dumps({"instruction": "  ", "input": "", "output": "x"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"instruction": " Add. ", "input": "1 2", "output": " 3 "}),
        json.dumps({"instruction": "No input field.", "output": "Kept."}),  # the input is optional
    ]) + "\n")
    turn = lambda who, text: {"from": who, "value": text}  # noqa: E731
    records = [
        {"conversations": [turn("system", "Be brief."), turn("human", "Q1"), turn("gpt", "A1"), turn("human", "Q2"),
                           turn("gpt", "A2")]},
        {"conversations": [turn("human", "Q"), turn("bard", "A")]},
        {"conversations": [turn("human", "Q"), turn("human", "Q again"), turn("gpt", "A")]},
        {"conversations": [turn("human", "Q"), turn("gpt", "A"), turn("human", "Q2")]},
        {"conversations": [turn("human", "Q"), turn("system", "late"), turn("gpt", "A")]},
        {"conversations": []},
        {"conversations": [turn("gpt", "A")]},
    ]
    sharegpt = tmp_path / "s.json"
    body = ",\n".join(json.dumps(r) for r in records)
    sharegpt.write_text(f"[\n{body},\n{{\"conversations\": [oops]}},\n{json.dumps(records[0])}\n]\n")
    warnings = []
    conversations, report = read_conversations([alpaca, sharegpt], warn=warnings.append)
    assert dict(report.skipped) == {"malformed_json": 2, "missing_output": 1, "input_not_a_string": 1,
                                    "empty_instruction": 1, "not_an_object": 1, "unknown_role": 1,
                                    "roles_not_alternating": 2, "no_final_response": 1, "misplaced_system": 1,
                                    "empty_conversations": 1}
    assert report.read == 16 and report.kept == 4 == len(conversations)
    assert len(warnings) == 12 and all("\n" not in w and w.startswith("warning: ") for w in warnings)
    assert f"{alpaca}:2: skipped (malformed_json)" in warnings[0]
    assert f"{alpaca}:3: skipped (missing_output)" in warnings[1]
    assert f"{sharegpt}:3: skipped (unknown_role)" in warnings[5]
    assert f"{sharegpt}:9: skipped (malformed_json)" in warnings[-1]  # the rest of the array is not read
    assert report.summary().startswith("instruction records: 16 read, 4 kept; skipped: 1 empty_conversations")
    assert conversations[0] == Conversation((("user", "Say hi."), ("assistant", "Hi.")), where=f"{alpaca}:1")
    assert conversations[1].turns == (("user", "Add."), ("assistant", "3")) and conversations[1].input == "1 2"
    assert conversations[2].turns == (("user", "No input field."), ("assistant", "Kept.")) and conversations[2].input is None
    assert conversations[3].system == "Be brief."
    assert [role for role, _ in conversations[3].turns] == ["user", "assistant"] * 2


def test_the_committed_data_set_reads_cleanly():
    conversations, report = read_conversations(DATA, warn=pytest.fail)
    assert report.kept == report.read == len(conversations) >= 400
    assert sum(p.stat().st_size for p in DATA) < 1_000_000
    multi = [c for c in conversations if len(c.turns) >= 4]
    assert len(multi) >= 30 and any(c.system for c in multi) and sum(c.input is not None for c in conversations) > 100


CONVERSATION = Conversation((("user", "What does `json.dumps` do?"), ("assistant", "Serialize ``obj`` to a JSON str."),
                             ("user", "And {loads}?"), ("assistant", 'The reverse: {"a": 1} -> dict.')),
                            system="Be brief.")
Q1, A1, Q2, A2 = (text for _, text in CONVERSATION.turns)
BOS, EOS = "<bos>", "<eos>"
H = "<|start_header_id|>{}<|end_header_id|>\n\n"
# The published formats, written out by hand: (text or BOS/EOS, counted by the loss).
EXPECTED = {
    "alpaca": [(BOS, 0), (f"Be brief.\n\n### Instruction:\n{Q1}\n\n### Response:\n", 0), (A1, 1), (EOS, 1),
               (f"### Instruction:\n{Q2}\n\n### Response:\n", 0), (A2, 1), (EOS, 1)],
    "vicuna_v1.1": [(BOS, 0), (f"Be brief. USER: {Q1} ASSISTANT:", 0), (f" {A1}", 1), (EOS, 1),
                    (f"USER: {Q2} ASSISTANT:", 0), (f" {A2}", 1), (EOS, 1)],
    "llama2": [(BOS, 0), (f"[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{Q1} [/INST]", 0), (f" {A1} ", 1), (EOS, 1),
               (BOS, 0), (f"[INST] {Q2} [/INST]", 0), (f" {A2} ", 1), (EOS, 1)],
    "llama3": [(BOS, 0), (H.format("system") + "Be brief.<|eot_id|>" + H.format("user") + f"{Q1}<|eot_id|>"
                          + H.format("assistant"), 0), (f"{A1}<|eot_id|>", 1),
               (H.format("user") + f"{Q2}<|eot_id|>" + H.format("assistant"), 0), (f"{A2}<|eot_id|>", 1)],
}


def _expected_tokens(pieces, tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """Each piece tokenized on its own (a text after BOS, or first, as a sentence start), concatenated."""
    ids, scored, after_bos = [], [], True
    for piece, counted in pieces:
        if piece in (BOS, EOS):
            part = [tok.bos_id if piece == BOS else tok.eos_id]
        else:
            part = tok.encode(piece) if after_bos else tok.encode_continuation(piece)
        after_bos = piece == BOS
        ids += part
        scored += [bool(counted)] * len(part)
    return ids, scored


def _runs(ids, scored) -> list[list[int]]:
    runs, current = [], []
    for i, s in zip(ids, scored):
        if s:
            current.append(int(i))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", ["alpaca", "vicuna_v1.1", "llama2", "llama3"])
def test_every_template_masks_exactly_the_responses(name, tokenizer_512):
    tok = Tokenizer(tokenizer_512)
    ids, scored = encode(CONVERSATION, load_template(name), tok)
    want_ids, want_scored = _expected_tokens(EXPECTED[name], tok)
    assert ids.tolist() == want_ids and scored.tolist() == want_scored
    # Each run of counted tokens is one response: its text tokenized alone, then EOS where the format ends so.
    responses = [tok.encode_continuation(text) for text, counted in EXPECTED[name] if counted and text != EOS]
    if name != "llama3":
        responses = [r + [tok.eos_id] for r in responses]
    assert _runs(ids, scored) == responses


def test_alpaca_input_and_defaults(tokenizer_512):
    tok, alpaca = Tokenizer(tokenizer_512), load_template("alpaca")
    record = Conversation((("user", "Sum."), ("assistant", "3")), input="1 2")
    ids, scored = encode(record, alpaca, tok)
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nSum.\n\n### Input:\n"
              "1 2\n\n### Response:\n")
    assert (ids.tolist(), scored.tolist()) == _expected_tokens([(BOS, 0), (prompt, 0), ("3", 1), (EOS, 1)], tok)
    ids, _ = encode(record, load_template("vicuna_v1.1"), tok)  # no user_with_input: the input follows the instruction
    assert "USER: Sum.\n\n1 2 ASSISTANT:" in tok.decode(ids.tolist())


def test_llama3_headers_as_user_defined_pieces_keep_the_mask_exact(tmp_path, tokenizer_512):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer_512.read_bytes())
    for marker in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        piece = proto.pieces.add()
        piece.piece, piece.score = marker, 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    path = tmp_path / "markers.model"
    path.write_bytes(proto.SerializeToString())
    tok = Tokenizer(path)
    eot = tok.vocab_size - 1
    assert tok.encode_continuation("<|eot_id|>") == [eot]
    ids, scored = encode(CONVERSATION, load_template("llama3"), tok)
    assert (ids.tolist(), scored.tolist()) == _expected_tokens(EXPECTED["llama3"], tok)
    assert [run[-1] for run in _runs(ids, scored)] == [eot, eot]


def test_templates_are_refused_in_one_line(tmp_path):
    assert known_templates() == ["alpaca", "llama2", "llama3", "vicuna_v1.1"]
    with pytest.raises(ConfigError, match=r"^task.template='chatml' is unknown \(known: alpaca, llama2, llama3, "
                                          r"vicuna_v1.1; or a .yaml file\)$"):
        load_template("chatml")
    bad = tmp_path / "bad.yaml"
    bad.write_text('user: "{content} {answer}"\nassistant: "{content}"\n')
    with pytest.raises(ConfigError, match=r"user: field \{answer\} is not allowed here"):
        load_template(str(bad))
    bad.write_text('user: "{content}"\n')
    with pytest.raises(ConfigError, match="assistant is missing"):
        load_template(str(bad))
    own = tmp_path / "plain.yaml"
    own.write_text('user: "Q: {content}\\nA:"\nassistant: " {content}{eos}"\n')
    assert load_template(str(own)).user == "Q: {content}\nA:"


def test_long_examples_are_cut_to_the_window(tokenizer_512):
    conversations, _ = read_conversations(DATA, warn=pytest.fail)
    examples, cut = build_examples(conversations, load_template("llama2"), Tokenizer(tokenizer_512), 129)
    assert cut["truncated"] > cut["dropped_no_response_left"] > 0
    assert len(examples) == len(conversations) - cut["dropped_no_response_left"]
    assert max(len(e.ids) for e in examples) == 129 and all(e.scored.any() for e in examples)


def _examples(tok, tmp_path):
    conversations, _ = read_conversations([short_records(tmp_path / "short.jsonl")], warn=pytest.fail)
    examples, cut = build_examples(conversations, load_template("llama2"), tok, 129)
    assert not cut
    return examples


@pytest.mark.parametrize("packing", [True, False])
def test_windows_hold_every_example_once_per_epoch(tokenizer_512, tmp_path, packing):
    tok = Tokenizer(tokenizer_512)
    examples = _examples(tok, tmp_path)
    samples = InstructSamples(examples, 128, seed=3, packing=packing, pad_id=tok.eos_id)
    per_epoch = len(samples.plan(0))
    assert per_epoch == len(examples) if not packing else per_epoch < 0.75 * len(examples)
    seen = []
    for g in range(per_epoch):
        window = samples[g]
        assert window.shape == (3, 129) and window.dtype == np.int64
        docs = window[DOCUMENTS]
        assert (np.diff(docs) >= 0).all() and docs[0] == 0
        for d in range(int(docs.max()) + 1):
            at = docs == d
            tokens, scored = window[TOKENS][at], window[SCORED][at].astype(bool)
            if d == len(samples.plan(0)[g]):  # the padding
                assert (tokens == tok.eos_id).all() and not scored.any()
                continue
            assert not scored[0]  # an example starts with its prompt: no target across examples is scored
            seen.append((tokens.tobytes(), scored.tobytes()))
    assert sorted(seen) == sorted((e.ids.astype(np.int64).tobytes(), e.scored.tobytes()) for e in examples)


def test_window_order_is_a_pure_function_of_seed_and_index(tokenizer_512, tmp_path):
    examples = _examples(Tokenizer(tokenizer_512), tmp_path)
    a, b = (InstructSamples(examples, 128, seed=3, packing=True, pad_id=2) for _ in range(2))
    late = [b[g] for g in (500, 40, 3)]  # b reaches later epochs first
    assert all(np.array_equal(x, a[g]) for x, g in zip(late, (500, 40, 3)))
    other = InstructSamples(examples, 128, seed=4, packing=True, pad_id=2)
    assert not np.array_equal(other[3], a[3])
    assert a.plan(0) != a.plan(1)  # each epoch its own order
