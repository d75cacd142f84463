"""Token loss without the full logits tensor.

A causal LM's loss needs (positions, vocab) logits: for the default model, 1k positions make
a 200 MB fp32 tensor, and softmax plus its gradients triple that. Training keeps the LM head
frozen (adapters never train it), so the loss can run in chunks of positions and produce its
gradient for the hidden states during the forward pass: per chunk, logits -> log-sum-exp ->
(softmax - one-hot) @ W. Nothing of vocab size outlives a chunk, and the backward pass is a
multiply. Same arithmetic as `F.cross_entropy` on `lm_head` logits upcast to fp32.

The model's own forward still runs (so DDP hooks, adapters and router losses work as usual);
only its `lm_head` is swapped for an identity during the call, for the model types whose
forward does nothing to logits after the head (their record in `upcycle.arch` has
``plain_head``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from upcycle.arch import record
from upcycle.train.data import IGNORE

CHUNK = 256


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        n = hidden.shape[0]
        # one (chunk, V) fp32 buffer for the whole call; every step below works in place
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            t = targets[s : s + chunk]
            rows = torch.arange(len(t), device=t.device)
            valid = t != IGNORE
            picked = t.clamp_min(0)
            logits = buf[: len(t)]
            if weight.dtype == torch.float32:
                torch.mm(hidden[s : s + chunk], weight.t(), out=logits)
            else:  # bf16/fp16 logits, upcast as transformers' loss does
                logits.copy_(hidden[s : s + chunk] @ weight.t())
            target_logit = logits[rows, picked]
            peak = logits.amax(dim=-1, keepdim=True)
            total_exp = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
            lse = (peak + total_exp.log()).squeeze(1)
            total += ((lse - target_logit) * valid).sum()
            if grad is not None:
                probs = logits.div_(total_exp)
                probs[rows, picked] -= 1.0
                probs.masked_fill_(~valid[:, None], 0.0)
                torch.mm(probs.to(weight.dtype), weight, out=grad[s : s + chunk])
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """Sum over positions of cross_entropy(hidden @ weight^T, targets), IGNORE skipped.

    hidden (N, H), weight (V, H) frozen, targets (N,). Returns a float32 scalar.
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy needs a frozen output layer")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside DDP / peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def chunked_head(model: nn.Module) -> nn.Linear | None:
    """The frozen, bias-free LM head when the chunked loss applies to this model, else None."""
    lm = causal_lm(model)
    head = getattr(lm, "lm_head", None)
    config = getattr(lm, "config", None)
    if (
        not record(getattr(config, "model_type", None)).plain_head
        or type(head) is not nn.Linear
        or head.bias is not None
        or head.weight.requires_grad
    ):
        return None
    return head


@contextlib.contextmanager
def hidden_instead_of_logits(model: nn.Module):
    """Within the block, the model's `logits` output holds the final hidden states."""
    lm = causal_lm(model)
    head = lm.lm_head
    lm.lm_head = nn.Identity()
    try:
        yield head
    finally:
        lm.lm_head = head
