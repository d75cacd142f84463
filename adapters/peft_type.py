"""PeftType.MIXLORA: the member of peft's closed PeftType enum that MixLoRA registers under.

`PeftType` is a plain `enum.Enum` with a fixed member list; the member is added the way Enum's
metaclass builds members itself (same class, name and value, entered in the name and value
maps). `upcycle.adapters.registry` then registers the method with peft's own API.
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
