"""Drop-Upcycling (`upcycle convert --method copy --drop-ratio R`): in each expert copy a
different random R of the neurons is re-initialised from the source matrices' statistics;
seeded, deterministic, and the card and upcycle.json say the model is no longer exact."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from safetensors.numpy import load_file
from test_bad_input import assert_one_line_error


def experts_of(folder: str, layer: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = load_file(os.path.join(folder, "model.safetensors"))
    p = f"model.layers.{layer}.block_sparse_moe.experts."
    E = len({k.split(".")[5] for k in w if k.startswith(p)})
    gate = np.stack([w[f"{p}{e}.w1.weight"] for e in range(E)])
    up = np.stack([w[f"{p}{e}.w3.weight"] for e in range(E)])
    down = np.stack([w[f"{p}{e}.w2.weight"] for e in range(E)])
    return gate, up, down


def test_each_expert_reinitialises_its_own_share_of_neurons(cli, tiny, tmp_path):
    src, out = tiny("llama"), str(tmp_path / "moe")
    r = cli("convert", src, out, "-E", "4", "-k", "2", "--drop-ratio", "0.5", "-q")
    assert r.code == 0, r.err
    dense = load_file(os.path.join(src, "model.safetensors"))
    d_gate = dense["model.layers.0.mlp.gate_proj.weight"]
    d_down = dense["model.layers.0.mlp.down_proj.weight"]
    gate, up, down = experts_of(out)
    inter = d_gate.shape[0]
    dropped = []
    for e in range(4):
        rows = np.flatnonzero((gate[e] != d_gate).any(1))
        assert len(rows) == inter // 2  # exactly R of the neurons, all others untouched
        assert np.array_equal(np.flatnonzero((down[e] != d_down).any(0)), rows)
        new = gate[e][rows]  # drawn from the source matrix's mean and std
        assert abs(new.std() / d_gate.std() - 1) < 0.2 and abs(new.mean()) < 3 * d_gate.std()
        dropped.append(set(rows.tolist()))
    assert len({frozenset(s) for s in dropped}) == 4  # a different set per expert

    card = open(os.path.join(out, "README.md")).read()
    assert "Not the dense model's function, on purpose: 0.5 of each expert's neurons" in card
    record = json.load(open(os.path.join(out, "upcycle.json")))
    assert record["options"]["drop_ratio"] == 0.5 and "Drop-Upcycling" in record["not_exact"]

    again = str(tmp_path / "again")
    assert cli("convert", src, again, "-E", "4", "-k", "2", "--drop-ratio", "0.5", "-q").code == 0

    def digest(folder):
        return hashlib.sha256(open(os.path.join(folder, "model.safetensors"), "rb").read()).digest()

    assert digest(out) == digest(again)  # seeded: the same bytes every time
    other = str(tmp_path / "other")
    r = cli("convert", src, other, "-E", "4", "--drop-ratio", "0.5", "--seed", "1", "-q")
    assert r.code == 0 and digest(other) != digest(out)


def test_drop_ratio_bad_input(cli, tiny, tmp_path):
    src, out = tiny("llama"), str(tmp_path / "o")
    assert_one_line_error(
        cli("convert", src, out, "--drop-ratio", "1.5"), "--drop-ratio must be in [0, 1], got 1.5"
    )
    assert_one_line_error(
        cli("convert", src, out, "--method", "granular", "-G", "2", "--drop-ratio", "0.5"),
        "--drop-ratio applies to --method copy, not granular",
    )
    assert not os.path.exists(out)
