"""A model's decoder run one layer at a time over the calibration blocks, loaded as it goes.

The model is built with every parameter on the meta device (`empty_causal_lm`); only what one
step needs is ever in memory:

1. Capture: the embedding's rows of the tokens present (and whatever else sits outside the
   decoder layers) are loaded and every decoder layer is replaced by a recorder that keeps the
   arguments the model passes it (attention mask, position ids, rotary embeddings: per layer,
   since families such as Gemma give local and global layers different ones; a tensor equal to
   the previous batch's is kept once) and hands its input on unchanged. One forward per batch
   of blocks gives the embeddings, the decoder's input, and each layer's arguments; the outer
   weights are released afterwards.
2. Layers, in order: `load(i)` reads layer i's tensors from the checkpoint in float32 (the MoE
   block's router and experts through the checkpoint's layout, fused as transformers holds
   them), `run` passes every calibration block through it, `advance` replaces the hidden
   states by its output, `release` frees it.

So the resident memory is one layer's weights (plus what a prune builds from them), the
calibration hidden states (blocks x seq_len x hidden, float32) and one batch's activations,
whatever the model's size. The hidden states a layer receives are the outputs of the layers
before it as they were left: a prune that changes layer i before `advance(i)` makes every later
layer's statistics come from the pruned model, as it will run.
"""

from __future__ import annotations

import torch

from upcycle.errors import InputError
from upcycle.io.arrays import to_torch
from upcycle.io.checkpoint import Checkpoint
from upcycle.prune.plan import Layout

BATCH_ROWS = 2  # calibration blocks per forward pass (its activations are transient memory)


class _Stop(Exception):
    """Raised by the last recorder: nothing past the decoder layers is needed."""


class Measured(Exception):
    """Raised by a statistics hook once it has what it needs from a batch: the rest of the
    layer's forward (the experts, above all) is skipped when its output is not wanted."""


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer during the capture: keeps its call's arguments."""

    def __init__(self, calls: list, first: list | None, last: bool):
        super().__init__()
        self.calls, self.first, self.last = calls, first, last

    def forward(self, hidden_states, *args, **kwargs):
        call = (args, kwargs)
        self.calls.append(_reuse(self.calls[-1], call) if self.calls else call)
        if self.first is not None:
            self.first.append(hidden_states)
        if self.last:
            raise _Stop
        return hidden_states


def _reuse(before, now):
    """`now` with every tensor equal to its counterpart in `before` replaced by that one: the
    masks and rotary embeddings of same-length blocks are kept once, not once per block."""
    if isinstance(now, torch.Tensor):
        same = (
            isinstance(before, torch.Tensor)
            and before.shape == now.shape
            and before.dtype == now.dtype
            and torch.equal(before, now)
        )
        return before if same else now
    if isinstance(now, (tuple, list)) and type(before) is type(now) and len(before) == len(now):
        return type(now)(_reuse(b, n) for b, n in zip(before, now, strict=True))
    if isinstance(now, dict) and isinstance(before, dict):
        return {k: _reuse(before.get(k), v) for k, v in now.items()}
    return now


