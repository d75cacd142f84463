"""Views of the architecture records (`upcycle.arch.records`): the MoE architectures upcycle
writes, by name.

TARGETS: stock transformers architectures, the choices of ``--target`` (in that order).
CUSTOM_TARGETS: upcycle's own (upcycle/modeling/), written only by the methods that need them.
"""

from __future__ import annotations

from upcycle.arch.records import RECORDS
from upcycle.arch.spec import MoETarget

__all__ = ["CUSTOM_TARGETS", "TARGETS", "MoETarget"]

TARGETS: dict[str, MoETarget] = {
    t: r.target_spec for t, r in RECORDS.items() if r.target_spec and not r.custom
}
CUSTOM_TARGETS: dict[str, MoETarget] = {
    t: r.target_spec for t, r in RECORDS.items() if r.target_spec and r.custom
}
