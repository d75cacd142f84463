"""full: every parameter trains (tied input/output embeddings stay one parameter).

A run folder (and each checkpoint) holds the model as `save_pretrained` writes it, with the
base's config.json (auto_map and all) and its custom code files (`write_config`, also used by
the Read-ME recipe, which saves whole models the same way). Resuming loads the checkpoint
instead of the base.
"""

from __future__ import annotations

import re

from upcycle.train.strategies.base import Strategy, use_router_loss


def write_config(base: str, folder: str, dtype: str) -> None:
    """The base's config.json (auto_map and all) with the dtype the weights are stored in,
    and the custom code files it names (through the one folder writer, `upcycle.engine.outputs`)."""
    from upcycle.engine.outputs import Contents, write_contents
    from upcycle.io.models import code_files, read_config

    config = read_config(base)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    write_contents(folder, Contents(config=config, code_files=code_files(base)))


class FullStrategy(Strategy):
    """full: every parameter trains; the model's router aux loss at --router-aux-loss-coef."""

    trains_weights = True
    files = ("model.safetensors", "model.safetensors.index.json")

    def __init__(self, opts):
        super().__init__(opts)
        self.base = None

    @classmethod
    def writes(cls, name: str) -> bool:
        return name in cls.files or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name) is not None

    def load_from(self, base: str, resume_from: str | None) -> str:
        # a checkpoint is a whole model: resuming loads it instead of the base
        return resume_from or base

    def prepare(self, model, base: str):
        self.base = base
        for p in model.parameters():
            p.requires_grad_(True)
        self.aux_scale = self.opts.router_aux_loss_coef
        use_router_loss(model, self.opts.router_aux_loss_coef)
        return model

    def save(self, model, folder: str, weights: dict | None = None) -> None:
        model.save_pretrained(folder, state_dict=weights)
        write_config(self.base, folder, self.opts.dtype)

    def load(self, model, folder: str) -> None:
        pass  # `load_from` gave the checkpoint's weights to from_pretrained
