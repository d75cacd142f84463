"""Plots of routing statistics (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os

from upcycle.errors import InputError, OptionError, OutputError


def plot_load_heatmap(stats: dict, path: str, title: str | None = None) -> str:
    """Layer x expert heatmap of the fraction of tokens routed to each expert, saved as PNG.

    stats: the dict of :meth:`RoutingRecorder.stats` (``layers[i]["fraction"]``: (E,) values
    summing to top_k). Cells are annotated when there are at most 16 experts. The colour scale
    runs from 0 to the largest fraction; the title gives the balanced value top_k / E.
    Returns `path`.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("plotting needs matplotlib (pip install 'upcycle[plot]')") from None
    layers = (stats or {}).get("layers") or []
    if not layers:
        raise InputError("no routing statistics to plot (the model has no MoE layers)")
    import numpy as np

    data = np.array([layer["fraction"] for layer in layers], dtype=float)  # (L, E)
    n_layers, n_experts = data.shape
    top_k = stats.get("top_k", 0)
    fig, ax = plt.subplots(
        figsize=(min(3 + 0.5 * n_experts, 16), min(2 + 0.25 * n_layers, 20)), dpi=100
    )
    try:
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(data.max(), 1e-9))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_experts) if n_experts <= 32 else range(0, n_experts, n_experts // 16))
        step = max(1, n_layers // 32)
        ax.set_yticks(range(0, n_layers, step))
        ax.set_yticklabels([str(layers[i]["layer"]) for i in range(0, n_layers, step)])
        if n_experts <= 16 and n_layers <= 64:
            mid = data.max() / 2
            for (i, j), v in np.ndenumerate(data):
                color = "black" if v > mid else "white"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
        fig.colorbar(image, ax=ax, label="fraction of tokens")
        balanced = f"balanced = {top_k / n_experts:.3f}" if top_k else ""
        heading = title or "Expert load"
        ax.set_title(f"{heading}\ntop-{top_k} of {n_experts} experts, {balanced}", fontsize=10)
        fig.tight_layout()
        try:
            fig.savefig(path, format="png")
        except OSError as e:
            raise OutputError(f"{path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return os.fspath(path)
