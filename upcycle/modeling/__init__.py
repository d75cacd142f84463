"""Custom architectures that upcycle writes where no stock transformers class fits.

Each architecture is a configuration file and a modeling file that import transformers only:
the converter copies them into the output folder and names them in config.json's `auto_map`,
so `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` loads the model where
upcycle is not installed. Importing this package registers the same classes with AutoConfig and
AutoModelForCausalLM, so upcycle's own commands load such models without remote code.
"""

from __future__ import annotations

import os

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_upcycle_bam import UpcycleBamConfig
from .configuration_upcycle_moe import UpcycleMoeConfig
from .configuration_upcycle_readme import UpcycleReadmeConfig
from .modeling_upcycle_bam import UpcycleBamForCausalLM
from .modeling_upcycle_moe import UpcycleMoeForCausalLM
from .modeling_upcycle_readme import UpcycleReadmeForCausalLM

_HERE = os.path.dirname(os.path.abspath(__file__))

# model_type -> (files copied next to the weights, config.json's auto_map)
ARCHITECTURES = {
    "upcycle_bam": (
        ("configuration_upcycle_bam.py", "modeling_upcycle_bam.py"),
        {
            "AutoConfig": "configuration_upcycle_bam.UpcycleBamConfig",
            "AutoModelForCausalLM": "modeling_upcycle_bam.UpcycleBamForCausalLM",
        },
    ),
    "upcycle_readme": (
        ("configuration_upcycle_readme.py", "modeling_upcycle_readme.py"),
        {
            "AutoConfig": "configuration_upcycle_readme.UpcycleReadmeConfig",
            "AutoModelForCausalLM": "modeling_upcycle_readme.UpcycleReadmeForCausalLM",
        },
    ),
    "upcycle_moe": (
        ("configuration_upcycle_moe.py", "modeling_upcycle_moe.py"),
        {
            "AutoConfig": "configuration_upcycle_moe.UpcycleMoeConfig",
            "AutoModelForCausalLM": "modeling_upcycle_moe.UpcycleMoeForCausalLM",
        },
    ),
}

for _config, _model in (
    (UpcycleBamConfig, UpcycleBamForCausalLM),
    (UpcycleReadmeConfig, UpcycleReadmeForCausalLM),
    (UpcycleMoeConfig, UpcycleMoeForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)


def code_files(model_type: str) -> list[str]:
    """Absolute paths of the files an output folder of `model_type` carries."""
    return [os.path.join(_HERE, name) for name in ARCHITECTURES[model_type][0]]


def auto_map(model_type: str) -> dict[str, str]:
    return dict(ARCHITECTURES[model_type][1])


__all__ = [
    "ARCHITECTURES",
    "UpcycleBamConfig",
    "UpcycleBamForCausalLM",
    "UpcycleMoeConfig",
    "UpcycleMoeForCausalLM",
    "UpcycleReadmeConfig",
    "UpcycleReadmeForCausalLM",
    "auto_map",
    "code_files",
]
