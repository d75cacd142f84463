"""upcycle_moe, the generic custom architecture (upcycle/modeling/*_upcycle_moe.py), on its own.

Folders are written by hand here, from tiny dense checkpoints, in the layout the converter
writes (the family's own tensor names; MoE layers' `mlp.gate.weight`, fused
`mlp.experts.gate_up_proj`/`down_proj`, optional `mlp.shared_expert.*`) or in the optional ones
(`fused_experts: false`, `shared_expert_gate: true`), and loaded with `trust_remote_code=True`
in a process where `import upcycle` fails. Four function-preserving layouts per family:

- copy: every layer MoE, 4 identical experts, top-2, random router, renormalised weights;
- shared: layer 0 only (layer 1 keeps the family's MLP), a shared expert with half the neurons
  and 4 routed experts of an eighth each (down rows times 4), zero router, top-4 of 4;
- per_expert: copy, the experts stored one module each (`mlp.experts.{e}.{gate,up,down}_proj`);
- gated: shared, plus a zero `mlp.shared_expert_gate.weight` (sigmoid 0.5) and the shared
  expert's down projection doubled.

copy and shared write no key of the optional layouts (folders written before them). All four
must give the dense model's logits (fp32, 1e-5) past the sliding window, and its greedy
generation with the KV cache.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FAMILY_CONFIGS, NO_UPCYCLE, save_tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# Tiny configs of the new families (conftest.FAMILY_CONFIGS): windows shorter than the test
# sequences, soft-capping on (Gemma 2), tied embeddings (Gemma), fused qkv and gate_up (Phi-3).
FAMILY_OVERRIDES = {f: FAMILY_CONFIGS[f] for f in ("gemma2", "gemma3_text", "phi3")}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
VARIANTS = ("copy", "shared", "per_expert", "gated")
# The layout each variant's weights come from, and its key of the optional layouts.
BASE_VARIANT = {"copy": "copy", "shared": "shared", "per_expert": "copy", "gated": "shared"}
LAYOUT_KEYS = {"per_expert": dict(fused_experts=False), "gated": dict(shared_expert_gate=True)}
WINDOWED = ("mistral", "gemma2", "gemma3_text")  # sliding_window=8 in their tiny configs
NEW_TOKENS = 20

# Loads each folder named in a job file where `import upcycle` fails; writes logits and
# greedy generations; for folders marked `resave`, saves the loaded model again and reloads it.
LOAD = (
    NO_UPCYCLE
    + r"""
import json, os, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

