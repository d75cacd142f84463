"""Router initializations shared by the conversion methods."""

from __future__ import annotations

import torch

from upcycle.converters.base import layer_generator

ROUTER_INITS = ("random", "zeros", "hidden")


def random_router(num_experts: int, hidden: int, std: float, seed: int, layer: int) -> torch.Tensor:
    """N(0, std^2) rows (AquilaMoE uses std 0.02)."""
    g = layer_generator(seed, layer, salt=1)
    return torch.randn(num_experts, hidden, generator=g, dtype=torch.float32) * std


def zeros_router(num_experts: int, hidden: int) -> torch.Tensor:
    """All logits equal: uniform routing, ties broken by expert index."""
    return torch.zeros(num_experts, hidden, dtype=torch.float32)


def hidden_state_rows(means: torch.Tensor) -> torch.Tensor:
    """Router rows from per-expert mean hidden states (E, H): centered across experts, unit norm.

    Softmax ignores anything added to every row alike, so the component common to all prompt
    sets carries no routing information; removing it before normalizing lets each row point at
    what distinguishes its expert's prompts.
    """
    rows = means - means.mean(dim=0, keepdim=True)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def hidden_state_means(
    model_dir: str, prompt_sets: list[list[str]], layers: list[int]
) -> dict[int, torch.Tensor]:
    """Mean hidden state at each router's input (the output of post_attention_layernorm).

    Returns {layer: (E, H)} for the given prompt sets, one set per expert. The dense model runs
    in fp32 on the CPU; this loads the whole model once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    decoder_layers = model.model.layers
    sums: dict[int, torch.Tensor] = {}
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(_module, _inp, out):
            captured[i] = out.detach().reshape(-1, out.shape[-1]).sum(0)

        return fn

    handles = [
        decoder_layers[i].post_attention_layernorm.register_forward_hook(hook(i)) for i in layers
    ]
    try:
        for e, prompts in enumerate(prompt_sets):
            count = 0
            acc = {i: torch.zeros(model.config.hidden_size) for i in layers}
            for text in prompts:
                ids = tok(text, return_tensors="pt").input_ids
                if ids.shape[1] == 0:
                    continue
                model(input_ids=ids)
                count += ids.shape[1]
                for i in layers:
                    acc[i] += captured[i]
            for i in layers:
                sums.setdefault(i, torch.zeros(len(prompt_sets), model.config.hidden_size))[e] = (
                    acc[i] / max(count, 1)
                )
    finally:
        for h in handles:
            h.remove()
    return sums
