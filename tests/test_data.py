"""Text data: file formats, bad input, the built-in corpus, token blocks."""

import hashlib
import json
import subprocess

import pytest
import torch
from conftest import PY, python_env, save_tiny_tokenizer

from upcycle import data
from upcycle.data import builtin_corpus, load_texts, resolve_texts, token_blocks
from upcycle.errors import InputError, OptionError


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


# ---------------------------------------------------------------- formats


def test_plain_text_blocks(tmp_path):
    path = write(tmp_path, "a.txt", "first doc\nstill first\n\n\nsecond\n  \t\nthird\n")
    assert load_texts(path) == ["first doc\nstill first", "second", "third"]


def test_plain_text_without_blank_lines_is_one_document(tmp_path):
    path = write(tmp_path, "b.md", "line one\nline two\nline three")
    assert load_texts(path) == ["line one\nline two\nline three"]


def test_jsonl_all_record_kinds(tmp_path):
    lines = [
        {"text": "plain"},
        {"prompt": "Q?", "response": "A."},
        {"prompt": "Q2?", "completion": "A2."},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"text": "lo"}]},
            ]
        },
        {"text": "wins", "prompt": "ignored", "response": "ignored"},
    ]
    content = (
        "\n".join(json.dumps(x) for x in lines[:2])
        + "\n\n"
        + "\n".join(json.dumps(x) for x in lines[2:])
    )
    path = write(tmp_path, "d.jsonl", content)
    assert load_texts(path) == [
        "plain",
        "Q?\nA.",
        "Q2?\nA2.",
        "system: Be brief.\nuser: Hi\nassistant: Hello",
        "wins",
    ]


def test_json_lines_and_json_array(tmp_path):
    lines = write(tmp_path, "l.json", '{"text": "a"}\n{"text": "b"}\n')
    array = write(
        tmp_path, "arr.json", json.dumps([{"text": "a"}, {"prompt": "p", "response": "r"}])
    )
    assert load_texts(lines) == ["a", "b"]
    assert load_texts(array) == ["a", "p\nr"]


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("e.txt", "", ["e.txt", "empty"]),
        ("w.txt", "  \n\n \n", ["w.txt", "empty"]),
        ("e.jsonl", "", ["empty"]),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', ["bad.jsonl:2", "invalid JSON"]),
        ("keys.jsonl", '{"text": "ok"}\n\n{"title": "x"}\n', ["keys.jsonl:3", "'text'", "title"]),
        ("list.jsonl", '["a"]\n', ["list.jsonl:1", "JSON object"]),
        ("half.jsonl", '{"prompt": "p"}\n', ["half.jsonl:1", "without 'response'"]),
        ("num.jsonl", '{"text": 5}\n', ["num.jsonl:1", "'text' must be a string"]),
        (
            "msg.jsonl",
            '{"messages": [{"role": "user"}]}\n',
            ["msg.jsonl:1", "'role' and 'content'"],
        ),
        ("msgs.jsonl", '{"messages": "hi"}\n', ["msgs.jsonl:1", "must be a list"]),
        ("arr.json", '[{"text": "a"}, {"x": 1}]', ["arr.json: item 1"]),
        ("badarr.json", '[{"text": "a"},', ["badarr.json", "invalid JSON"]),
        ("blank.jsonl", '{"text": ""}\n', ["no text"]),
    ],
)
def test_bad_files(tmp_path, name, content, words):
    path = write(tmp_path, name, content)
    with pytest.raises(InputError) as e:
        load_texts(path)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_directory_and_binary(tmp_path):
    with pytest.raises(InputError, match="nope.txt: no such file"):
        load_texts(str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match="is a directory"):
        load_texts(str(tmp_path))
    with pytest.raises(InputError, match="not UTF-8"):
        load_texts(write(tmp_path, "bin.txt", b"\xff\xfe\x00abc", mode="wb"))


# ---------------------------------------------------------------- built-in corpus


def test_builtin_splits_are_disjoint_and_cover_all():
    for domain in (None, "prose", "code"):
        held = builtin_corpus("heldout", domain)
        cal = builtin_corpus("calibration", domain)
        assert held and cal
        assert not set(held) & set(cal)
        assert sorted(held + cal) == sorted(builtin_corpus("all", domain))
    prose, code = builtin_corpus("all", "prose"), builtin_corpus("all", "code")
    assert sorted(prose + code) == sorted(builtin_corpus("all"))
    assert not any(t.lstrip().startswith(("def ", "class ")) for t in prose)
    assert any("def " in t for t in code)
    held_chars = sum(map(len, builtin_corpus("heldout")))
    all_chars = sum(map(len, builtin_corpus("all")))
    assert held_chars >= 200_000
    assert 0.1 < held_chars / all_chars < 0.35


