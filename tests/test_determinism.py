"""The same inputs, options and seed give byte-identical output files."""

import hashlib
import os


def _digests(folder):
    return {
        n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
        for n in sorted(os.listdir(folder))
    }


def test_byte_identical_outputs(cli, tiny, tmp_path):
    src = tiny("qwen2")
    args = [
        "-E",
        "4",
        "-k",
        "2",
        "--expert-noise",
        "0.01",
        "--router-init",
        "random",
        "--seed",
        "7",
        "--max-shard-size",
        "200KB",
        "--moe-layers",
        "1",
        "-q",
    ]
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert cli("convert", src, a, *args).code == 0
    assert cli("convert", src, b, *args).code == 0
    assert _digests(a) == _digests(b)
    assert len(_digests(a)) > 5
    args[args.index("7")] = "8"
    assert cli("convert", src, c, *args).code == 0
    assert _digests(a)["config.json"] == _digests(c)["config.json"]
    assert _digests(a) != _digests(c)
