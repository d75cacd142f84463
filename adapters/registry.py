"""Registering MixLoRA with peft: the one place that works around peft's closed PeftType enum.

peft looks adapters up by `PeftType` member (`PeftConfig.peft_type`, the mappings from type to
config and tuner classes, `register_peft_method`), and `PeftType` is a plain `enum.Enum` with a
fixed member list, so a third-party method cannot register without a new member. We add one
member, MIXLORA, the way Enum's metaclass builds members itself (same class, name and value,
entered in the name and value maps), then call peft's own `register_peft_method`. Everything
else goes through peft's public API. `tests/test_adapters.py` checks the round trip
(`PeftType("MIXLORA")`, `PeftConfig.from_pretrained`, `PeftModel.from_pretrained`) so a peft
release that changes this breaks a test, not users. The member itself is made in
`upcycle.adapters.peft_type`, which the config class needs too.
"""

from __future__ import annotations

from upcycle.adapters.peft_type import NAME, peft_type


def register() -> None:
    """Make peft's get_peft_model / PeftConfig / PeftModel know MixLoRA (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method
    from upcycle.adapters.config import MixLoraConfig
    from upcycle.adapters.model import MixLoraModel

    kind = peft_type()
    if kind in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=NAME.lower(), config_cls=MixLoraConfig, model_cls=MixLoraModel)
