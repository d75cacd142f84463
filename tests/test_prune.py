"""upcycle prune: fewer experts (frequency, uncurl, merge), narrower experts (--width).

Every output is checked against a reference built in the test: the source model loaded by
transformers, its routers and fused experts sliced or merged by hand with the choices recorded
in upcycle.json, loaded into a model made from the output's config; both give the same logits.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file, save_file
from test_bad_input import assert_one_line_error
from test_families_convert import FAMILIES
from transformers import AutoConfig, AutoModelForCausalLM

import upcycle.modeling  # noqa: F401  (registers upcycle_moe and upcycle_bam)
from upcycle.prune.plan import expert_width, pyramid
from upcycle.prune.select import clusters_of, kmeans, ranges

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
WORDS = ["the", "cat", "sat", "on", "mat", "code", "python", "def", "return", "import"]
CLASSES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "upcycle_moe": "UpcycleMoeForCausalLM",
    "upcycle_bam": "UpcycleBamForCausalLM",
}


def _corpus(path, n=120, seed=0):
    rng = np.random.default_rng(seed)
    words = WORDS + [f"w{i}" for i in range(10, 100)]
    path.write_text("\n\n".join(" ".join(rng.choice(words, size=20)) for _ in range(n)))
    return str(path)


def _convert(cli, src, out, *args):
    r = cli("convert", src, out, "-q", *args)
    assert r.code == 0, r
    return out


NOISY = ("-E", "6", "-k", "2", "--expert-noise", "0.1")  # 6 experts, top-2, experts that differ


def dense_sources(root, **llama_config) -> dict:
    """Tiny dense llama and Gemma 3 checkpoints, the calibration text, and the llama's
    6-expert mixtral conversion: what every prune test starts from."""
    from conftest import run_cli as cli

    llama = save_tiny(str(root / "llama"), "llama", tokenizer=True, **llama_config)
    gemma = save_tiny(str(root / "gemma"), "gemma3_text", tokenizer=True, **FAMILIES["gemma3_text"])
    return {
        "llama": llama,
        "gemma_dense": gemma,
        "data": _corpus(root / "data.txt"),
        "mixtral": _convert(cli, llama, str(root / "mixtral"), *NOISY),
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny MoE checkpoints with 6 routed experts, top-2, experts that differ."""
    from conftest import run_cli as cli

    root = tmp_path_factory.mktemp("prune")
    base = dense_sources(root)
    gemma = base.pop("gemma_dense")
    qwen2 = save_tiny(str(root / "qwen2"), "qwen2", tokenizer=True)
    return {
        **base,
        "qwen2_moe": _convert(
            cli,
            qwen2,
            str(root / "qwen2_moe"),
            "--method",
            "granular",
            "-G",
            "8",
            "-S",
            "2",
            "-k",
            "2",
        ),
        "upcycle_moe": _convert(cli, gemma, str(root / "upcycle_moe"), *NOISY),
        "upcycle_moe_layer0": _convert(
            cli, gemma, str(root / "upcycle_moe_layer0"), *NOISY, "--moe-layers", "0"
        ),
    }


def prune(cli, src, out, data, *args):
    r = cli(
        "prune", src, out, "--data", data, "--seq-len", "32", "--max-tokens", "1024", "-q", *args
    )
    assert r.code == 0, r
    return json.load(open(os.path.join(out, "upcycle.json")))["prune"][-1]


def _neurons(spec: str) -> torch.Tensor:
    idx = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        idx.extend(range(int(lo), int(hi or lo) + 1))
    return torch.tensor(idx)


