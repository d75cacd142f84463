"""The recipes of `upcycle train`, one per --method, each composed of the shared components
(`upcycle.train.components`) and, for the adapter recipe, a strategy
(`upcycle.train.strategies`):

    adapter.py   --method adapter: train what --adapter says, one process or many, exact resume
    readme.py    --method readme: Read-ME's alternating router and backbone rounds

`train(opts)` validates the options and runs the recipe --method names; no recipe imports
another's names.
"""

from __future__ import annotations

from upcycle.train.options import TrainOptions
from upcycle.train.recipes.adapter import train as train_adapter
from upcycle.train.recipes.readme import train_readme

RECIPES = {"adapter": train_adapter, "readme": train_readme}  # --method -> recipe


def train(opts: TrainOptions, log=None) -> dict:
    """Validate opts and run the recipe of opts.method; returns the final metrics."""
    opts.validate()
    return RECIPES[opts.method](opts, log=log)