def test_builtin_deterministic_across_processes():
    """Same corpus from a fresh build and from other processes with other hash seeds."""

    def digest(texts):
        return hashlib.sha256("\x00".join(texts).encode()).hexdigest()

    expected = digest(builtin_corpus("heldout"))
    data._stdlib_documents.cache_clear()
    assert digest(builtin_corpus("heldout")) == expected
    code = (
        "import hashlib; from upcycle.data import builtin_corpus; "
        "print(hashlib.sha256('\\x00'.join(builtin_corpus('heldout')).encode()).hexdigest())"
    )
    env = {**python_env(), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_resolve_texts_aliases_and_paths(tmp_path):
    assert resolve_texts("builtin", "calibration") == builtin_corpus("calibration")
    assert resolve_texts("builtin:prose") == builtin_corpus("heldout", "prose")
    assert resolve_texts("builtin:code", "all") == builtin_corpus("all", "code")
    path = write(tmp_path, "t.txt", "a\n\nb")
    assert resolve_texts(path, "heldout") == ["a", "b"]  # files are used whole
    with pytest.raises(OptionError, match="unknown data alias"):
        resolve_texts("builtin:poetry")
    with pytest.raises(OptionError, match="unknown split"):
        builtin_corpus("train")
    with pytest.raises(OptionError, match="unknown domain"):
        builtin_corpus("heldout", "math")


def test_builtin_manual_domain():
    """builtin:manual: pydoc's topics, split like the other domains, sharing no text with them."""
    held = builtin_corpus("heldout", "manual")
    cal = builtin_corpus("calibration", "manual")
    everything = builtin_corpus("all", "manual")
    assert held and cal
    assert not set(held) & set(cal)
    assert sorted(held + cal) == sorted(everything)
    assert len(set(everything)) == len(everything)
    held_chars, all_chars = sum(map(len, held)), sum(map(len, everything))
    assert all_chars >= 100_000
    assert 0.1 < held_chars / all_chars < 0.35
    assert all(len(t) >= data.MIN_DOC_CHARS for t in everything)
    assert any(t.startswith('The "assert" statement\n****') for t in everything)
    others = set(builtin_corpus("all", "prose")) | set(builtin_corpus("all", "code"))
    assert not set(everything) & others
    # no section body in both splits (topics repeat sections of other topics)
    bodies = {
        split: "\x00".join(builtin_corpus(split, "manual")) for split in ("heldout", "calibration")
    }
    for text in held:
        body = text.split("\n\n", 1)[-1]
        if len(body) > 200:
            assert body not in bodies["calibration"]


def test_builtin_aliases_and_domain_sequences():
    """`builtin` stays prose + code; builtin:all and sequences combine domains in DOMAINS order."""
    assert data.DOMAINS == ("prose", "code", "manual")
    prose, code, manual = (builtin_corpus("heldout", d) for d in data.DOMAINS)
    assert sorted(builtin_corpus("heldout")) == sorted(prose + code)
    assert resolve_texts("builtin") == builtin_corpus("heldout")
    assert resolve_texts("builtin:manual", "calibration") == builtin_corpus("calibration", "manual")
    every = resolve_texts("builtin:all")
    assert sorted(every) == sorted(prose + code + manual)
    assert every[len(prose) + len(code) :] == manual  # the manual follows the stdlib documents
    assert builtin_corpus("heldout", ["manual"]) == manual
    assert sorted(builtin_corpus("heldout", ("manual", "prose"))) == sorted(prose + manual)
    for alias in data.DATA_ALIASES:  # every alias resolves, for every split
        for split in data.SPLITS:
            assert resolve_texts(alias, split)
    with pytest.raises(OptionError, match="unknown domain 'poetry'"):
        builtin_corpus("heldout", ("manual", "poetry"))
    with pytest.raises(OptionError, match="no domain given"):
        builtin_corpus("heldout", ())
    with pytest.raises(OptionError, match="builtin:manual"):  # the choices name the new alias
        resolve_texts("builtin:manuals")


def test_builtin_manual_is_read_not_imported_and_deterministic():
    def digest(texts):
        return hashlib.sha256("\x00".join(texts).encode()).hexdigest()

    expected = digest(builtin_corpus("heldout", "manual"))
    data._manual_documents.cache_clear()
    assert digest(builtin_corpus("heldout", "manual")) == expected
    code = (
        "import hashlib, sys; from upcycle.data import builtin_corpus; "
        "t = builtin_corpus('heldout', 'manual'); "
        "print(hashlib.sha256('\\x00'.join(t).encode()).hexdigest(), "
        "'pydoc_data.topics' in sys.modules)"
    )
    env = {**python_env(), "PYTHONHASHSEED": "54321"}
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, "False"]