def _reduced(router, gate_up, down, entry):
    """A layer's router and fused experts with the recorded choices applied by hand."""
    if "clusters" in entry and "kept" not in entry:  # merge
        groups = [(c["members"], c["weights"]) for c in entry["clusters"]]
    else:
        groups = [([e], [1.0]) for e in entry["kept"]] if "kept" in entry else None
    if groups is not None:

        def mix(t):
            return torch.stack(
                [sum(w * t[m] for m, w in zip(ms, ws, strict=True)) for ms, ws in groups]
            )

        router, gate_up, down = mix(router), mix(gate_up), mix(down)
    if "neurons" in entry:
        width = down.shape[2]
        keep = [_neurons(s) for s in entry["neurons"]]
        gate_up = torch.stack([gate_up[e][torch.cat([k, k + width])] for e, k in enumerate(keep)])
        down = torch.stack([down[e][:, k] for e, k in enumerate(keep)])
    return router, gate_up, down


def reference_logits(src: str, out: str, record: dict) -> torch.Tensor:
    """Logits of the source with the recorded prune applied by hand to its loaded weights,
    in a model built from the output's config."""
    state = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    for i, entry in record["layers"].items():
        p = f"model.layers.{i}.mlp."
        names = (p + "gate.weight", p + "experts.gate_up_proj", p + "experts.down_proj")
        for name, t in zip(names, _reduced(*(state[n] for n in names), entry), strict=True):
            state[name] = t
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(IDS).logits


def out_logits(out: str):
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return type(model).__name__, model(IDS).logits


def check_output(src, out, record, target, experts, width=None):
    name, got = out_logits(out)
    assert name == CLASSES[target]
    cfg = json.load(open(os.path.join(out, "config.json")))
    key = {"mixtral": "num_local_experts", "upcycle_bam": "num_local_experts"}.get(
        target, "num_experts"
    )
    assert cfg[key] == experts and record["num_experts"]["to"] == experts
    if width is not None:
        wkey = (
            "intermediate_size" if target in ("mixtral", "upcycle_bam") else "moe_intermediate_size"
        )
        assert cfg[wkey] == width == record["expert_width"]["to"]
    torch.testing.assert_close(got, reference_logits(src, out, record), atol=1e-5, rtol=0)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


@pytest.mark.parametrize("target", ["mixtral", "qwen2_moe", "upcycle_moe"])
@pytest.mark.parametrize("by", ["frequency", "uncurl", "merge"])
def test_each_criterion_on_each_target(cli, sources, tmp_path, target, by):
    src, out = sources[target], str(tmp_path / "out")
    record = prune(cli, src, out, sources["data"], "--experts", "3", "--by", by)
    assert record["criterion"] == by and record["tokens"] == 1024
    check_output(src, out, record, target, 3)
    for entry in record["layers"].values():
        routed = entry["routed"]
        if by == "merge":
            members = sorted(e for c in entry["clusters"] for e in c["members"])
            assert members == list(range(6)) and len(entry["clusters"]) == 3
            for c in entry["clusters"]:
                share = np.array([routed[e] for e in c["members"]])
                np.testing.assert_allclose(c["weights"], share / share.sum(), rtol=1e-4)
        elif by == "uncurl":
            assert sorted(e for c in entry["clusters"] for e in c) == list(range(6))
            for kept, cluster in zip(entry["kept"], entry["clusters"], strict=True):
                assert kept in cluster and routed[kept] == max(routed[e] for e in cluster)
        else:
            top = sorted(range(6), key=lambda e: (-routed[e], e))[:3]
            assert entry["kept"] == sorted(top)


def test_shared_expert_and_its_gate_are_kept(cli, sources, tmp_path):
    src, out = sources["qwen2_moe"], str(tmp_path / "out")
    prune(cli, src, out, sources["data"], "--experts", "2", "--width", "0.5")
    before, after = (
        load_file(os.path.join(src, "model.safetensors")),
        load_file(os.path.join(out, "model.safetensors")),
    )
    shared = [n for n in before if "shared_expert" in n]
    assert shared and all(torch.equal(before[n], after[n]) for n in shared)
    assert not any(".experts.2." in n for n in after)


def test_experts_and_width_together(cli, sources, tmp_path):
    """Experts first, then each kept (merged) expert's least important neurons."""
    src, out = sources["mixtral"], str(tmp_path / "out")
    record = prune(
        cli, src, out, sources["data"], "--experts", "4", "--by", "merge", "--width", "0.3"
    )
    assert record["expert_width"] == {"from": 96, "to": 32, "fraction": 0.3}  # 28.8 -> 32
    check_output(src, out, record, "mixtral", 4, width=32)


