"""Activations of a dense model on calibration text, for partitions and routers that need data.

For each FFN we keep, over up to `max_tokens` tokens, the router's input x (the FFN input, i.e.
the output of post_attention_layernorm) and the down projection's input h = act(gate x) * up x.
From these: which neurons matter for which token (their contribution |h_i| * ||down[:, i]||),
and how large each group of neurons' output is (what a router should predict).
Memory: max_tokens * (H * 4 + I * 2) bytes per layer; the dense model is loaded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerActivations:
    x: np.ndarray  # (T, H) float32, router input
    h: np.ndarray  # (T, I) float16, down-projection input

    def contributions(self, down: np.ndarray) -> np.ndarray:
        """(T, I) float32: |h_i| * ||down[:, i]||, neuron i's share of each token's FFN output."""
        return np.abs(self.h.astype(np.float32)) * np.linalg.norm(down, axis=0)[None, :]

    def active(self, down: np.ndarray, fraction: float) -> np.ndarray:
        """(T, I) bool: each token's top `fraction` of neurons by contribution."""
        c = self.contributions(down)
        k = max(1, int(round(fraction * c.shape[1])))
        kth = np.partition(c, c.shape[1] - k, axis=1)[:, c.shape[1] - k][:, None]
        return c >= kth

    def part_norms(self, down: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
        """(T, P): norm of each part's output h[:, p] @ down[:, p].T per token."""
        h = self.h.astype(np.float32)
        return np.stack([np.linalg.norm(h[:, p] @ down[:, p].T, axis=1) for p in parts], axis=1)


FP32_LIMIT_BYTES = (
    8e9  # models whose fp32 weights fit in this run in fp32; larger ones in their own dtype
)


def load_for_calibration(model_dir: str):
    """The model for computing statistics on CPU: fp32 while its fp32 weights stay under
    FP32_LIMIT_BYTES (the default model: 0.5 GB), else in the checkpoint's dtype, so a 7B model
    needs 14 GB in bf16 instead of 28 GB. Statistics are gathered in fp32 either way."""
    import torch

    from upcycle.io.checkpoint import Checkpoint
    from upcycle.io.models import load_causal_lm

    small = Checkpoint(model_dir).num_params() * 4 <= FP32_LIMIT_BYTES
    return load_causal_lm(model_dir, dtype=torch.float32 if small else "auto").eval()


def collect_activations(
    model_dir: str,
    texts: list[str],
    layers: list[int],
    *,
    max_tokens: int = 2048,
    seq_len: int = 256,
    log=None,
) -> dict[int, LayerActivations]:
    """Run the dense model on `texts` and keep each listed layer's FFN input and hidden activation."""
    import torch

    from upcycle.data import token_blocks
    from upcycle.io.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_for_calibration(model_dir)
    blocks = token_blocks(texts, tok, seq_len=seq_len, max_tokens=max_tokens)
    if log:
        log(f"collecting activations on {blocks.numel()} calibration tokens ...")
    xs: dict[int, list] = {i: [] for i in layers}
    hs: dict[int, list] = {i: [] for i in layers}
    handles = []
    for i in layers:
        mlp = model.model.layers[i].mlp
        handles.append(
            mlp.register_forward_pre_hook(
                lambda _m, args, i=i: xs[i].append(
                    args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32, copy=True)
                )
            )
        )
        handles.append(
            mlp.down_proj.register_forward_pre_hook(
                lambda _m, args, i=i: hs[i].append(
                    args[0].detach().reshape(-1, args[0].shape[-1]).half()
                )
            )
        )
    try:
        with torch.no_grad():
            for b in range(0, blocks.shape[0], 4):
                model(input_ids=blocks[b : b + 4])
    finally:
        for h in handles:
            h.remove()
    return {i: LayerActivations(torch.cat(xs[i]).numpy(), torch.cat(hs[i]).numpy()) for i in layers}


ROUTER_LOGIT_STD = 1e-3


def fit_linear_router(
    x: np.ndarray,
    y: np.ndarray,
    ridge: float = 0.1,
    logit_std: float = ROUTER_LOGIT_STD,
    log: bool = True,
) -> np.ndarray:
    """Least-squares W (P, H) with x @ W.T ~ log(y) (MoEfication's activation-predicting router),
    or ~ y itself with log=False (e.g. y an oracle's 0/1 choice per token and part).

    y holds positive sizes (each part's output norm per token), and what matters is their
    ranking within a token. A linear model fits their logarithm best: on the default model,
    ranking by the fitted log norms picks 4-6 points more of each token's top-k on held-out text
    than fitting the norms standardized per part. The ridge term is relative to the mean
    eigenvalue of x.T x. The fit decides the ranking of the experts (which ones a token gets);
    the result is then scaled so that its logits spread by `logit_std` across experts on x, which
    keeps the softmax mixing weights of the chosen experts near uniform. Granular experts are
    scaled for uniform weights (a token gets the sum of its chosen parts); with the raw fitted
    scale, one part could get most of the weight and be counted K times over. The default
    spread is tiny (1e-3) because a few tokens (the first of a sequence, for one) reach the
    router with inputs orders of magnitude larger than the rest: with a spread of 0.1 on
    average, those tokens still got peaked weights, and perplexity doubled (default model,
    G=64: 53.5 against 28.3 on 2048 tokens). Training then learns the scale.
    """
    x = x.astype(np.float64)
    y = np.log(np.maximum(y.astype(np.float64), 1e-12)) if log else y.astype(np.float64)
    gram = x.T @ x
    lam = ridge * np.trace(gram) / gram.shape[0]
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ y).T  # (P, H)
    logits = x @ w.T
    spread = float((logits - logits.mean(axis=1, keepdims=True)).std())  # what softmax sees
    return (w * (logit_std / max(spread, 1e-12))).astype(np.float32)
