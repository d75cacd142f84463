"""Views of the architecture records (`upcycle.arch.records`) by role, for the conversion code.

FAMILIES: the dense families upcycle reads (a record with an FFN), whether or not they convert.
MOE_FAMILIES: the MoE architectures (a record with MoE config keys), which never convert.
A record's tensor names inside a decoder layer are relative to its ``layer_prefix``.
"""

from __future__ import annotations

from upcycle.arch.records import RECORDS
from upcycle.arch.spec import Arch, FFNSpec

__all__ = ["FAMILIES", "MOE_FAMILIES", "DenseFamily", "FFNSpec", "supported_families"]

DenseFamily = Arch  # a dense family is the record of a dense model_type

FAMILIES: dict[str, Arch] = {t: r for t, r in RECORDS.items() if r.is_dense}
MOE_FAMILIES: dict[str, Arch] = {t: r for t, r in RECORDS.items() if r.is_moe}


def supported_families() -> str:
    return ", ".join(sorted(f for f, s in FAMILIES.items() if s.target))
