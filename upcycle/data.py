"""Text data for calibration, evaluation and training: user files, a built-in corpus, token blocks.

Wherever a data path is accepted, ``builtin`` names the built-in corpus instead, in three
domains that differ in style:

- ``builtin:prose``: docstrings of a fixed list of Python standard-library modules;
- ``builtin:code``: the source code of those modules, docstrings removed;
- ``builtin:manual``: the Python language reference and library topics that ``help()`` shows
  (the ``topics`` dict of the standard library's ``pydoc_data/topics.py``), one document per
  section, long sections cut at blank lines.

``builtin`` alone is prose and code (as before the manual was added, so recorded results keep
their data); ``builtin:all`` is all three domains. Everything is read with ``ast`` from the
installed ``.py`` files (nothing is imported), is deterministic for a given Python version and
needs no download. Each domain is split by a hash of a key (module and top-level definition;
manual section title) into a held-out part (about 20%) and a calibration part (the rest) that
share no text; training on ``builtin...`` uses the calibration part, evaluation the held-out one.

User files (see :func:`load_texts`):

- plain text: documents are separated by one or more blank lines; a file without blank lines is
  one document;
- JSONL (``.jsonl``, or ``.json`` with one object per line, or ``.json`` holding one list of
  objects): each record is ``{"text": ...}``, ``{"prompt": ..., "response": ...}`` (joined as
  prompt, newline, response; ``completion`` is accepted for ``response``) or a chat
  ``{"messages": [{"role": ..., "content": ...}, ...]}`` (one ``role: content`` line per message).
  If a record has several of these keys, ``text`` wins over ``messages`` over ``prompt``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Sequence

from upcycle.errors import InputError, OptionError

SPLITS = ("heldout", "calibration", "all")
DOMAINS = ("prose", "code", "manual")
DEFAULT_DOMAINS = ("prose", "code")  # `builtin` and domain=None: the corpus before the manual
# alias -> the `domain` argument of builtin_corpus (None: DEFAULT_DOMAINS)
DATA_ALIASES = {
    "builtin": None,
    "builtin:prose": "prose",
    "builtin:code": "code",
    "builtin:manual": "manual",
    "builtin:all": DOMAINS,
}
HELDOUT_PERCENT = 20  # documents whose key hashes below this go to "heldout", the rest calibrate

# Fixed and sorted, so the corpus does not depend on what a process happened to import.
# Modules missing from an installation (or moved between Python versions) are skipped.
BUILTIN_MODULES = (
    "abc",
    "argparse",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "concurrent.futures._base",
    "configparser",
    "contextlib",
    "copy",
    "dataclasses",
    "difflib",
    "doctest",
    "email.message",
    "enum",
    "fileinput",
    "fractions",
    "functools",
    "getopt",
    "graphlib",
    "heapq",
    "hmac",
    "ipaddress",
    "json",
    "json.decoder",
    "json.encoder",
    "logging",
    "lzma",
    "mimetypes",
    "numbers",
    "py_compile",
    "queue",
    "random",
    "sched",
    "secrets",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socketserver",
    "statistics",
    "string",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "traceback",
    "typing",
    "unittest.case",
    "urllib.parse",
    "wave",
)
MIN_DOC_CHARS = 40
MAX_CODE_CHARS = 4000  # longer source segments are cut at blank lines
MAX_MANUAL_CHARS = 4000  # longer manual sections are cut at blank lines
MANUAL_FILE = ("pydoc_data", "topics.py")  # under the stdlib folder; `topics = {name: text}`
_HEADING_MARKS = "*=-~^"  # reST-style underlines of the manual's section titles


# ---------------------------------------------------------------- user files


def load_texts(path: str) -> list[str]:
    """Read documents from a plain-text or JSONL file (format chosen by extension).

    ``.jsonl`` and ``.json`` files are JSON records (see the module docstring); any other
    extension is plain text. Returns one string per document, in file order; empty documents
    are dropped. Raises InputError naming the file (and line) for every malformed input.
    """
    texts = [record_text(r) for r in load_records(path)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"{path}: no text in any record")
    return texts


def load_records(path: str) -> list[dict]:
    """Read a text or JSONL file as records that keep their structure (for training).

    Each record is ``{"text": str}``, ``{"prompt": str, "response": str}`` or
    ``{"messages": [{"role": str, "content": str}, ...]}``, validated; plain-text documents
    become text records.
    """
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a text or JSONL file")
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    if not content.strip():
        raise InputError(f"{path}: file is empty")
    if path.lower().endswith((".jsonl", ".json")):
        records = _parse_json_records(path, content)
    else:
        blocks = [block.strip("\n") for block in re.split(r"\n[ \t\r\f\v]*\n", content)]
        records = [{"text": b} for b in blocks if b.strip()]
    if not records:
        raise InputError(f"{path}: no text in any record")
    return records


def _parse_json_records(path: str, content: str) -> list[dict]:
    if path.lower().endswith(".json") and content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        return [_record(rec, f"{path}: item {i}") for i, rec in enumerate(items)]
    records = []
    for n, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        records.append(_record(item, f"{path}:{n}"))
    return records


def _record(record, where: str) -> dict:
    """One JSON object -> a validated record; `where` prefixes errors ("file:line")."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        return {"text": _string(record["text"], "text", where)}
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise InputError(f"{where}: 'messages' must be a list")
        out = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"{where}: each message needs 'role' and 'content'")
            out.append(
                {
                    "role": _string(m["role"], "role", where),
                    "content": _content(m["content"], where),
                }
            )
        return {"messages": out}
    if "prompt" in record:
        answer = record.get("response", record.get("completion"))
        if answer is None:
            raise InputError(f"{where}: 'prompt' without 'response'")
        return {
            "prompt": _string(record["prompt"], "prompt", where),
            "response": _string(answer, "response", where),
        }
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise InputError(f"{where}: expected 'text', 'prompt'/'response' or 'messages' (keys: {keys})")


