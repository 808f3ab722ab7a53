"""Writes the small multiple-choice tasks of data/eval/ from the demo's training text (demo/corpus.py: Python
standard-library docstrings and the licence texts of /usr/share/common-licenses), in the item formats of three
of the LLaMA paper's benchmarks (Touvron et al. 2023, Sec. 3.1) as lm-eval reads them:

- demo_hellaswag.jsonl (HellaSwag: activity_label, ctx_a, ctx_b, endings, label): a docstring sentence (ctx_a),
  the first three words of the next one (ctx_b), and four endings: the next three words, and three words from
  the middle of licence sentences;
- demo_piqa.jsonl (PIQA: goal, sol1, sol2, label): the first half of a docstring sentence, and two solutions:
  its next three words, and three words from the middle of a licence sentence;
- demo_arc.jsonl (ARC: id, question, choices {text, label}, answerKey): a licence or docstring sentence
  without its last word, and four last words of such sentences to choose from.

Easy items (the distractors come from the other kind of text, or are any sentence's last word), so that the
demo's tiny model can do better than chance; the tests use the files to check the harness, not a model.
Deterministic for one Python version (its docstrings):
    python scripts/make_demo_eval_tasks.py [--items 40] [--out data/eval]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo.corpus import license_texts, python_docstrings  # noqa: E402

ENDING = 3  # words in a HellaSwag ending or a PIQA solution
PROSE = re.compile(r"^[A-Z][A-Za-z ,;'-]+[a-z]\.$")  # one plain English sentence: no code, digits or markup


def sentences(text: str) -> list[str]:
    """The plain prose sentences of a text, in order, whitespace collapsed."""
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=\.)\s+", flat)
            if PROSE.match(s) and "--" not in s and 8 <= len(s.split()) <= 30]


def chunks(texts: list[str]) -> list[str]:
    """ENDING words from the middle of each sentence of the texts: the other domain's text, as distractors."""
    return sorted({" ".join(s.split()[len(s.split()) // 2:][:ENDING]) for t in texts for s in sentences(t)})


def hellaswag(rng: random.Random, docs: list[dict], others: list[str], n: int) -> list[dict]:
    pairs = [(doc, a, b) for doc in docs for a, b in zip(sentences(doc["text"]), sentences(doc["text"])[1:])]
    distractors = chunks(others)
    items = []
    for ind, (doc, a, b) in enumerate(rng.sample(pairs, n)):
        words = b.split()
        true = " ".join(words[3:3 + ENDING])
        endings = rng.sample(distractors, 3)
        label = rng.randrange(4)
        endings.insert(label, true)
        module = doc["id"].split(":")[0].removesuffix(".py").replace("/", ".")
        items.append({"ind": ind, "activity_label": module, "ctx_a": a, "ctx_b": " ".join(words[:3]).lower(),
                      "endings": endings, "label": str(label), "source_id": doc["id"]})
    return items


def piqa(rng: random.Random, texts: list[str], others: list[str], n: int) -> list[dict]:
    pool = sorted({s for t in texts for s in sentences(t)})
    distractors = chunks(others)
    items = []
    for s in rng.sample(pool, n):
        words = s.split()
        cut = len(words) // 2
        true = " ".join(words[cut:cut + ENDING])
        other = rng.choice(distractors)
        label = rng.randrange(2)
        sols = [other, true] if label else [true, other]
        items.append({"goal": " ".join(words[:cut]), "sol1": sols[0], "sol2": sols[1], "label": label})
    return items


def arc(rng: random.Random, texts: list[str], n: int) -> list[dict]:
    pool = sorted({s for t in texts for s in sentences(t)})
    last_words = sorted({s.split()[-1].rstrip(".") for s in pool})
    items = []
    for k, s in enumerate(rng.sample(pool, n)):
        words = s.split()
        answer = words[-1].rstrip(".")
        choices = rng.sample([w for w in last_words if w != answer], 3)
        key = rng.randrange(4)
        choices.insert(key, answer)
        items.append({"id": f"demo_arc_{k:03d}", "question": " ".join(words[:-1]),
                      "choices": {"text": choices, "label": list("ABCD")}, "answerKey": "ABCD"[key]})
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "data" / "eval")
    args = parser.parse_args()
    rng = random.Random(2023)
    docs = list(python_docstrings())
    licences = [d["text"] for d in license_texts()]
    docstrings = [d["text"] for d in docs]
    tasks = {"demo_hellaswag": hellaswag(rng, docs, licences, args.items),
             "demo_piqa": piqa(rng, docstrings, licences, args.items),
             "demo_arc": arc(rng, licences + docstrings, args.items)}
    for name, items in tasks.items():
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
        print(f"{path}: {len(items)} items")


if __name__ == "__main__":
    main()