def _set_param(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    setattr(module, leaf, torch.nn.Parameter(value, requires_grad=False))


def moe_block(layer: torch.nn.Module, layout: Layout, i: int) -> torch.nn.Module:
    """The MoE block of a decoder layer: the module with a router `gate` and `experts`."""
    found = {
        name: m
        for name, m in layer.named_modules()
        if isinstance(getattr(m, "gate", None), torch.nn.Module) and hasattr(m, "experts")
    }
    path = layout.target.router.rsplit(".gate.", 1)[0]
    if path in found:
        return found[path]
    if len(found) == 1:
        return next(iter(found.values()))
    raise InputError(f"layer {i}: cannot tell the MoE block among {sorted(found) or 'none'}")


def _layers_path(layout: Layout) -> str:
    """The decoder's layer list, e.g. "model.layers" for the prefix "model.layers.{i}."."""
    return layout.prefix.format(i=0).rsplit(".", 2)[0]


class LayerRunner:
    """The calibration blocks `ids` (B, S) and a layer-at-a-time view of the model."""

    def __init__(self, ckpt: Checkpoint, layout: Layout, ids: torch.Tensor):
        from upcycle.io.models import empty_causal_lm

        self.ckpt, self.layout = ckpt, layout
        self.model = empty_causal_lm(ckpt.path)
        self.layers = self.model.get_submodule(_layers_path(layout))
        if len(self.layers) != layout.num_layers:
            raise InputError(
                f"{ckpt.path}: the model builds {len(self.layers)} layers, "
                f"the config says {layout.num_layers}"
            )
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list] = [[] for _ in range(layout.num_layers)]
        self._capture(ids)

    def _outer_names(self) -> list[str]:
        inner = _layers_path(self.layout) + "."
        return [
            n
            for n, _ in self.model.named_parameters()
            if not n.startswith(inner) and not n.startswith("lm_head.")
        ]

    def _capture(self, ids: torch.Tensor) -> None:
        embed = self.model.get_input_embeddings()
        embed_name = next(n for n, p in self.model.named_parameters() if p is embed.weight)
        # only the rows of the tokens present are read; the blocks index them through `local`
        vocab, local = torch.unique(ids, return_inverse=True)
        outer = self._outer_names()
        for name in outer:
            value = self._tensor(name, vocab if name == embed_name else None)
            _set_param(self.model, name, value)
        padding = getattr(embed, "padding_idx", None)
        embed.padding_idx = None  # it may lie past the rows read; it only matters to gradients
        real = list(self.layers)
        last = len(real) - 1
        for i in range(len(real)):
            first = self.hidden if i == 0 else None
            self.layers[i] = _Recorder(self.calls[i], first, i == last)
        try:
            with torch.no_grad():
                for s in range(0, ids.shape[0], BATCH_ROWS):
                    embeds = embed(local[s : s + BATCH_ROWS])
                    try:
                        self.model(inputs_embeds=embeds, use_cache=False)
                    except _Stop:
                        pass
        finally:
            embed.padding_idx = padding
            for i, layer in enumerate(real):
                self.layers[i] = layer
            for name in outer:  # the embedding's job is done
                _set_param(self.model, name, torch.empty(0, device="meta"))

    def _tensor(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A tensor of the checkpoint in float32; with `rows`, only those rows of it."""
        if name not in self.ckpt:
            raise InputError(f"{self.ckpt.path}: tensor {name} is missing")
        if rows is None:
            return self.ckpt.get_torch(name).float()
        return to_torch(self.ckpt.get_rows(name, rows.numpy()), self.ckpt.infos[name].dtype).float()

    def load(self, i: int, experts) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """Decoder layer i with its weights (float32) and its MoE block (None in a dense
        layer). `experts(i)` gives the MoE layer's (router, gate_up, down) in float32."""
        from upcycle.prune.experts import install

        layer = self.layers[i]
        block = moe_block(layer, self.layout, i) if i in self.layout.moe_layers else None
        own = set()
        if block is not None:
            if not hasattr(block.experts, "gate_up_proj"):
                raise InputError(f"layer {i}: the model's experts are not fused; cannot prune them")
            own = {id(p) for p in (block.gate.weight, *block.experts.parameters())}
        prefix = self.layout.prefix.format(i=i)
        for name, param in list(layer.named_parameters()):
            if id(param) not in own:
                _set_param(layer, name, self._tensor(prefix + name))
        if block is not None:
            install(block, *experts(i), self.layout.top_k)
        return layer, block

    def release(self, i: int) -> None:
        self.layers[i].to("meta")

    def run(self, i: int, advance: bool = False) -> None:
        """Every calibration batch through layer i (loaded); with `advance`, its outputs
        become the hidden states the next layer receives. Without, a hook may end a batch
        early by raising `Measured`."""
        layer = self.layers[i]
        with torch.no_grad():
            for b in range(len(self.hidden)):
                args, kwargs = self.calls[i][b]
                try:
                    out = layer(self.hidden[b], *args, **kwargs)
                except Measured:
                    if advance:
                        raise
                    continue
                if advance:
                    self.hidden[b] = out[0] if isinstance(out, (tuple, list)) else out