def record_text(record: dict) -> str:
    """A record as one plain text (prompt, newline, response; one ``role: content`` per line)."""
    if "text" in record:
        return record["text"]
    if "messages" in record:
        return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    return record["prompt"] + "\n" + record["response"]


def _string(value, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _content(value, where: str) -> str:
    """Message content: a string, or a list of parts whose 'text' fields are concatenated."""
    if isinstance(value, list):
        parts = [p.get("text") for p in value if isinstance(p, dict)]
        if all(isinstance(p, str) for p in parts) and len(parts) == len(value):
            return "".join(parts)
        raise InputError(f"{where}: message content parts must be objects with 'text'")
    return _string(value, "content", where)


# ---------------------------------------------------------------- built-in corpus


def builtin_corpus(split: str = "heldout", domain: str | Sequence[str] | None = None) -> list[str]:
    """Deterministic documents from the standard library: docstrings, source code, the manual.

    split: "heldout" (about 20%), "calibration" (the other 80%) or "all". Documents are assigned
      by a hash of a key: for prose and code their module and top-level definition, so the
      docstrings and the code of one function or class always fall in the same split; for the
      manual its section title, so a section that appears under several topics falls in one
      split. The two splits share no text.
    domain: "prose" (docstrings), "code" (source with docstrings removed), "manual" (the
      language reference and library topics of ``pydoc_data.topics``), a sequence of these, or
      None for prose and code. Documents come in a fixed order whatever the sequence's order:
      prose and code module by module, then the manual.
    """
    if split not in SPLITS:
        raise OptionError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    wanted = _domains(domain)
    docs: list[tuple[str, bool, str]] = []
    if "prose" in wanted or "code" in wanted:
        stdlib = _stdlib_documents()
        if not stdlib:
            raise InputError("built-in corpus: no standard-library sources found on this Python")
        docs.extend(stdlib)
    if "manual" in wanted:
        manual = _manual_documents()
        if not manual:
            where = os.path.join(sysconfig.get_paths()["stdlib"], *MANUAL_FILE)
            raise InputError(f"builtin:manual: no readable topics dict in {where}")
        docs.extend(manual)
    return [
        text
        for dom, heldout, text in docs
        if dom in wanted and (split == "all" or heldout == (split == "heldout"))
    ]


def _domains(domain: str | Sequence[str] | None) -> tuple[str, ...]:
    if domain is None:
        return DEFAULT_DOMAINS
    names = (domain,) if isinstance(domain, str) else tuple(domain)
    for name in names:
        if name not in DOMAINS:
            raise OptionError(f"unknown domain {name!r} (choose from {', '.join(DOMAINS)})")
    if not names:
        raise OptionError(f"no domain given (choose from {', '.join(DOMAINS)})")
    return names


def resolve_texts(spec: str, split: str = "heldout") -> list[str]:
    """A ``builtin`` alias (see DATA_ALIASES) -> the built-in corpus split; else a file.

    `split` applies to the built-in corpus only: a user file is used whole.
    """
    if spec in DATA_ALIASES:
        return builtin_corpus(split, DATA_ALIASES[spec])
    if spec.startswith("builtin:"):
        raise OptionError(f"unknown data alias {spec!r} (choose from {', '.join(DATA_ALIASES)})")
    if split not in SPLITS:
        raise OptionError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    return load_texts(spec)


def _is_heldout(key: str) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < HELDOUT_PERCENT


def _module_file(stdlib: str, name: str) -> str | None:
    base = os.path.join(stdlib, *name.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[tuple[str, bool, str], ...]:
    """(domain, is_heldout, text) for every document of every module, in a fixed order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    docs, seen = [], set()
    for name in BUILTIN_MODULES:
        path = _module_file(stdlib, name)
        if path is None:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for dom, key, text in _module_documents(name, source, tree):
            if text not in seen:  # a repeated text would otherwise land in both splits
                seen.add(text)
                docs.append((dom, _is_heldout(key), text))
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def _manual_documents() -> tuple[tuple[str, bool, str], ...]:
    """("manual", is_heldout, text) for every section of the stdlib's pydoc topics, in order.

    The ``topics`` dict is read with ``ast.literal_eval`` from ``pydoc_data/topics.py`` (never
    imported). Topics are taken in sorted order and cut into sections at their underlined
    titles. Sections with a body under MIN_DOC_CHARS characters are dropped; a section whose
    body already appeared is kept once (several topics repeat sections of others:
    "customization" is a section of "specialnames"). Sections longer than MAX_MANUAL_CHARS are
    cut at blank lines, and every piece takes its section's split (decided by the title, or by
    the topic's name for text before its first title). Empty when the file is missing or holds
    no such dict (some distributions strip pydoc_data).
    """
    topics = _read_topics(os.path.join(sysconfig.get_paths()["stdlib"], *MANUAL_FILE))
    docs, seen, pieces = [], set(), set()
    for name in sorted(topics):
        for title, heading, body in _manual_sections(topics[name]):
            if len(body) < MIN_DOC_CHARS or body in seen:
                continue
            seen.add(body)
            key = f"pydoc_data.topics:{title or name}"
            for piece in _cut(heading + body, MAX_MANUAL_CHARS):
                if len(piece) >= MIN_DOC_CHARS and piece not in pieces:
                    pieces.add(piece)  # a repeated piece would otherwise land in both splits
                    docs.append(("manual", _is_heldout(key), piece))
    return tuple(docs)


def _read_topics(path: str) -> dict[str, str]:
    """The ``topics = {...}`` dict of a pydoc_data/topics.py file; {} if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            try:
                topics = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return {}
            return {k: v for k, v in topics.items() if isinstance(k, str) and isinstance(v, str)}
    return {}


def _manual_sections(text: str) -> list[tuple[str, str, str]]:
    """(title, heading lines, body) per section; a title is a line underlined by one of
    _HEADING_MARKS repeated to the title's length. Text before the first title is a section
    titled ""; bodies are stripped of surrounding blank lines."""
    lines = text.strip("\n").split("\n")
    sections: list[tuple[str, str, list[str]]] = []
    title, heading, body = "", "", []
    i = 0
    while i < len(lines):
        line, under = lines[i], lines[i + 1] if i + 1 < len(lines) else ""
        if (
            line.strip()
            and len(under) == len(line)
            and under[0] in _HEADING_MARKS
            and under == under[0] * len(under)
        ):
            sections.append((title, heading, body))
            title, heading, body = line.strip(), f"{line}\n{under}\n\n", []
            i += 2
            continue
        body.append(line)
        i += 1
    sections.append((title, heading, body))
    return [(t, h, "\n".join(b).strip("\n")) for t, h, b in sections if h or "".join(b).strip()]


def _docstring_nodes(node) -> Iterable[tuple[ast.AST, ast.Expr]]:
    """(owner, docstring expression) for `node` and every def/class nested in its statements.

    Walks statement lists only (defs and classes cannot hide inside expressions), which is
    several times faster than ``ast.walk`` over every expression node.
    """
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        body = node.body
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            yield node, body[0]
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, ()):
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _docstring_nodes(child)


def _module_documents(module: str, source: str, tree: ast.Module):
    """Yield (domain, split key, text): each docstring, and source segments without docstrings.

    Segments start at each top-level def/class (decorators included) and run to the next one;
    the module header (imports, constants) is its own segment.
    """
    lines = source.splitlines()
    starts = [(1, f"{module}:")]
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            starts.append((first, f"{module}:{node.name}"))
    starts.sort()

    def key_of(lineno: int) -> str:
        key = starts[0][1]
        for first, k in starts:
            if first > lineno:
                break
            key = k
        return key

    drop = set()  # 1-based line numbers of docstrings, removed from the code segments
    prose = []
    for owner, expr in _docstring_nodes(tree):
        if isinstance(owner, ast.Module) or expr.lineno > owner.lineno:
            drop.update(range(expr.lineno, expr.end_lineno + 1))
        text = ast.get_docstring(owner, clean=True) or ""
        if len(text) >= MIN_DOC_CHARS and " " in text:
            prose.append((expr.lineno, key_of(expr.lineno), text))
    for _, key, text in sorted(prose):
        yield "prose", key, text

    bounds = [first for first, _ in starts] + [len(lines) + 1]
    for (first, key), end in zip(starts, bounds[1:], strict=True):
        kept = [lines[i - 1] for i in range(first, end) if i not in drop]
        for piece in _cut("\n".join(kept).strip("\n"), MAX_CODE_CHARS):
            if len(piece) >= MIN_DOC_CHARS:
                yield "code", key, piece


def _cut(text: str, limit: int) -> list[str]:
    """Split `text` at blank lines into pieces of at most about `limit` characters."""
    if len(text) <= limit:
        return [text]
    pieces, current = [], []
    size = 0
    for block in re.split(r"\n\s*\n", text):
        if current and size + len(block) > limit:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(block)
        size += len(block) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


# ---------------------------------------------------------------- token blocks


def token_blocks(texts: Sequence[str], tokenizer, seq_len: int, max_tokens: int | None = None):
    """Tokenize, join documents with EOS, and cut into full blocks.

    Each document is tokenized without special tokens and followed by the tokenizer's EOS token
    (BOS if it has no EOS, nothing if it has neither). The stream is cut into consecutive
    blocks of `seq_len` tokens; the incomplete tail is dropped. With `max_tokens`, only the
    first ``max_tokens // seq_len`` blocks are built (documents past them are not tokenized).

    Returns a LongTensor of shape (N, seq_len), N >= 1; InputError if the texts are too short.
    """
    import torch

    if seq_len < 2:
        raise OptionError(f"sequence length must be at least 2, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise OptionError(f"max tokens {max_tokens} is less than one block of {seq_len} tokens")
    want = None if max_tokens is None else (max_tokens // seq_len) * seq_len
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    ids: list[int] = []
    batch = 64
    for i in range(0, len(texts), batch):
        encoded = tokenizer(list(texts[i : i + batch]), add_special_tokens=False, verbose=False)
        for doc in encoded["input_ids"]:
            ids.extend(doc)
            if sep is not None:
                ids.append(sep)
        if want is not None and len(ids) >= want:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise InputError(f"the data has {len(ids)} tokens, fewer than one block of {seq_len}")
    if want is not None:
        n = min(n, want // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
