"""upcycle.kernels: the "upcycle" experts implementation registered with transformers."""

from __future__ import annotations

import pytest
import torch
import upcycle.kernels  # noqa: F401  (registers experts_implementation="upcycle")
from conftest import save_tiny


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_upcycle_experts_equal_eager_outputs_and_gradients(tmp_path, monkeypatch, family):
    """Stock MoE models loaded with experts_implementation="upcycle" give eager's logits and
    gradients (fp32), also with an expert that gets no token."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import ExpertsInterface
    from upcycle.kernels.experts import sorted_experts_forward

    calls = []

    def counted(*args):
        calls.append(1)
        return sorted_experts_forward(*args)

    path = save_tiny(str(tmp_path / family), family)
    assert ExpertsInterface._global_mapping["upcycle"] is sorted_experts_forward
    monkeypatch.setitem(ExpertsInterface._global_mapping, "upcycle", counted)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    results = []
    for impl in ("eager", "upcycle"):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, experts_implementation=impl
        )
        assert model.config._experts_implementation == impl
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        one = model(input_ids=ids[:1, :1]).logits  # one token: most experts get nothing
        results.append((logits.detach(), grads, one.detach()))
    assert calls  # the "upcycle" runs went through it
    (a_logits, a_grads, a_one), (b_logits, b_grads, b_one) = results
    torch.testing.assert_close(b_logits, a_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_one, a_one, rtol=1e-5, atol=1e-5)
    assert len(a_grads) == len(b_grads)
    for a, b in zip(a_grads, b_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
