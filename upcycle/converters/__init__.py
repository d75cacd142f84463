"""Conversion methods, registered by name; `make_method` builds one from validated options."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from upcycle.converters import bam, btx, copy, granular, readme  # noqa: F401  (register them)
from upcycle.converters.base import METHODS, MethodInfo, MoELayer, MoELayout
from upcycle.errors import OptionError


class Method(Protocol):
    info: MethodInfo

    def validate(self) -> None: ...

    def describe(self) -> str: ...

    def layout(self, hidden: int, intermediate: int) -> MoELayout: ...

    def prepare(self, source_dir: str, moe_layers: list[int], log) -> None: ...

    def layer(self, i: int, ffn: dict[str, np.ndarray], dtype: str) -> MoELayer: ...


# options that only some methods read: option -> (methods, default)
_SPECIFIC = {
    "expert_noise": (("copy",), 0.0),
    "expert_prompts": (("copy", "btx", "bam"), ()),
    "experts_from": (("btx", "bam"), ()),
    "weights": (("btx", "bam"), ()),
    "attention_experts": (("bam",), "full"),
    "parallel_attention": (("bam",), False),
    "granularity": (("granular",), None),
    "shared_experts": (("granular",), 0),
    "partition": (("granular",), "contiguous"),
    "calibration_data": (("granular", "readme"), ()),
    "keep": (("readme",), 0.5),
    "router_layers": (("readme",), 1),
}


def make_method(opts) -> Method:
    """The method named by opts.method, configured from opts (a ConvertOptions) and validated."""
    if opts.method not in METHODS:
        raise OptionError(
            f"unknown --method {opts.method!r}; available: {', '.join(sorted(METHODS))}"
        )
    own = {"bam": "upcycle_bam", "readme": "upcycle_readme"}.get(opts.method)
    if own and opts.target and opts.target != own:
        raise OptionError(
            f"--method {opts.method} writes its own architecture ({own}); drop --target"
        )
    if opts.top_k is None:  # recorded in upcycle.json as resolved
        opts.top_k = 1 if opts.method == "readme" else 2
    for option, (methods, default) in _SPECIFIC.items():
        if opts.method not in methods and getattr(opts, option) != default:
            flag = "--" + option.replace("_", "-")
            raise OptionError(
                f"{flag} applies to --method {' or '.join(methods)}, not {opts.method}"
            )
    if opts.method == "copy":
        method = copy.CopyMethod(
            num_experts=8 if opts.num_experts is None else opts.num_experts,
            top_k=opts.top_k,
            router_init=opts.router_init,
            router_std=opts.router_std,
            expert_noise=opts.expert_noise,
            seed=opts.seed,
            expert_prompts=opts.expert_prompts,
        )
    elif opts.method in ("btx", "bam"):
        several = dict(
            experts_from=opts.experts_from,
            weights=opts.weights,
            num_experts=opts.num_experts,
            top_k=opts.top_k,
            router_init=opts.router_init,
            router_std=opts.router_std,
            seed=opts.seed,
            expert_prompts=opts.expert_prompts,
        )
        if opts.method == "btx":
            method = btx.BTXMethod(**several)
        else:
            method = bam.BAMMethod(
                attention_experts=opts.attention_experts,
                parallel_attention=opts.parallel_attention,
                **several,
            )
    elif opts.method == "readme":
        method = readme.ReadmeMethod(
            calibration_data=opts.calibration_data,
            num_experts=opts.num_experts,
            top_k=opts.top_k,
            keep=opts.keep,
            calibration_tokens=opts.calibration_tokens,
            router_layers=opts.router_layers,
            seed=opts.seed,
        )
    else:
        if opts.granularity is None:
            raise OptionError("--method granular needs --granularity")
        texts = None
        if len(opts.calibration_data) > 1:
            raise OptionError("--method granular takes one --calibration-data")
        if opts.calibration_data:
            from upcycle.data import resolve_texts

            texts = resolve_texts(opts.calibration_data[0], split="calibration")
        method = granular.GranularMethod(
            granularity=opts.granularity,
            num_experts=opts.num_experts,
            top_k=opts.top_k,
            shared_experts=opts.shared_experts,
            partition=opts.partition,
            router_init=opts.router_init,
            router_std=opts.router_std,
            seed=opts.seed,
            calibration_texts=texts,
            calibration_tokens=opts.calibration_tokens,
        )
    method.validate()
    return method


__all__ = ["METHODS", "Method", "MoELayer", "MoELayout", "make_method"]
