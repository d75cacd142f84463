#!/usr/bin/env python3
"""Write 64 deterministic prompt/response pairs (JSONL) from Python stdlib docstrings.

    python bench/anchors/make_pairs.py OUT.jsonl [--n 64] [--max-chars 900]

Each line is {"prompt": "Explain what `<qualified name>` does.", "response": <first
docstring paragraph>}. The response is cut at a word boundary so that prompt + response
stay around <= 256 tokens for a llama-style BPE tokenizer (~4 chars per token for English
prose; --max-chars bounds the response length). Only the standard library is used, and
the object list is fixed, so the output depends only on the Python version's docstrings.
"""

import argparse
import importlib
import inspect
import json
import re
import sys

# Modules walked in this order; within a module, public names in sorted order.
MODULES = [
    "json",
    "os.path",
    "re",
    "collections",
    "itertools",
    "functools",
    "textwrap",
    "string",
    "shutil",
    "heapq",
    "bisect",
    "statistics",
    "random",
    "base64",
    "difflib",
    "fnmatch",
    "csv",
    "argparse",
    "pathlib",
    "datetime",
    "math",
]


def first_paragraph(doc: str) -> str:
    doc = inspect.cleandoc(doc)
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(para.split())


def truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + " ..."


def candidates():
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = getattr(obj, "__doc__", None)
            if not doc or not isinstance(doc, str):
                continue
            para = first_paragraph(doc)
            if len(para) < 60:  # skip one-liners that say nothing
                continue
            yield f"{modname}.{name}", para


def make_pairs(n: int, max_chars: int):
    pairs, seen = [], set()
    for qualname, para in candidates():
        if para in seen:  # aliases share docstrings
            continue
        seen.add(para)
        pairs.append(
            {
                "prompt": f"Explain what `{qualname}` does.",
                "response": truncate(para, max_chars),
            }
        )
        if len(pairs) == n:
            return pairs
    raise SystemExit(f"only {len(pairs)} docstrings found, need {n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output JSONL path")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument(
        "--max-chars", type=int, default=900, help="max response characters (~225 tokens)"
    )
    args = ap.parse_args(argv)
    pairs = make_pairs(args.n, args.max_chars)
    with open(args.out, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    print(f"wrote {len(pairs)} pairs to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
