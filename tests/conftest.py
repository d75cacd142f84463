"""Tiny random checkpoints built with real transformers classes, and a CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
import sys

import pytest
import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=128,
)

FAMILY_CONFIGS = {
    "llama": dict(tie_word_embeddings=True),
    "llama-untied-rope3": dict(
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": dict(sliding_window=8, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(tie_word_embeddings=True),
    # families upcycle_moe serves: windows shorter than the test sequences, soft-capping on
    # (Gemma 2), tied embeddings (Gemma), fused qkv and gate_up (Phi-3)
    "gemma2": dict(
        sliding_window=8,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        query_pre_attn_scalar=16,
        tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
        tie_word_embeddings=True,
    ),
    "phi3": dict(tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def _model_type(name: str) -> str:
    return name.split("-")[0]


# The start of a script run in a fresh interpreter where `import upcycle` fails: what it loads
# must need nothing of ours (the folder's own code, with trust_remote_code, at most).
NO_UPCYCLE = r"""
import importlib.abc, sys
class NoUpcycle(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "upcycle" or name.startswith("upcycle."):
            raise ImportError("upcycle is not installed here")
sys.meta_path.insert(0, NoUpcycle())
"""


def save_tiny(path: str, family: str, seed: int = 0, tokenizer: bool = False, **overrides) -> str:
    """A random-weight checkpoint of `family` saved with save_pretrained (safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY, **FAMILY_CONFIGS.get(family, {}), **overrides}
    config = AutoConfig.for_model(_model_type(family), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # make every bias and norm non-trivial so that a dropped tensor shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if tokenizer:
        save_tiny_tokenizer(path, kwargs["vocab_size"])
    return path


def save_tiny_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer over a fixed vocabulary (enough for prompts in tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    words[3:13] = ["the", "cat", "sat", "on", "mat", "code", "python", "def", "return", "import"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)


@pytest.fixture
def tiny(tmp_path):
    """Factory: tiny(family, **config_overrides) -> path of a saved checkpoint."""
    counter = iter(range(1000))

    def make(family: str = "llama", **overrides) -> str:
        return save_tiny(str(tmp_path / f"{family}-{next(counter)}"), family, **overrides)

    return make


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"


def run_cli(*args: str) -> Result:
    """Run the `upcycle` entry point in-process; returns exit code, stdout, stderr."""
    from upcycle.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


def logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def spy_on_final_model(monkeypatch, ids: torch.Tensor, module=None) -> dict:
    """Logits of the trained model in memory, taken just before the run's final save.

    `module`: the recipe module whose `save_final` runs (`upcycle.train.recipes.adapter` by default).
    """
    if module is None:
        import upcycle.train.recipes.adapter as module

    seen = {}
    real = module.save_final

    def spy(model, out, record, mode, *rest):
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=ids).logits.float()
        real(model, out, record, mode, *rest)

    monkeypatch.setattr(module, "save_final", spy)
    return seen


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")]
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


PY = sys.executable
