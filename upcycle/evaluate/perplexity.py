"""Perplexity of a causal LM over token blocks, with routing statistics for MoE models.

The loss is the mean next-token negative log-likelihood (nats) over every predicted position:
a block of T tokens predicts tokens 1..T-1 from their prefixes, so N blocks give N * (T - 1)
predictions. Logits are cast to float32 before the log-softmax whatever the model's dtype.
"""

from __future__ import annotations

import math
import sys

import torch

from upcycle.errors import OptionError
from upcycle.evaluate.routing import RoutingRecorder


def perplexity(
    model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False
) -> dict:
    """Mean token NLL of `model` on `blocks` (N, T) LongTensor, in batches of `batch_size`.

    Returns ``{"loss": float, "perplexity": float, "tokens": int}`` where tokens = N * (T - 1).
    Runs under ``torch.no_grad`` in eval mode on the model's device; a progress bar over
    batches goes to stderr if `progress`.
    """
    if batch_size < 1:
        raise OptionError(f"batch size must be at least 1, got {batch_size}")
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise OptionError(f"blocks must have shape (N, T) with T >= 2, got {tuple(blocks.shape)}")
    from tqdm import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, blocks.shape[0], batch_size)
    try:
        with torch.no_grad():
            for i in tqdm(starts, desc="eval", unit="batch", file=sys.stderr, disable=not progress):
                ids = blocks[i : i + batch_size].to(device)  # (B, T)
                logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
                logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(nll)
                count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def evaluate(
    model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False
) -> dict:
    """:func:`perplexity` plus ``"routing"``: per-layer routing statistics (None if dense).

    One forward pass serves both; see :mod:`upcycle.evaluate.routing` for the statistics.
    """
    with RoutingRecorder(model) as recorder:
        result = perplexity(model, blocks, batch_size, progress)
    result["routing"] = recorder.stats()
    return result
