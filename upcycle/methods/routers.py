"""Router initializations shared by the conversion methods (float32 arrays of shape (E, H))."""

from __future__ import annotations

import numpy as np

from upcycle.methods.base import layer_rng

ROUTER_INITS = ("random", "zeros", "hidden")


def random_router(
    num_experts: int, hidden: int, std: float, seed: int, layer: int, salt: int = 1
) -> np.ndarray:
    """N(0, std^2) rows (AquilaMoE uses std 0.02); `salt` tells apart routers of one layer."""
    rng = layer_rng(seed, layer, salt=salt)
    return (rng.standard_normal((num_experts, hidden), dtype=np.float32) * np.float32(std)).astype(
        np.float32
    )


def zeros_router(num_experts: int, hidden: int) -> np.ndarray:
    """All logits equal: uniform routing, ties broken by expert index."""
    return np.zeros((num_experts, hidden), dtype=np.float32)


def hidden_state_rows(means: np.ndarray) -> np.ndarray:
    """Router rows from per-expert mean hidden states (E, H): centered across experts, unit norm.

    Softmax ignores anything added to every row alike, so the component common to all prompt
    sets carries no routing information; removing it before normalizing lets each row point at
    what distinguishes its expert's prompts.
    """
    rows = means - means.mean(axis=0, keepdims=True)
    norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return (rows / norms).astype(np.float32)


def hidden_state_means(
    model_dir: str, prompt_sets: list[list[str]], layers: list[int]
) -> dict[int, np.ndarray]:
    """Mean hidden state at each router's input (the output of post_attention_layernorm).

    Returns {layer: (E, H)} for the given prompt sets, one set per expert. The dense model runs
    on the CPU (see load_for_calibration for the dtype); this loads the whole model once.
    """
    import torch

    from upcycle.io.models import load_tokenizer
    from upcycle.methods.calibration import load_for_calibration

    tok = load_tokenizer(model_dir)
    model = load_for_calibration(model_dir)
    hidden = model.config.hidden_size
    sums = {i: torch.zeros(len(prompt_sets), hidden, dtype=torch.float64) for i in layers}
    current: list[int] = [0]

    def hook(i):
        def fn(_module, _inp, out):
            sums[i][current[0]] += out.detach().reshape(-1, hidden).double().sum(0)

        return fn

    handles = [
        model.model.layers[i].post_attention_layernorm.register_forward_hook(hook(i))
        for i in layers
    ]
    try:
        with torch.no_grad():
            for e, prompts in enumerate(prompt_sets):
                current[0] = e
                count = 0
                for text in prompts:
                    ids = tok(text, return_tensors="pt").input_ids
                    if ids.shape[1]:
                        model(input_ids=ids)
                        count += ids.shape[1]
                for i in layers:
                    sums[i][e] /= max(count, 1)
    finally:
        for h in handles:
            h.remove()
    return {i: s.float().numpy() for i, s in sums.items()}
