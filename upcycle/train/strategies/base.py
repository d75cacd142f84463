"""`Strategy`: what one `--adapter` trains and how its weight files are written and read.

A strategy is a small object a recipe (`upcycle.train.recipes`) builds from the options before
any model is loaded (so its options fail first), then asks:

    load_from(base, resume_from)   the folder the model's weights come from (a run that trains
                                   every weight resumes from its checkpoint, the others load base)
    prepare(model, base)           attach the adapter or choose the trainable parameters
    save(model, folder, weights)   the weight files of a checkpoint or of the run's root
    load(model, folder)            restore a checkpoint's weights (before the model is sharded)
    aux_scale                      the factor on the model's router aux loss in the step's loss

`save` takes the full tensors of a sharded (FSDP) model, gathered by every process
(`upcycle.train.sharding.full_weights`: the trainable parameters and the buffers), or None to
save from the model itself.

What the registry derives from a strategy's class (read before any model exists):

    trains_weights   it trains the model's own weights: the LoRA options and quantized bases do
                     not apply, and `upcycle merge` writes its runs as standalone weights
    options          options its family uses (name -> how the command line spells it), refused
                     by the strategies that train weights when changed from their defaults
    own_options      options only this strategy takes, refused by every other one when changed
    files            the weight files it writes (`writes(name)` decides for a name)
"""

from __future__ import annotations

from types import MappingProxyType


class Strategy:
    """Defaults: trains an adapter, loads the base, no options or files of its own."""

    trains_weights = False
    options: MappingProxyType = MappingProxyType({})
    own_options: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def __init__(self, opts):
        self.opts = opts
        self.aux_scale = 1.0

    @classmethod
    def writes(cls, name: str) -> bool:
        """Whether `name` is one of the weight files this strategy writes."""
        return name in cls.files

    def load_from(self, base: str, resume_from: str | None) -> str:
        return base

    def prepare(self, model, base: str):
        raise NotImplementedError

    def save(self, model, folder: str, weights: dict | None = None) -> None:
        raise NotImplementedError

    def load(self, model, folder: str) -> None:
        raise NotImplementedError


def use_router_loss(model, coef: float) -> bool:
    """Make an MoE model return its router balance loss (transformers' `aux_loss`) with weight
    `coef` (the model's `router_aux_loss_coef`); False for models without one."""
    config = model.config
    if not hasattr(config, "output_router_logits"):
        return False
    config.output_router_logits = coef > 0
    config.router_aux_loss_coef = coef
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = coef
    return coef > 0