def test_top_k_lowered_with_fewer_experts(cli, sources, tmp_path):
    src, out = sources["mixtral"], str(tmp_path / "out")
    record = prune(cli, src, out, sources["data"], "--experts", "1", "--top-k", "1")
    assert record["top_k"] == {"from": 2, "to": 1}
    assert json.load(open(os.path.join(out, "config.json")))["num_experts_per_tok"] == 1
    check_output(src, out, record, "mixtral", 1)


def test_dense_layers_stay_and_layers_option(cli, sources, tmp_path):
    """upcycle_moe with layer 1 dense: only layer 0 is pruned, --layers 0 names it."""
    src, out = sources["upcycle_moe_layer0"], str(tmp_path / "out")
    record = prune(
        cli, src, out, sources["data"], "--experts", "3", "--layers", "0", "--by", "uncurl"
    )
    assert list(record["layers"]) == ["0"]
    check_output(src, out, record, "upcycle_moe", 3)


def test_upcycle_bam(cli, tmp_path):
    seed = save_tiny(str(tmp_path / "seed"), "llama", tokenizer=True)
    members = [save_tiny(str(tmp_path / f"m{s}"), "llama", seed=s) for s in (1, 2, 3, 4)]
    args = [a for m in members for a in ("--experts-from", m)]
    src = _convert(cli, seed, str(tmp_path / "bam"), "--method", "bam", *args)
    data = _corpus(tmp_path / "d.txt")
    out = str(tmp_path / "out")
    record = prune(cli, src, out, data, "--experts", "2", "--by", "merge", "--width", "0.5")
    check_output(src, out, record, "upcycle_bam", 2, width=48)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_attention_experts"] == 4  # attention experts are not touched


def _strong_router_row(src: str, out: str, expert: int, scale: float = 2.0) -> None:
    """A copy of `src` where every token's router input has a large shared component and
    `expert`'s router row points along it (scale > 0) or against it, in every layer: its logit
    is large (or very negative) for all tokens."""
    shutil.copytree(src, out)
    path = os.path.join(out, "model.safetensors")
    t = load_file(path)
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"] + 3 * v
    for i in range(2):
        norm = t[f"model.layers.{i}.post_attention_layernorm.weight"]
        t[f"model.layers.{i}.block_sparse_moe.gate.weight"][expert] = scale * norm * v
    save_file(t, path, metadata={"format": "pt"})


