"""What a conversion writes besides the weights: config, tokenizer files, provenance, model card."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

from upcycle import __version__
from upcycle.io.arrays import CONFIG_NAMES

# Tokenizer and generation files copied verbatim from the source folder.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def write_metadata(plan, folder: str) -> None:
    """config.json, the source's tokenizer files, upcycle.json and README.md into `folder`."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(plan.config, f, indent=2)
        f.write("\n")
    for name in AUX_FILES:
        src = os.path.join(plan.source, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, name))
    for src in plan.code_files:  # custom architectures: loaded with trust_remote_code=True
        shutil.copyfile(src, os.path.join(folder, os.path.basename(src)))
    write_files = getattr(plan.method, "write_files", None)  # readme: its neuron sets
    if write_files:
        write_files(folder)
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
        "options": asdict(plan.options),
    }
    if getattr(plan.method, "report", None):  # what a data-driven method found (readme)
        provenance["report"] = plan.method.report
    with open(os.path.join(folder, "upcycle.json"), "w") as f:
        json.dump(provenance, f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(_model_card(plan))


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

When it equals the dense model before training: {plan.method.info.exact}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

The exact options are in `upcycle.json`.
"""