def load(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    return model.eval()

jobs = json.load(open(sys.argv[1]))
for job in jobs:
    ids = torch.tensor(job["ids"])
    model = load(job["folder"])
    with torch.no_grad():
        tensors = {"logits": model(ids).logits.contiguous()}
        tensors["gen"] = model.generate(
            ids[:1, :6], max_new_tokens=job["new_tokens"], min_new_tokens=job["new_tokens"],
            do_sample=False, use_cache=True,
        )
        if job.get("resave"):
            model.save_pretrained(job["resave"])
            tensors["resaved_logits"] = load(job["resave"])(ids).logits.contiguous()
    save_file(tensors, job["result"])
    meta = {"module": type(model).__module__, "cls": type(model).__name__,
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "experts": model.config._experts_implementation,
            "experts_cls": type(model.model.layers[0].mlp.experts).__name__,
            "layout": [model.config.fused_experts, model.config.shared_expert_gate],
            "keys": sorted(model.state_dict())}
    json.dump(meta, open(job["result"] + ".json", "w"))
assert "upcycle" not in sys.modules
"""
)


def dense_ffn(tensors: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate (I, H), up (I, H), down (H, I) of a dense layer (Phi-3 fuses gate and up)."""
    p = f"model.layers.{layer}.mlp."
    if p + "gate_up_proj.weight" in tensors:
        gate, up = tensors[p + "gate_up_proj.weight"].chunk(2, dim=0)
    else:
        gate, up = tensors[p + "gate_proj.weight"], tensors[p + "up_proj.weight"]
    return gate, up, tensors[p + "down_proj.weight"]


def per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every fused `experts.gate_up_proj`/`experts.down_proj` split per expert."""
    out = {}
    for name, t in tensors.items():
        prefix, _, role = name.rpartition("experts.")
        if role == "gate_up_proj":  # (E, 2I, H), gate rows first
            for e, w in enumerate(t):
                gate, up = w.chunk(2)
                out[f"{prefix}experts.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}experts.{e}.up_proj.weight"] = up.contiguous()
        elif role == "down_proj":  # (E, H, I)
            for e, w in enumerate(t):
                out[f"{prefix}experts.{e}.down_proj.weight"] = w.contiguous()
        else:
            out[name] = t
    return out


def moe_tensors(gate, up, down, variant: str, seed: int) -> dict[str, torch.Tensor]:
    """One MoE layer's tensors (names relative to `mlp.`) that compute the dense FFN."""
    if variant == "per_expert":
        return per_expert(moe_tensors(gate, up, down, "copy", seed))
    if variant == "gated":  # sigmoid(0) = 0.5 halves the doubled down projection, exactly
        tensors = moe_tensors(gate, up, down, "shared", seed)
        tensors["shared_expert.down_proj.weight"] = 2 * tensors["shared_expert.down_proj.weight"]
        tensors["shared_expert_gate.weight"] = torch.zeros(1, gate.shape[1])
        return tensors
    experts = 4
    if variant == "copy":  # identical experts: any routing gives the dense FFN
        router = torch.randn(experts, gate.shape[1], generator=torch.Generator().manual_seed(seed))
        return {
            "gate.weight": router,
            "experts.gate_up_proj": torch.cat([gate, up]).expand(experts, -1, -1).contiguous(),
            "experts.down_proj": down.expand(experts, -1, -1).contiguous(),
        }
    shared = gate.shape[0] // 2  # the other half: `experts` slices, each weighted 1/experts
    width = (gate.shape[0] - shared) // experts
    slices = [slice(shared + e * width, shared + (e + 1) * width) for e in range(experts)]
    return {
        "gate.weight": torch.zeros(experts, gate.shape[1]),
        "experts.gate_up_proj": torch.stack([torch.cat([gate[s], up[s]]) for s in slices]),
        "experts.down_proj": torch.stack([down[:, s] * experts for s in slices]),
        "shared_expert.gate_proj.weight": gate[:shared].contiguous(),
        "shared_expert.up_proj.weight": up[:shared].contiguous(),
        "shared_expert.down_proj.weight": down[:, :shared].contiguous(),
    }


def moe_keys(variant: str, config: dict) -> dict:
    """The MoE keys of config.json for a layout of `config`'s dense model."""
    width = config["intermediate_size"]
    layout = LAYOUT_KEYS.get(variant, {})
    if BASE_VARIANT[variant] == "copy":
        shape = dict(layout, num_experts_per_tok=2, moe_intermediate_size=width)
        return dict(shape, shared_expert_intermediate_size=0, moe_layers=[0, 1])
    shape = dict(layout, num_experts_per_tok=4, moe_intermediate_size=width // 8)
    return dict(shape, shared_expert_intermediate_size=width // 2, moe_layers=[0])


def write_moe_folder(dense: str, out: str, variant: str) -> dict[str, torch.Tensor]:
    """An upcycle_moe folder computing `dense`'s function; returns the tensors written."""
    import upcycle.modeling

    config = json.load(open(os.path.join(dense, "config.json")))
    source = load_file(os.path.join(dense, "model.safetensors"))
    keys = moe_keys(variant, config)
    moe = set(keys["moe_layers"])
    layer_of = re.compile(r"model\.layers\.(\d+)\.mlp\.")
    tensors = {}
    for name, t in source.items():
        m = layer_of.match(name)
        if not (m and int(m[1]) in moe):  # embeddings, attention, norms, dense MLPs, head
            tensors[name] = t
    for i in sorted(moe):
        for name, t in moe_tensors(*dense_ffn(source, i), variant, seed=i).items():
            tensors[f"model.layers.{i}.mlp.{name}"] = t
    os.makedirs(out)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config.update(
        keys,
        base_model_type=config["model_type"],
        model_type="upcycle_moe",
        architectures=["UpcycleMoeForCausalLM"],
        auto_map=upcycle.modeling.auto_map("upcycle_moe"),
        num_experts=4,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        output_router_logits=False,
    )
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for path in upcycle.modeling.code_files("upcycle_moe"):
        shutil.copy(path, out)
    return tensors


def sample_ids() -> torch.Tensor:
    """Two sequences of 20 tokens, longer than the windows of 8."""
    return torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))


def dense_outputs(path: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = model.generate(ids[:1, :6], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, use_cache=True)  # fmt: skip
        return model(ids).logits, gen


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Dense checkpoints, their upcycle_moe folders, and what a process without upcycle read
    from each: {(family, variant): dict(dense, folder, tensors, result, meta, resaved)}."""
    root = tmp_path_factory.mktemp("upcycle_moe")
    cases, jobs = {}, []
    for family in FAMILIES:
        dense = save_tiny(str(root / family), family, **FAMILY_OVERRIDES.get(family, {}))
        for variant in VARIANTS:
            folder = str(root / f"{family}-{variant}")
            case = dict(dense=dense, folder=folder, result=folder + ".result.safetensors")
            case["tensors"] = write_moe_folder(dense, folder, variant)
            resave = folder + "-resaved" if family in ("gemma3_text", "phi3") else None
            case["resaved"] = resave
            jobs.append(dict(folder=folder, ids=sample_ids().tolist(), new_tokens=NEW_TOKENS,
                             result=case["result"], resave=resave))  # fmt: skip
            cases[family, variant] = case
    with open(root / "jobs.json", "w") as f:
        json.dump(jobs, f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(root / "modules")
    r = subprocess.run([sys.executable, "-c", LOAD, str(root / "jobs.json")],
                       capture_output=True, text=True, env=env, cwd=str(root))  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    for case in cases.values():
        case["meta"] = json.load(open(case["result"] + ".json"))
    return cases


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_loads_without_upcycle_and_computes_the_dense_model(folders, family, variant):
    case = folders[family, variant]
    assert case["meta"]["cls"] == "UpcycleMoeForCausalLM"
    assert case["meta"]["module"].startswith("transformers_modules"), case["meta"]["module"]
    assert case["meta"]["experts"] == "grouped_mm"  # the folder's experts take the interface
    fused = variant != "per_expert"
    assert case["meta"]["experts_cls"] == ("UpcycleMoeExperts" if fused else "UpcycleMoeExpertList")
    assert case["meta"]["layout"] == [fused, variant == "gated"]
    ids = sample_ids()
    logits, gen = dense_outputs(case["dense"], ids)
    got = load_file(case["result"])
    delta = (got["logits"] - logits).abs().max().item()
    print(f"{family} {variant}: max |dlogit| {delta:.2e}")
    assert delta <= 1e-5
    assert torch.equal(got["gen"], gen)
    assert gen.shape[1] == 6 + NEW_TOKENS
    config = json.load(open(os.path.join(case["dense"], "config.json")))
    if family in WINDOWED:  # the logits and the generation both run past the window
        assert config["sliding_window"] < ids.shape[1] and config["sliding_window"] < gen.shape[1]
    tied = config.get("tie_word_embeddings", False)
    assert case["meta"]["tied"] == tied
    assert ("lm_head.weight" in case["tensors"]) == (not tied)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_names_are_the_contract(folders, family, variant):
    """The loaded model has exactly the tensors the folder holds (plus a tied head), the
    family's own names for everything but the MoE FFNs."""
    case = folders[family, variant]
    written = set(case["tensors"])
    loaded = set(case["meta"]["keys"])
    assert loaded - written <= {"lm_head.weight"} and written <= loaded
    if BASE_VARIANT[variant] == "shared":  # layer 1 keeps the family's MLP, its own names
        assert any(k.startswith("model.layers.1.mlp.") for k in written)
        assert not any(".experts." in k or ".gate.weight" in k for k in written if ".1.mlp." in k)
    expert_keys = {k.split("mlp.experts.")[1] for k in written if "mlp.experts." in k}
    if variant == "per_expert":  # 4 experts in each of the 2 layers, 3 projections each
        want = {f"{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")}
        assert expert_keys == want and len([k for k in written if "mlp.experts." in k]) == 24
    else:
        assert expert_keys == {"gate_up_proj", "down_proj"}
    gates = {k for k in written if "shared_expert_gate" in k}
    assert gates == (
        {"model.layers.0.mlp.shared_expert_gate.weight"} if variant == "gated" else set()
    )


@pytest.mark.parametrize(
    "family,variant",
    [("gemma3_text", "copy"), ("phi3", "shared"), ("gemma3_text", "per_expert"), ("phi3", "gated")],
)
def test_save_pretrained_round_trip_keeps_names_and_code(folders, family, variant):
    case = folders[family, variant]
    out = case["resaved"]
    assert {"configuration_upcycle_moe.py", "modeling_upcycle_moe.py"} <= set(os.listdir(out))
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(case["tensors"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "upcycle_moe" and config["base_model_type"] == family
    assert config["fused_experts"] == (variant != "per_expert")
    assert config["shared_expert_gate"] == (variant == "gated")
    got = load_file(case["result"])
    assert torch.equal(got["resaved_logits"], got["logits"])


def in_process_model(folders, family="qwen3", variant="copy", **kwargs):
    """A folder loaded through upcycle's registration (same code as the folder's copy)."""
    from transformers import AutoModelForCausalLM

    import upcycle.modeling  # noqa: F401  (registers upcycle_moe)

    path = folders[family, variant]["folder"]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def test_router_logits_and_aux_loss(folders):
    model = in_process_model(folders, "gemma2", "copy")
    ids = sample_ids()
    plain = model(ids, labels=ids)
    assert plain.aux_loss is None and plain.router_logits is None
    out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 2
    assert all(r.shape == (ids.numel(), 4) for r in out.router_logits)
    assert math.isfinite(out.aux_loss.item()) and out.aux_loss.item() > 0
    want = plain.loss + model.config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss, want)
    out.aux_loss.backward()  # the aux loss trains the routers
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    model.config.output_router_logits = True  # the config's default applies too
    with torch.no_grad():
        assert model(ids).aux_loss is not None


def test_settings_of_this_models_config_reach_the_family(folders):
    model = in_process_model(folders, "gemma3_text", "copy").eval()
    ids = sample_ids()
    with torch.no_grad():
        assert model(ids).cache is not None and model(ids).hidden_states is None
        model.config.use_cache = False
        model.config.output_hidden_states = True
        out = model(ids)
    assert out.cache is None and len(out.hidden_states) == 3


def outputs_with_aux_loss(model, ids):
    """logits, router logits, aux loss and loss (LM + aux) of `model` on `ids`."""
    with torch.no_grad():
        out = model(ids, labels=ids, output_router_logits=True)
    return out.logits, torch.stack(out.router_logits), out.aux_loss, out.loss


def test_folders_without_the_layout_keys_load_as_before(folders):
    """copy and shared folders do not name fused_experts or shared_expert_gate: fused experts,
    no gate (the converter's layout)."""
    for family in FAMILIES:
        for variant in ("copy", "shared"):
            written = json.load(
                open(os.path.join(folders[family, variant]["folder"], "config.json"))
            )
            assert "fused_experts" not in written and "shared_expert_gate" not in written
            assert folders[family, variant]["meta"]["layout"] == [True, False]
    config = in_process_model(folders, "llama", "shared").config
    assert config.fused_experts is True and config.shared_expert_gate is False
    assert "fused_experts" not in config.base_config().to_dict()


def test_fused_and_per_expert_folders_agree(folders):
    """The copy and per_expert folders hold the same weights: the eager fused experts and the
    per-expert modules give identical logits, router logits and aux loss."""
    ids = sample_ids()
    fused = in_process_model(folders, "gemma2", "copy", experts_implementation="eager").eval()
    apart = in_process_model(folders, "gemma2", "per_expert").eval()
    assert type(apart.model.layers[1].mlp.experts).__name__ == "UpcycleMoeExpertList"
    want, got = outputs_with_aux_loss(fused, ids), outputs_with_aux_loss(apart, ids)
    for name, a, b in zip(("logits", "router logits", "aux loss", "loss"), want, got, strict=True):
        assert torch.equal(a, b), name
    fused.set_experts_implementation("grouped_mm")
    grouped = outputs_with_aux_loss(fused, ids)
    delta = (grouped[0] - got[0]).abs().max().item()
    print(f"per-expert vs grouped_mm: max |dlogit| {delta:.2e}")
    assert delta <= 1e-5
    for a, b in zip(grouped[1:], got[1:], strict=True):  # router logits of layer 1 on, aux loss
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_folder_gives_the_shared_folders_logits_bit_for_bit(folders, family):
    """sigmoid(0) = 0.5 times the doubled shared down projection is the shared expert exactly."""
    gated = load_file(folders[family, "gated"]["result"])
    shared = load_file(folders[family, "shared"]["result"])
    assert torch.equal(gated["logits"], shared["logits"]) and torch.equal(
        gated["gen"], shared["gen"]
    )


def random_moe(seed: int, **layout):
    """A tiny random qwen3 upcycle_moe model with a shared expert, in the layout asked for."""
    from transformers import AutoModelForCausalLM

    import upcycle.modeling

    config = upcycle.modeling.UpcycleMoeConfig(
        base_model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=16, norm_topk_prob=False, **layout,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def test_fused_and_per_expert_layouts_agree_on_random_weights():
    """Random experts, router and shared-expert gate: the fused model's weights split per
    expert give the per-expert model identical outputs (eager), and within 1e-5 of the fused
    grouped_mm and batched_mm."""
    fused = random_moe(0, shared_expert_gate=True)
    apart = random_moe(1, shared_expert_gate=True, fused_experts=False)
    block = apart.model.layers[0].mlp
    for weight in (block.experts[5].down_proj.weight, block.shared_expert_gate.weight):
        assert weight.abs().max() > 0 and weight.std() < 0.1  # initialised like the Linears
    apart.load_state_dict(per_expert(fused.state_dict()), strict=True)
    ids = sample_ids()
    got = outputs_with_aux_loss(apart, ids)
    assert got[2] > 0
    for name in ("eager", "grouped_mm", "batched_mm"):
        fused.set_experts_implementation(name)
        want = outputs_with_aux_loss(fused, ids)
        if name == "eager":
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_shared_expert_gate_scales_the_shared_expert():
    """out = routed experts + sigmoid(shared_expert_gate(x)) * shared_expert(x), as Qwen2-MoE."""
    block = random_moe(2, shared_expert_gate=True, fused_experts=False).model.layers[0].mlp
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        weights, index = block.route(x)
        routed = block.experts(x, index, weights)
        gate = torch.sigmoid(x @ block.shared_expert_gate.weight.T)
        assert gate.shape == (5, 1) and gate.std() > 0
        torch.testing.assert_close(block(x), routed + gate * block.shared_expert(x))


def test_experts_implementations_agree():
    """The eager loop here, and transformers' grouped_mm and batched_mm, on random experts."""
    model = random_moe(0)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.abs().max() > 0 and experts.gate_up_proj.std() < 0.1
    ids = sample_ids()
    results = {}
    for name in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(name)
        assert model.config._experts_implementation == name
        with torch.no_grad():
            results[name] = model(ids).logits
    for name in ("grouped_mm", "batched_mm"):
        torch.testing.assert_close(results[name], results["eager"], atol=1e-5, rtol=0)


def test_attention_backend_is_the_familys(folders):
    """Gemma 2 has no SDPA path: the model takes the family's eager default, and a switch
    reaches the family's attention."""
    model = in_process_model(folders, "gemma2", "copy")
    assert model.config._attn_implementation == "eager" == model.model.config._attn_implementation
    model = in_process_model(folders, "llama", "copy", attn_implementation="eager")
    assert model.model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa" == model.model.config._attn_implementation


def test_phi3_long_rope_generation_matches(tmp_path):
    """Past original_max_position_embeddings Phi-3 recomputes the cache with the long factors;
    the MoE model does too (each step's logits match; without the recompute they are ~1e-3 off)."""
    from transformers import AutoModelForCausalLM

    half = 8  # head_dim 16 / 2
    rope = dict(rope_type="longrope", rope_theta=10000.0,
                short_factor=[1.0] * half, long_factor=[1.0 + 0.5 * i for i in range(half)])  # fmt: skip
    dense = save_tiny(str(tmp_path / "phi3"), "phi3", **FAMILY_OVERRIDES["phi3"],
                      rope_parameters=rope, original_max_position_embeddings=12)  # fmt: skip
    folder = str(tmp_path / "moe")
    write_moe_folder(dense, folder, "copy")
    import upcycle.modeling  # noqa: F401

    prompt = sample_ids()[:1, :6]
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                  use_cache=True, return_dict_in_generate=True, output_logits=True)  # fmt: skip
    runs = []
    for path in (dense, folder):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            runs.append(model.generate(prompt, **kwargs))
    assert type(model).__name__ == "UpcycleMoeForCausalLM"
    want, got = runs
    assert torch.equal(got.sequences, want.sequences)
    assert (torch.stack(got.logits) - torch.stack(want.logits)).abs().max().item() <= 1e-5


def test_config_holds_the_familys_keys(folders):
    from transformers import AutoConfig

    import upcycle.modeling

    assert upcycle.modeling.auto_map("upcycle_moe") == {
        "AutoConfig": "configuration_upcycle_moe.UpcycleMoeConfig",
        "AutoModelForCausalLM": "modeling_upcycle_moe.UpcycleMoeForCausalLM",
    }
    assert all(os.path.isfile(p) for p in upcycle.modeling.code_files("upcycle_moe"))
    case = folders["gemma3_text", "shared"]
    config = AutoConfig.from_pretrained(case["folder"])
    assert type(config) is upcycle.modeling.UpcycleMoeConfig
    dense = AutoConfig.from_pretrained(case["dense"])
    base = config.base_config()
    assert type(base) is type(dense)
    skip = {"architectures", "transformers_version", "_name_or_path", "dtype"}
    want = {k: v for k, v in dense.to_dict().items() if k not in skip}
    assert {k: v for k, v in base.to_dict().items() if k not in skip} == want
    assert config.sliding_window == 8 and config.layer_types == dense.layer_types
    assert config.expert_activation() == "gelu_pytorch_tanh"
    assert config.moe_layers == [0] and config.shared_expert_intermediate_size == 48


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(moe_layers=[0, 5]), "moe_layers"),
        (dict(base_model_type="upcycle_moe"), "dense family"),
        (dict(shared_expert_gate=True), "shared_expert_gate needs a shared expert"),
        (dict(num_experts=4, layer_experts=[4, 2, 3]), "one count per MoE layer"),
        (dict(num_experts=4, layer_experts=[3, 2]), "num_experts \\(4\\) the largest"),
        (dict(num_experts=4, num_experts_per_tok=3, layer_experts=[4, 2]), "fewest experts"),
    ],
)
def test_bad_moe_keys_are_refused(overrides, message):
    import upcycle.modeling

    with pytest.raises(ValueError, match=message):
        upcycle.modeling.UpcycleMoeConfig(num_hidden_layers=2, **overrides)
