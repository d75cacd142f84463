"""The conversion methods by name, and `make_method`, which builds one from ConvertOptions.

Adding a method is its own module (a `Method` subclass, see `upcycle.methods.base`) and one
entry in METHODS below; its flags on the command line come from its `options`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from upcycle.errors import OptionError
from upcycle.methods import bam, btx, copy, granular, readme
from upcycle.methods.base import Method
from upcycle.methods.options import ConvertOptions, Option

METHODS: dict[str, type[Method]] = {
    m.info.name: m
    for m in (
        copy.CopyMethod,
        granular.GranularMethod,
        btx.BTXMethod,
        bam.BAMMethod,
        readme.ReadmeMethod,
    )
}


def method_options() -> list[Option]:
    """Every method option once, in the order of METHODS (the command line's flags)."""
    seen: dict[str, Option] = {}
    for cls in METHODS.values():
        for option in cls.options:
            if seen.setdefault(option.name, option) is not option:
                raise TypeError(f"{cls.__name__} declares its own {option.cli}: share one Option")
    return list(seen.values())


def resolve_options(opts: ConvertOptions) -> ConvertOptions:
    """`opts` with the method's options parsed and complete, and top_k resolved (a new object).

    An option that the method does not read is refused, naming the methods that read it.
    """
    if opts.method not in METHODS:
        raise OptionError(
            f"unknown --method {opts.method!r}; available: {', '.join(sorted(METHODS))}"
        )
    cls = METHODS[opts.method]
    own = {o.name for o in cls.options}
    for name in opts.method_options:
        if name not in own:
            readers = [m for m, c in METHODS.items() if name in {o.name for o in c.options}]
            if not readers:
                raise OptionError(f"unknown option {name!r}")
            flag = "--" + name.replace("_", "-")
            raise OptionError(
                f"{flag} applies to --method {' or '.join(readers)}, not {opts.method}"
            )
    values: dict[str, Any] = {}
    for o in cls.options:
        value = opts.method_options.get(o.name, o.default)
        if o.multiple:
            value = tuple(value)
        values[o.name] = o.parse(value) if o.parse and o.name in opts.method_options else value
    top_k = cls.default_top_k if opts.top_k is None else opts.top_k
    return dataclasses.replace(opts, top_k=top_k, method_options=values)


def make_method(opts: ConvertOptions) -> Method:
    """The method named by opts.method, built from `resolve_options(opts)` and validated."""
    cls = METHODS[opts.method]
    if cls.target and opts.target and opts.target != cls.target:
        raise OptionError(
            f"--method {opts.method} writes its own architecture ({cls.target}); drop --target"
        )
    method = cls.from_options(opts)
    method.validate()
    return method
