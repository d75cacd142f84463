"""The arithmetic a merged model shares with its adapter: which base neurons an expert uses,
the factor on its output, and LoRA's scale.

Two users compute the same function from it: the MixLoRA forward
(`upcycle.adapters.layers.MixLoraFFN`, torch) and `upcycle merge`, which writes each expert
as base weights plus its LoRA delta (`upcycle.merge.MixLoraMerge` and `Adapter`, numpy).
Only numbers go in and out here (index ranges and scale factors), so neither framework is
imported and both apply them to their own tensors:

- expert e's gate and up projections are the base's rows `neurons(e)`, its down projection
  the same columns;
- the forward multiplies each routing weight by `scale`; a merged expert carries it in its
  down projection (the expert's output is linear in it);
- a LoRA delta is `lora_scaling(alpha, r) * B @ A`.
"""

from __future__ import annotations

from dataclasses import dataclass


def lora_scaling(lora_alpha: float, r: float) -> float:
    """LoRA's factor on B A: alpha / r."""
    return float(lora_alpha) / float(r)


@dataclass(frozen=True)
class ExpertView:
    """How E experts view one FFN of `intermediate` neurons.

    copy: every expert has all neurons, output factor 1. granular: the FFN is cut into
    `granularity` equal parts of `width` neurons, expert e owns part e mod granularity, and
    each expert's output is scaled by top_k / (E // granularity), E // granularity being the
    number of experts that share a part.
    """

    width: int  # neurons per expert
    slices: list[tuple[int, int]] | None  # per expert [lo, hi) of the base's neurons; None: all
    scale: float  # factor on each expert's output

    def neurons(self, e: int) -> tuple[int, int]:
        """[lo, hi) of the base FFN's neurons expert e uses."""
        return self.slices[e] if self.slices is not None else (0, self.width)


def expert_view(
    granular: bool, num_experts: int, top_k: int, intermediate: int, granularity: int
) -> ExpertView:
    """The view of a MixLoRA FFN (the caller checks that granularity divides `intermediate`)."""
    if not granular:
        return ExpertView(intermediate, None, 1.0)
    width = intermediate // granularity
    slices = [
        ((e % granularity) * width, (e % granularity + 1) * width) for e in range(num_experts)
    ]
    return ExpertView(width, slices, top_k / (num_experts // granularity))