def test_builtin_manual_missing_or_malformed(tmp_path, monkeypatch):
    """A Python without pydoc_data (or with an unreadable one): one-line InputError."""
    monkeypatch.setattr(data, "MANUAL_FILE", ("no_such_pydoc_data", "topics.py"))
    data._manual_documents.cache_clear()
    try:
        with pytest.raises(InputError, match=r"builtin:manual: no readable topics dict in .*"):
            builtin_corpus("heldout", "manual")
        with pytest.raises(InputError, match="builtin:manual"):
            resolve_texts("builtin:all")
        assert resolve_texts("builtin:prose")  # the other domains do not need it
    finally:
        data._manual_documents.cache_clear()
    for content in ("topics = [1, 2]\n", "topics = {'a': f(1)}\n", "topics = {\n", "x = 1\n"):
        path = write(tmp_path, "topics.py", content)
        assert data._read_topics(path) == {}
    path = write(tmp_path, "topics.py", "# c\ntopics = {'b': 'B text', 'a': 'A', 3: 'x'}\n")
    assert data._read_topics(path) == {"b": "B text", "a": "A"}


def test_manual_sections():
    text = (
        "\nPreface line before any title, long enough to count as text.\n\n"
        'The "if" statement\n'
        "******************\n\n"
        "Body of if.\n\n"
        "   if x:\n       pass\n\n"
        "Sub part\n"
        "========\n\n"
        "Sub body.\n"
        "Not a title\n"
        "-----\n"
        "Empty\n"
        "~~~~~\n"
    )
    sections = data._manual_sections(text)
    assert [(t, h) for t, h, _ in sections] == [
        ("", ""),
        ('The "if" statement', 'The "if" statement\n******************\n\n'),
        ("Sub part", "Sub part\n========\n\n"),
        ("Empty", "Empty\n~~~~~\n\n"),
    ]
    assert sections[1][2] == "Body of if.\n\n   if x:\n       pass"
    assert sections[2][2] == "Sub body.\nNot a title\n-----"  # underline of another length
    assert sections[3][2] == ""


# ---------------------------------------------------------------- token blocks


class CharTokenizer:
    """Each character is its code point; EOS is 0 (enough to check the block layout)."""

    eos_token_id, bos_token_id = 0, None

    def __init__(self):
        self.calls = 0

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False
        self.calls += 1
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_token_blocks_layout():
    blocks = token_blocks(["abc", "de", "fghij"], CharTokenizer(), seq_len=4, max_tokens=None)
    stream = [97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106, 0]  # 13 tokens -> 3 blocks
    assert blocks.dtype == torch.long and blocks.shape == (3, 4)
    assert blocks.flatten().tolist() == stream[:12]
    assert token_blocks(["abc", "de", "fghij"], CharTokenizer(), 4, max_tokens=9).shape == (2, 4)


def test_token_blocks_stops_tokenizing_early():
    tok = CharTokenizer()
    blocks = token_blocks(["x" * 100] * 1000, tok, seq_len=10, max_tokens=50)
    assert blocks.shape == (5, 10) and tok.calls == 1


def test_token_blocks_errors():
    with pytest.raises(InputError, match="fewer than one block"):
        token_blocks(["ab"], CharTokenizer(), seq_len=8)
    with pytest.raises(OptionError, match="less than one block"):
        token_blocks(["abcdefgh"], CharTokenizer(), seq_len=8, max_tokens=4)
    with pytest.raises(OptionError, match="at least 2"):
        token_blocks(["abcdefgh"], CharTokenizer(), seq_len=1)


def test_token_blocks_real_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    save_tiny_tokenizer(str(tmp_path), 128)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    blocks = token_blocks(["the cat sat", "on the mat"], tok, seq_len=4)
    eos = tok.eos_token_id
    assert blocks.tolist() == [tok.convert_tokens_to_ids(["the", "cat", "sat"]) + [eos]] + [
        tok.convert_tokens_to_ids(["on", "the", "mat"]) + [eos]
    ]
