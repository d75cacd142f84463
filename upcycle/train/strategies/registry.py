"""The training strategies by `--adapter` name, and what the rest of upcycle derives from them.

STRATEGIES is the one list to extend: a new adapter is its module (a `Strategy` subclass, see
`upcycle.train.strategies.base`) and its line below. `upcycle.train.options` validates the
options with ADAPTERS, WEIGHT_MODES, LORA_ONLY and OWN_OPTIONS, `upcycle merge` tells weight
runs from adapter runs with WEIGHT_MODES, and the final save replaces what `is_weight_file`
names.
"""

from __future__ import annotations

from types import MappingProxyType

from upcycle.train.strategies.full import FullStrategy
from upcycle.train.strategies.peft import ExpertsLoraStrategy, LoraStrategy, MixLoraStrategy
from upcycle.train.strategies.router import RouterStrategy

# --adapter name -> strategy, in the order the command line lists them
STRATEGIES = MappingProxyType(
    {
        "mixlora": MixLoraStrategy,
        "lora": LoraStrategy,
        "experts-lora": ExpertsLoraStrategy,
        "full": FullStrategy,
        "router": RouterStrategy,
    }
)

ADAPTERS = tuple(STRATEGIES)
# the strategies that train the model's own weights: no LoRA options, no quantized base
WEIGHT_MODES = tuple(name for name, s in STRATEGIES.items() if s.trains_weights)
# options of the adapters on a frozen base (name -> flag), refused by the WEIGHT_MODES
LORA_ONLY = MappingProxyType(
    {
        option: flag
        for s in STRATEGIES.values()
        if not s.trains_weights
        for option, flag in s.options.items()
    }
)
# adapter -> the options only it takes
OWN_OPTIONS = MappingProxyType({name: s.own_options for name, s in STRATEGIES.items()})


def is_weight_file(name: str) -> bool:
    """A file some strategy writes as weights (a run's root may hold it from an earlier finish)."""
    return any(s.writes(name) for s in STRATEGIES.values())


def strategy_for(opts):
    """The strategy for opts.adapter (its options validated before any model is loaded)."""
    return STRATEGIES[opts.adapter](opts)
