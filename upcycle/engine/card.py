"""What a conversion writes besides the weights: its config, provenance and model card.

`conversion_contents(plan)` is handed to the one writer of model folders
(`upcycle.engine.outputs.write_model`), which also copies the tokenizer files and code.
"""

from __future__ import annotations

import os

from upcycle import __version__
from upcycle.engine.outputs import Contents, human_count
from upcycle.io.arrays import CONFIG_NAMES


def conversion_contents(plan) -> Contents:
    """config.json, the source's tokenizer files, the method's files, upcycle.json, README.md."""
    provenance = {
        "upcycle_version": __version__,
        "method": plan.options.method,
        "paper": plan.method.info.paper,
        "exact": plan.method.info.exact,
        "source": {
            "path": plan.source,
            "model_type": plan.family.model_type,
            "params": plan.source_params,
        },
        "target": {"model_type": plan.target.model_type, "architecture": plan.target.architecture},
        "moe_layers": plan.moe_layers,
        "options": plan.options.record(),
    }
    report = plan.method.report()
    if report:  # what a data-driven method found (readme)
        provenance["report"] = report
    why = plan.method.inexact()
    if why:
        provenance["not_exact"] = why
    return Contents(
        config=plan.config,
        files_from=plan.source,
        code_files=plan.code_files,  # custom architectures: loaded with trust_remote_code=True
        write_files=plan.method.write_files,
        provenance=provenance,
        card=_model_card(plan),
    )


def _exactness(plan) -> str:
    why = plan.method.inexact()
    if why:
        return f"Not the dense model's function, on purpose: {why}."
    return f"When it equals the dense model before training: {plan.method.info.exact}."


def _model_card(plan) -> str:
    opts, lay = plan.options, plan.layout
    name = os.path.basename(plan.source.rstrip("/"))
    return f"""---
library_name: transformers
tags:
- moe
- upcycle
- {opts.method}-upcycling
---

# {name} upcycled to {plan.target.architecture}

This Mixture-of-Experts checkpoint was made from the dense `{plan.family.model_type}` model
`{name}` by upcycle {__version__} with the `{opts.method}` method ({plan.method.info.paper}):
{plan.method.info.summary}.

| | |
|---|---|
| architecture | `{plan.target.architecture}` (`{plan.target.model_type}`) |
| MoE layers | {len(plan.moe_layers)} of {plan.num_layers} |
| experts | {lay.num_experts} per MoE layer, top-{lay.top_k}, width {lay.expert_width} |
| method options | {plan.method.describe()} |
| parameters | {human_count(plan.total_params)} total, {human_count(plan.active_params)} active per token |
| dtype | {CONFIG_NAMES[plan.dtype]} |
| seed | {opts.seed} |

{_exactness(plan)}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

The exact options are in `upcycle.json`.
"""
