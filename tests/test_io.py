"""Streaming safetensors reader/writer against the reference safetensors library."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from upcycle.errors import InputError
from upcycle.io.arrays import from_torch, to_torch
from upcycle.io.checkpoint import Checkpoint
from upcycle.io.safetensors_io import read_header, read_rows, read_tensor
from upcycle.io.writer import ShardedWriter, parse_size, plan_shards


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(2, 2, 2, generator=g).half(),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


NAME = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def _array(t):
    return from_torch(t, NAME[t.dtype]) if t.dtype.is_floating_point else t.numpy()


def test_written_shards_read_back_with_safetensors(tmp_path):
    ts = _tensors()
    entries = [(k, NAME[v.dtype], tuple(v.shape)) for k, v in ts.items()]
    w = ShardedWriter(str(tmp_path), entries, max_shard_bytes=64)
    for k, v in ts.items():
        w.write(k, _array(v))
    w.finish()
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(name), ts[name])


def test_writer_refuses_out_of_plan(tmp_path):
    w = ShardedWriter(str(tmp_path), [("a", "F32", (2,))], 1 << 20)
    with pytest.raises(RuntimeError):
        w.write("b", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError):
        w.write("a", np.zeros(3, np.float32))
    with pytest.raises(RuntimeError):
        w.write("a", np.zeros(2, np.float64))


def test_reader_matches_safetensors(tmp_path):
    ts = _tensors()
    path = str(tmp_path / "x.safetensors")
    save_file(ts, path)
    infos, meta = read_header(path)
    for name, t in ts.items():
        a = read_tensor(path, infos[name])
        assert torch.equal(to_torch(a, infos[name].dtype), t)


@pytest.mark.parametrize("chunk_bytes", [1, 40, 1 << 20])
def test_rows_read_alone_match_the_whole_tensor(tmp_path, chunk_bytes):
    """A few rows of an embedding, read a chunk at a time: chunks of one row, of a few rows,
    and of the whole tensor; the first and the last row included."""
    t = torch.randn(50, 3, 2).to(torch.bfloat16)
    path = str(tmp_path / "x.safetensors")
    save_file({"pad": torch.zeros(7), "e": t}, path)
    info = read_header(path)[0]["e"]
    for rows in ([0], [49], [0, 1, 2, 30, 31, 49], list(range(50)), []):
        got = to_torch(read_rows(path, info, np.array(rows), chunk_bytes), "BF16")
        assert torch.equal(got, t[rows])
    with pytest.raises(InputError, match="rows outside"):
        read_rows(path, info, np.array([3, 50]))


def test_reader_rejects_bad_offsets(tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(4)}, path)
    raw = bytearray(open(path, "rb").read())
    raw = raw.replace(b'"shape":[4]', b'"shape":[5]')
    open(path, "wb").write(raw)
    with pytest.raises(InputError, match="bytes for shape"):
        read_header(path)


def test_plan_shards_keeps_order_and_limit():
    entries = [(str(i), "F32", (10,)) for i in range(10)]  # 40 bytes each
    shards = plan_shards(entries, 100)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert [e for s in shards for e in s] == entries
    assert len(plan_shards([("big", "F32", (1000,))], 10)) == 1


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("100 kb") == 100_000
    assert parse_size("123") == 123
    for bad in ("", "lots", "-1MB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_checkpoint_reads_sharded_models(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny("llama")
    model = AutoModelForCausalLM.from_pretrained(src)
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    ck = Checkpoint(sharded)
    state = model.state_dict()
    for k in ck.keys():
        assert torch.equal(ck.get_torch(k), state[k])
    assert ck.dtype == "F32"


@pytest.mark.parametrize(
    "src,dst", [("F32", "BF16"), ("BF16", "F32"), ("F32", "F16"), ("F16", "BF16"), ("BF16", "F16")]
)
def test_casts_match_torch(src, dst):
    from upcycle.io.arrays import cast

    torch_of = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-8, 4, 4096)
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.00390625, 1.01171875])  # ties
    x = x.to(torch_of[src])
    ours = to_torch(cast(from_torch(x, src), src, dst), dst)
    assert torch.equal(ours, x.to(torch_of[dst]))
    nan = to_torch(cast(from_torch(torch.tensor([float("nan")]), "F32"), "F32", dst), dst)
    assert torch.isnan(nan).all()
