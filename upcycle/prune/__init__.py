"""Prune an MoE checkpoint: fewer experts per layer, narrower experts, or both.

    upcycle/prune/plan.py     options, the checkpoint's expert layout (from its architecture
                              record), the per-layer schedule and every refusal (no data read)
    upcycle/prune/stats.py    routing and neuron statistics of the loaded model, by hooks
    upcycle/prune/select.py   frequency, uncurl (k-means on router-logit profiles) and merge
                              choices; neuron choice (numpy)
    upcycle/prune/experts.py  the tensor operations, shared by the model in memory and the output
    upcycle/prune/write.py    the output, streamed tensor by tensor through `write_model`
    upcycle/prune/run.py      `prune()`: check, gather statistics, decide, write

docs/prune.md describes the criteria and the output.
"""

from upcycle.prune.plan import CRITERIA, PruneOptions
from upcycle.prune.run import prune

__all__ = ["CRITERIA", "PruneOptions", "prune"]
