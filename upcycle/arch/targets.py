"""Views of the architecture records (`upcycle.arch.records`): the MoE architectures upcycle
writes, by name.

TARGETS: the choices of ``--target`` (in that order): stock transformers architectures, and
    upcycle_moe, upcycle's generic one (the source family's decoder with an MoE FFN).
CUSTOM_TARGETS: upcycle's own that only the methods needing them write (bam, readme).
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