def _routed_counts(src: str, data_ids: torch.Tensor) -> dict[int, np.ndarray]:
    """How often each expert is in the top-2, counted here by hooks on the routers."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    counts = {}

    def hook(i):
        def fn(_m, _a, out):
            idx = torch.topk(out[0], 2, dim=-1).indices.flatten()
            counts[i] = counts.get(i, 0) + np.bincount(idx.numpy(), minlength=6)

        return fn

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(hook(i))
    with torch.no_grad():
        model(data_ids)
    return counts


def test_frequency_keeps_the_most_routed_experts(cli, sources, tmp_path):
    from upcycle.data import load_texts, token_blocks
    from upcycle.io.models import load_tokenizer

    src, out = str(tmp_path / "strong"), str(tmp_path / "out")
    _strong_router_row(sources["mixtral"], src, expert=4)
    record = prune(cli, src, out, sources["data"], "--experts", "2")
    ids = token_blocks(load_texts(sources["data"]), load_tokenizer(src), 32, 1024)
    counts = _routed_counts(src, ids)
    for i, entry in record["layers"].items():
        assert 4 in entry["kept"]
        assert entry["kept"] == sorted(sorted(range(6), key=lambda e: (-counts[int(i)][e], e))[:2])
        assert counts[int(i)][4] == ids.numel()  # chosen by every token
    check_output(src, out, record, "mixtral", 2)


def test_merging_identical_experts_gives_the_dense_model(cli, sources, tmp_path):
    moe = _convert(cli, sources["llama"], str(tmp_path / "copy"), "-E", "6", "-k", "2")
    out = str(tmp_path / "out")
    prune(cli, moe, out, sources["data"], "--experts", "3", "--by", "merge")
    dense = AutoModelForCausalLM.from_pretrained(sources["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = dense(IDS).logits
    torch.testing.assert_close(out_logits(out)[1], want, atol=1e-5, rtol=0)


def test_width_one_is_the_identity(cli, sources, tmp_path):
    src, out = sources["mixtral"], str(tmp_path / "out")
    record = prune(cli, src, out, sources["data"], "--width", "1.0")
    assert record["expert_width"]["to"] == 96 and record["criterion"] is None
    a, b = (
        load_file(os.path.join(src, "model.safetensors")),
        load_file(os.path.join(out, "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert json.load(open(os.path.join(out, "config.json")))["intermediate_size"] == 96


def test_width_half_keeps_the_important_neurons(cli, sources, tmp_path):
    """Half of every layer-0 expert's neurons made nearly silent (gate rows * 1e-3) are the
    ones dropped; the width is halved (96 -> 48)."""
    src, out = str(tmp_path / "quiet"), str(tmp_path / "out")
    shutil.copytree(sources["mixtral"], src)
    path = os.path.join(src, "model.safetensors")
    t = load_file(path)
    loud = {}
    for e in range(6):
        order = torch.randperm(96, generator=torch.Generator().manual_seed(e))
        loud[e], quiet = sorted(order[:48].tolist()), order[48:]
        t[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"][quiet] *= 1e-3
    save_file(t, path, metadata={"format": "pt"})
    record = prune(cli, src, out, sources["data"], "--width", "0.5")
    neurons = record["layers"]["0"]["neurons"]
    assert [_neurons(s).tolist() for s in neurons] == [loud[e] for e in range(6)]
    check_output(src, out, record, "mixtral", 6, width=48)


@pytest.mark.parametrize(
    "source,args,words",
    [
        ("mixtral", ("--experts", "6"), "--experts must be between 1 and 5"),
        ("mixtral", ("--experts", "1"), "pass --top-k"),
        ("mixtral", ("--experts", "3", "--top-k", "4"), "--top-k must be between 1 and the 3"),
        ("mixtral", ("--width", "0"), "--width must be in (0, 1]"),
        ("mixtral", ("--width", "1.5"), "--width must be in (0, 1]"),
        ("mixtral", (), "nothing to prune"),
        ("mixtral", ("--experts", "3", "--layers", "7"), "layer 7 does not exist"),
        ("upcycle_moe_layer0", ("--experts", "3", "--layers", "1"), "layer 1 is not an MoE"),
        ("mixtral", ("--experts", "3", "--layers", "0"), "one expert count"),
        ("mixtral", ("--experts", "3", "--pyramid"), "one expert count"),
        ("llama", ("--experts", "3"), "not an MoE checkpoint upcycle can prune"),
    ],
)
def test_bad_input(cli, sources, tmp_path, source, args, words):
    out = tmp_path / "out"
    r = cli("prune", sources[source], str(out), "--data", sources["data"], *args)
    assert_one_line_error(r, words)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_unknown_model_type_and_short_data(cli, sources, tiny, tmp_path):
    out = tmp_path / "out"
    r = cli("prune", tiny("gpt_neox"), str(out), "--data", sources["data"], "--experts", "2")
    assert_one_line_error(r, "not an MoE checkpoint upcycle can prune (gpt_neox)")
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat " * 4)
    r = cli(
        "prune",
        sources["mixtral"],
        str(out),
        "--data",
        str(short),
        "--seq-len",
        "8",
        "--experts",
        "3",
    )
    assert_one_line_error(r, "needs at least 48")
    assert not out.exists()


def test_token_ids_past_the_embedding(cli, sources, tmp_path):
    """A tokenizer that gives ids the model has no embedding row for: a one-line error."""
    src = tmp_path / "small_vocab"
    shutil.copytree(sources["mixtral"], src)
    tensors = load_file(str(src / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("embed_tokens.weight", "lm_head.weight"))]:
        tensors[name] = tensors[name][:20].clone()
    save_file(tensors, str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vocab_size": 20}))
    out = tmp_path / "out"
    r = cli("prune", str(src), str(out), "--data", sources["data"], "--experts", "2")
    assert_one_line_error(r, "past the model's 20 embedding rows")
    assert not out.exists()


def test_pyramid_schedule_and_width_rounding():
    assert pyramid(2, 8, 4) == [2, 4, 6, 8]
    assert pyramid(4, 8, 3) == [4, 6, 8] and pyramid(3, 8, 1) == [3]
    assert pyramid(2, 8, 6)[0] == 2 and pyramid(2, 8, 6)[-1] == 8
    assert expert_width(96, 0.5) == 48 and expert_width(96, 1.0) == 96
    assert expert_width(96, 0.3) == 32 and expert_width(12, 0.5) == 8 and expert_width(6, 0.5) == 6


def test_kmeans_gives_every_cluster_a_member():
    rng = np.random.default_rng(0)
    same = np.zeros((6, 5))  # identical profiles: still exactly n non-empty clusters
    groups = clusters_of(kmeans(same, 3, rng))
    assert len(groups) == 3 and sorted(e for c in groups for e in c) == list(range(6))
    points = np.concatenate([rng.normal(0, 0.01, (3, 4)), rng.normal(5, 0.01, (3, 4))])
    assert clusters_of(kmeans(points, 2, rng)) == [[0, 1, 2], [3, 4, 5]]
    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and ranges([]) == ""


@pytest.mark.parametrize("target", ["mixtral", "qwen2_moe", "upcycle_moe"])
def test_the_pruned_model_in_memory_computes_what_is_written(cli, sources, tmp_path, target):
    """Neuron statistics after --experts run on the loaded model with its experts replaced in
    place (`install`); that model computes what the written one does, lowered top-k included."""
    from upcycle.prune.experts import install, reduce_experts
    from upcycle.prune.select import ExpertPlan

    src, out = sources[target], str(tmp_path / "out")
    record = prune(cli, src, out, sources["data"], "--experts", "2", "--by", "merge", "-k", "1")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for i, entry in record["layers"].items():
        block = model.model.layers[int(i)].mlp
        plan = ExpertPlan(
            [c["members"] for c in entry["clusters"]], [c["weights"] for c in entry["clusters"]]
        )
        tensors = (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)
        install(block, *reduce_experts(*(t.detach() for t in tensors), plan), top_k=1)
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, out_logits(out)[1], atol=1e-5, rtol=0)


def test_an_expert_no_token_chose_keeps_its_largest_weights(cli, sources, tmp_path):
    """With no routed token to measure, neurons are scored ||gate_i|| * ||up_i|| * ||down_:,i||."""
    src, out = str(tmp_path / "never"), str(tmp_path / "out")
    _strong_router_row(sources["mixtral"], src, expert=3, scale=-2.0)
    from upcycle.data import load_texts, token_blocks
    from upcycle.io.models import load_tokenizer

    record = prune(cli, src, out, sources["data"], "--width", "0.5")
    ids = token_blocks(load_texts(sources["data"]), load_tokenizer(src), 32, 1024)
    counts = _routed_counts(src, ids)
    t = load_file(os.path.join(src, "model.safetensors"))
    for i, entry in record["layers"].items():
        assert counts[int(i)][3] == 0 and "routed" not in entry
        p = f"model.layers.{i}.block_sparse_moe.experts.3."
        score = (
            t[p + "w1.weight"].norm(dim=1)
            * t[p + "w3.weight"].norm(dim=1)
            * t[p + "w2.weight"].norm(dim=0)
        )
        assert _neurons(entry["neurons"][3]).tolist() == sorted(score.topk(48).indices.tolist())
    check_output(src, out, record, "mixtral", 6, width=48)
