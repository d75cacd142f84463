"""Methods as plugins: a method is a module and one registry entry; the engine calls declared
hooks only; planning reads no data and loads no model."""

from __future__ import annotations

import ast
import json
import os

import numpy as np
import pytest
import torch
from conftest import logits

from upcycle.engine.plan import plan_conversion
from upcycle.engine.stream import convert
from upcycle.errors import OptionError
from upcycle.methods import registry
from upcycle.methods.base import Method, MethodInfo, MoELayer, MoELayout
from upcycle.methods.options import ConvertOptions, Option

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCALE = Option("toy_scale", 1.0, "toy: factor on every expert's down projection.", type=float)


class ToyMethod(Method):
    """Two experts: the FFN with its down projection scaled by s and by 2 - s. Under a zero
    router (weights 1/2 each) their mean is the dense FFN again."""

    info = MethodInfo("toy", "-", "the FFN twice, scaled by s and 2 - s", "exact with zeros")
    options = (SCALE,)

    def __init__(self, scale: float, top_k: int):
        self.scale, self.top_k = scale, top_k
        self.calibrated = False

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> ToyMethod:
        return cls(opts.method_options["toy_scale"], opts.top_k)

    def validate(self) -> None:
        if not 0 <= self.scale <= 2:
            raise OptionError(f"--toy-scale must be in [0, 2], got {self.scale}")

    def layout(self, hidden: int, intermediate: int) -> MoELayout:
        return MoELayout(2, self.top_k, expert_width=intermediate)

    def calibrate(self, reader, moe_layers, log) -> None:
        self.calibrated = True

    def layer(self, i: int, ffn: dict, dtype: str) -> MoELayer:
        assert dtype == "F32" and self.calibrated
        experts = [
            {**ffn, "down": ffn["down"] * np.float32(s)} for s in (self.scale, 2 - self.scale)
        ]
        return MoELayer(router=np.zeros((2, ffn["down"].shape[0]), np.float32), experts=experts)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "toy", ToyMethod)


def test_a_registered_method_converts_exactly_and_is_recorded(toy, tiny, tmp_path):
    src, out = tiny("llama"), str(tmp_path / "moe")
    opts = ConvertOptions(method="toy", method_options={"toy_scale": 0.5})
    summary = convert(src, out, opts, progress=False)
    assert summary.architecture == "MixtralForCausalLM"
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(out, ids), logits(src, ids), rtol=1e-5, atol=1e-5)
    record = json.load(open(os.path.join(out, "upcycle.json")))
    assert record["method"] == "toy"
    assert record["options"]["toy_scale"] == 0.5 and record["options"]["top_k"] == 2
    assert "granularity" not in record["options"]  # only the method's own options


def test_method_options_are_checked_against_the_method(toy, tiny):
    src = tiny("llama")
    with pytest.raises(OptionError, match=r"--toy-scale applies to --method toy, not copy"):
        plan_conversion(src, ConvertOptions(method="copy", method_options={"toy_scale": 1.0}))
    with pytest.raises(OptionError, match=r"--keep applies to --method readme, not toy"):
        plan_conversion(src, ConvertOptions(method="toy", method_options={"keep": 0.3}))
    with pytest.raises(OptionError, match=r"--toy-scale must be in \[0, 2\], got 3"):
        plan_conversion(src, ConvertOptions(method="toy", method_options={"toy_scale": 3}))


def test_cli_flags_come_from_the_methods_options(cli):
    r = cli("convert", "--help")
    assert r.code == 0
    for cls in registry.METHODS.values():
        for option in cls.options:
            assert option.cli in r.out, option.cli


def test_dry_run_reads_no_data_and_loads_no_model(cli, tiny, tmp_path, monkeypatch):
    """Read-ME calibrates on data with the dense model; its dry run shows upper bounds and
    touches neither (a missing dataset is not even opened)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    src, out = tiny("llama"), str(tmp_path / "out")
    r = cli("convert", src, out, "--method", "readme", "--dry-run",
            "--calibration-data", str(tmp_path / "nowhere-a.txt"),
            "--calibration-data", str(tmp_path / "nowhere-b.txt"))  # fmt: skip
    assert r.code == 0, r.err
    assert "width at most 48, shared width at most 48 (calibration decides)" in r.out
    assert not os.path.exists(out)


def _engine_calls() -> set[str]:
    """Attributes the engine reads from a method (`method.X` / `plan.method.X`)."""
    found = set()
    for name in ("plan.py", "stream.py", "card.py", "outputs.py"):
        tree = ast.parse(open(os.path.join(ROOT, "upcycle", "engine", name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(
                node.value, (ast.Name, ast.Attribute)
            ):
                owner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
                if owner == "method":
                    found.add(node.attr)
    return found


def test_the_engine_calls_declared_hooks_only():
    calls = _engine_calls()
    assert {"layout", "calibrate", "layer", "adapt_plan", "open_checkpoint"} <= calls
    declared = set(dir(Method)) | set(Method.__annotations__)
    assert calls <= declared, calls - declared
    for name in ("plan.py", "stream.py", "card.py"):
        text = open(os.path.join(ROOT, "upcycle", "engine", name)).read()
        assert "getattr(" not in text and "hasattr(" not in text, name
