"""Write data/instruct/: a small instruction data set about what the demo model read (Python standard-library
docstrings and licence texts), for the tests and `task=sft`.

    python scripts/make_instruct_data.py [--out data/instruct]

Every answer is real text: the first paragraph of a docstring of the installed standard library (read with
`ast`, nothing imported), or a paragraph of a licence under /usr/share/common-licenses. The questions are
written here. Two files, both deterministic for a given Python and Debian installation:
- alpaca_stdlib.jsonl   Alpaca records (instruction, input, output): what a function does (asked by name, or
                        with its signature as the input), which function a docstring describes, what a module
                        is for, a licence's first substantial paragraph;
- sharegpt_stdlib.json  ShareGPT conversations ({"conversations": [{"from", "value"}]}), several turns each
                        about one module's functions, some with a system message.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sysconfig
from pathlib import Path

MODULES = ["json/__init__.py", "textwrap.py", "shutil.py", "string.py", "functools.py", "heapq.py", "bisect.py",
           "fnmatch.py", "glob.py", "base64.py", "difflib.py", "posixpath.py", "random.py", "statistics.py",
           "urllib/parse.py", "html/__init__.py", "copy.py", "tempfile.py", "calendar.py", "gzip.py",
           "zipfile.py", "tarfile.py", "csv.py", "ipaddress.py", "secrets.py", "uuid.py", "wave.py", "shlex.py",
           "filecmp.py", "linecache.py", "keyword.py", "operator.py", "pprint.py", "quopri.py", "colorsys.py"]
NAMES = {"json/__init__.py": "json", "posixpath.py": "os.path", "urllib/parse.py": "urllib.parse",
         "html/__init__.py": "html"}
LICENSES = Path("/usr/share/common-licenses")
SYSTEM = "You are a helpful assistant who answers questions about the Python standard library."


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def module_docs(rel: str) -> tuple[str, str, list[tuple[str, str, str]]]:
    """(module name, module summary, [(function, signature, summary)]) of the public documented functions."""
    path = Path(sysconfig.get_paths()["stdlib"]) / rel
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = NAMES.get(rel, rel.removesuffix(".py").replace("/", "."))
    functions = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(first_paragraph(doc)) >= 40:
                functions.append((node.name, f"def {node.name}({ast.unparse(node.args)}):", first_paragraph(doc)))
    return name, first_paragraph(ast.get_docstring(tree) or ""), functions


def alpaca_records(modules) -> list[dict]:
    records = []
    for name, summary, functions in modules:
        if len(summary) >= 40:
            records.append({"instruction": f"What is the Python module `{name}` for?", "input": "", "output": summary})
        for i, (fn, signature, doc) in enumerate(functions):
            if i % 2 == 0:
                records.append({"instruction": f"What does the function `{name}.{fn}` do?", "input": "", "output": doc})
            else:
                records.append({"instruction": f"Explain what this function from the `{name}` module does.",
                                "input": signature, "output": doc})
            records.append({"instruction": f"Which function of the `{name}` module is described here?",
                            "input": doc, "output": f"`{name}.{fn}`, defined as `{signature.rstrip(':')}`"})
    for path in sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()):
        paragraphs = [" ".join(p.split()) for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]
        opening = next((p for p in paragraphs if len(p) >= 80 and not re.fullmatch(r"[\W\d_]*", p)), None)
        if opening is not None:
            records.append({"instruction": f"Quote the first substantial paragraph of the {path.name} licence.",
                            "input": "", "output": opening[:600]})
    return records


def sharegpt_conversations(modules) -> list[dict]:
    conversations = []
    for k, (name, summary, functions) in enumerate(modules):
        for start in range(0, min(len(functions), 9), 3):
            turns = ([{"from": "system", "value": SYSTEM}] if (k + start) % 2 else [])
            if start == 0 and len(summary) >= 40:
                turns += [{"from": "human", "value": f"What is `{name}` in Python?"}, {"from": "gpt", "value": summary}]
            for fn, _, doc in functions[start:start + 3]:
                ask = f"What does `{name}.{fn}` do?" if len(turns) < 2 else f"And `{fn}`?"
                turns += [{"from": "human", "value": ask}, {"from": "gpt", "value": doc}]
            if sum(t["from"] == "gpt" for t in turns) >= 2:
                conversations.append({"id": f"{name}-{start}", "conversations": turns})
    return conversations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "instruct")
    args = parser.parse_args()
    modules = [module_docs(rel) for rel in MODULES]
    args.out.mkdir(parents=True, exist_ok=True)
    records = alpaca_records(modules)
    with open(args.out / "alpaca_stdlib.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    conversations = sharegpt_conversations(modules)
    (args.out / "sharegpt_stdlib.json").write_text(json.dumps(conversations, indent=1, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    print(f"{len(records)} Alpaca records, {len(conversations)} conversations -> {args.out}")


if __name__ == "__main__":
    main()
