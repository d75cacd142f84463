"""Prune an MoE checkpoint: fewer experts per layer, narrower experts, or both.

    upcycle/prune/plan.py     options, the checkpoint's expert layout (from its architecture
                              record), the per-layer schedule and every refusal (no data read)
    upcycle/prune/layerwise.py the decoder run one layer at a time over the calibration
                              blocks, each layer loaded from the checkpoint and freed after
    upcycle/prune/stats.py    routing and neuron statistics of one MoE block, by hooks
    upcycle/prune/select.py   frequency, uncurl (k-means on router-logit profiles), merge and
                              random choices; neuron choice (numpy)
    upcycle/prune/experts.py  the tensor operations, shared by the layer in memory and the output
    upcycle/prune/write.py    the output, streamed tensor by tensor through `write_model`
    upcycle/prune/run.py      `prune()`: check, then per layer gather statistics, decide and
                              prune in place; write

docs/prune.md describes the criteria and the output.
"""

from upcycle.prune.plan import CRITERIA, PruneOptions
from upcycle.prune.run import prune

__all__ = ["CRITERIA", "PruneOptions", "prune"]
