"""Training checkpoints without pickle: weights, optimizer and RNG in safetensors.

    OUT/checkpoints/step-N/
        the weights, as the run's strategy saves them (`upcycle.train.strategies`):
          adapter_config.json, adapter_model.safetensors   adapters, loadable with peft
          config.json, model*.safetensors                  --adapter full: the whole model
          routers.safetensors                              --adapter router: the routers
        optimizer.safetensors                            AdamW moments and step counts
        rng-R.safetensors                                each process's torch RNG state
        trainer_state.json                               step, scheduler, options, param groups

A checkpoint folder is written under a temporary name and renamed when complete, so a folder
named step-N is always whole. Weights and optimizer moments are full tensors, also under FSDP
(gathered from the processes' shards, `upcycle.train.sharding`), so a checkpoint does not depend
on the number of processes that wrote it.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from upcycle.errors import InputError
from upcycle.train.sharding import full_tensor, full_weights, shard_like

STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(out: str) -> str:
    return os.path.join(out, "checkpoints")


def latest_checkpoint(out: str) -> str | None:
    root = checkpoint_root(out)
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return os.path.join(root, max(steps)[1]) if steps else None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """The optimizer state as full CPU tensors (sharded moments are gathered: under FSDP every
    process calls this) and its param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            t = full_tensor(value) if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, path: str, param_groups: list) -> None:
    """Restore the state `optimizer_tensors` saved; under FSDP each process keeps its shard."""
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        i = int(idx)
        state.setdefault(i, {})[name] = shard_like(t, params[i]) if i < len(params) else t
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_checkpoint(
    acc, model, optimizer, scheduler, out: str, step: int, state: dict, strategy
) -> str:
    """Every process calls this; the main one writes the shared files and renames. A sharded
    model's weights and optimizer state are gathered by all processes first."""
    root = checkpoint_root(out)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    acc.wait_for_everyone()
    save_file(rng_state(), os.path.join(tmp, f"rng-{acc.process_index}.safetensors"))
    model = acc.unwrap_model(model)
    weights = full_weights(model)
    if weights is not None or acc.is_main_process:
        tensors, groups = optimizer_tensors(optimizer)
    if acc.is_main_process:
        strategy.save(model, tmp, weights)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump(
                {
                    **state,
                    "step": step,
                    "scheduler": scheduler.state_dict(),
                    "param_groups": groups,
                },
                f,
                indent=2,
            )
    acc.wait_for_everyone()  # every process's own files (its RNG state) are in tmp by now
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    acc.wait_for_everyone()
    return final


def read_state(path: str) -> dict:
    """A checkpoint's trainer_state.json (one-line error when it is missing or damaged)."""
    try:
        with open(os.path.join(path, STATE)) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a complete checkpoint ({e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise InputError(f"{path}: not a complete checkpoint (no step in {STATE})")
    return state


def load_checkpoint(acc, optimizer, scheduler, path: str) -> dict:
    """Restore optimizer, scheduler and this process's RNG; returns the state. The weights are
    restored before that, into the model before it is sharded or wrapped (`strategy.load`)."""
    state = read_state(path)
    try:
        load_optimizer(optimizer, path, state["param_groups"])
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"{path}: the optimizer state does not fit this run ({e})") from None
    scheduler.load_state_dict(state["scheduler"])
    rng = os.path.join(path, f"rng-{acc.process_index}.safetensors")
    if os.path.isfile(rng):
        set_rng_state(load_file(rng))
    return state
