"""Registering MixLoRA with peft: the one place that works around peft's closed PeftType enum.

peft looks adapters up by `PeftType` member (`PeftConfig.peft_type`, the mappings from type to
config and tuner classes, `register_peft_method`), and `PeftType` is a plain `enum.Enum` with a
fixed member list, so a third-party method cannot register without a new member. We add one
member, MIXLORA, the way Enum's metaclass builds members itself (same class, name and value,
entered in the name and value maps), then call peft's own `register_peft_method`. Everything
else goes through peft's public API. `tests/test_adapters.py` checks the round trip
(`PeftType("MIXLORA")`, `PeftConfig.from_pretrained`, `PeftModel.from_pretrained`) so a peft
release that changes this breaks a test, not users.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

NAME = "MIXLORA"


def peft_type() -> PeftType:
    """PeftType.MIXLORA, creating the member on first use."""
    member = PeftType.__members__.get(NAME)
    if member is not None:
        return member
    member = str.__new__(PeftType, NAME)
    member._name_ = NAME
    member._value_ = NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # enter it as EnumType.__new__ does for class-body members
    PeftType._member_names_.append(NAME)
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    type.__setattr__(PeftType, NAME, member)
    return member


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
