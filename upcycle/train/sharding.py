"""FSDP2 for `upcycle train` under `accelerate launch` with an FSDP config (`fsdp_version: 2`).

On GPUs accelerate applies FSDP2 in `Accelerator.prepare` (torch's `fully_shard` on each
decoder layer, on the embeddings and head, and on the root). On CPU it does not: with
`Accelerator(cpu=True)` its state is MULTI_CPU and the FSDP plugin is dropped, so the run
would be DDP. `shard` then calls `fully_shard` itself on the same decoder layers and on the
root, over the gloo process group accelerate started.

Either way every parameter becomes a DTensor of which each process holds 1/N (rows split by
Shard(0)). FSDP2 shards per parameter, so a frozen base weight and a trainable adapter in the
same decoder layer need no `use_orig_params`: only the trainable ones get gradients, which are
reduce-scattered (averaged over processes, as DDP does). Checkpoints and the final weights hold
full tensors gathered here and written by the main process, so a run saved with N processes
resumes with any other number, and `upcycle merge` reads it as any other run.
"""

from __future__ import annotations

import contextlib
import os

import torch

from upcycle.errors import UnsupportedError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """The launch config asks for FSDP (`accelerate launch` sets ACCELERATE_USE_FSDP)."""
    return _env_flag("ACCELERATE_USE_FSDP")


def check_launch(opts) -> None:
    """One-line errors for FSDP settings `upcycle train` does not support."""
    if not fsdp_requested():
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UnsupportedError(
            "FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (fsdp_config)"
        )
    if _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise UnsupportedError(
            "fsdp_cpu_ram_efficient_loading is not supported: set it to false "
            "(every process loads the base, then keeps its shard)"
        )
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise UnsupportedError(
            "fsdp_activation_checkpointing is not supported: set it to false and use "
            "upcycle train --gradient-checkpointing"
        )
    if opts.load_in_4bit or opts.load_in_8bit:
        raise UnsupportedError("--load-in-4bit/--load-in-8bit do not combine with FSDP")


def _layer_classes(model) -> set[str]:
    """Class names of the modules that get their own FSDP unit: FSDP_TRANSFORMER_CLS_TO_WRAP
    (the config's fsdp_transformer_layer_cls_to_wrap), else transformers' `_no_split_modules`
    (the decoder layers), as accelerate's TRANSFORMER_BASED_WRAP chooses them."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    if named:
        return {n.strip() for n in named.split(",") if n.strip()}
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard(acc, model) -> bool:
    """`fully_shard` the model in place when FSDP was asked for and accelerate will not do it
    (CPU); True if it did. When accelerate runs FSDP2 it shards the model in `prepare`."""
    if not fsdp_requested() or acc.is_fsdp2 or not torch.distributed.is_initialized():
        return False
    from torch.distributed.fsdp import fully_shard

    if acc.mixed_precision != "no":
        raise UnsupportedError(
            "FSDP on CPU runs without mixed precision: set mixed_precision: 'no' "
            "(--dtype bfloat16 stores the base in bf16)"
        )
    classes = _layer_classes(model)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise UnsupportedError(
            f"FSDP: the model has no module of class {', '.join(sorted(classes)) or '(none named)'} "
            "to shard (set fsdp_transformer_layer_cls_to_wrap)"
        )
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model)
    return True


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_sizes(model) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model) over the parameters."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in model.parameters():
        full += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, full


def full_weights(model) -> dict[str, torch.Tensor] | None:
    """For a sharded model, its state dict as full CPU tensors: the trainable parameters,
    gathered from every process (so every process must call this, in step), and the buffers;
    frozen sharded parameters (the base under an adapter) are left out. None when no parameter
    is sharded: the strategies then save from the model itself."""
    from torch.distributed.tensor import DTensor

    entries = model.state_dict(keep_vars=True)
    if not any(isinstance(v, DTensor) for v in entries.values()):
        return None
    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}  # tied parameters stay one tensor
    for name, value in entries.items():
        if isinstance(value, DTensor):
            if not value.requires_grad:
                continue
            if id(value) not in gathered:
                gathered[id(value)] = value.detach().full_tensor().cpu()
            out[name] = gathered[id(value)]
        else:
            out[name] = value.detach().cpu()
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor of `param`'s shape as a DTensor placed like `param` (each process keeps
    its own part; no communication); `t` unchanged when `param` is not a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or t.dim() == 0 or t.shape != param.shape:
        return t
    return distribute_tensor(
        t.to(param.device), param.device_mesh, param.placements, src_data_rank=None
    )


@contextlib.contextmanager
def no_sync(acc, model):
    """Gradients of this micro-batch are kept, not yet averaged over processes."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # as accelerate does for FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with acc.no_sync(model):
            yield
