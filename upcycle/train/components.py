"""Components of a training run, shared by the recipes (`upcycle.train.recipes.adapter`, the
adapter recipe; `upcycle.train.recipes.readme`, Read-ME's rounds): data, model loading,
batching and loss, the run folder (checks, a fresh folder, metrics, the final save), the parts
of a step loop (progress bar, throughput, heap trimming, Ctrl-C handling).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time

import torch

from upcycle.errors import InputError, OptionError, OutputError, UnsupportedError, UpcycleError
from upcycle.kernels.workspace import release_workspace
from upcycle.run_format import RECORD
from upcycle.train.checkpoints import latest_checkpoint
from upcycle.train.data import IGNORE, Blocks, build_blocks, split_records
from upcycle.train.loss import chunked_head, hidden_instead_of_logits, linear_cross_entropy
from upcycle.train.memory import HeapTrimmer
from upcycle.train.options import TrainOptions
from upcycle.train.strategies.registry import is_weight_file


class Interrupted(UpcycleError):
    """SIGINT during training: a checkpoint was saved."""

    exit_code = 130


def _records(spec: str, split: str) -> list[dict]:
    from upcycle.data import DATA_ALIASES, builtin_corpus, load_records

    if spec in DATA_ALIASES:
        return [{"text": t} for t in builtin_corpus(split, DATA_ALIASES[spec])]
    if spec.startswith("builtin:"):
        raise OptionError(f"unknown data alias {spec!r} (choose from {', '.join(DATA_ALIASES)})")
    return load_records(spec)


def load_data(opts: TrainOptions, tokenizer) -> tuple[Blocks, Blocks | None]:
    """Training blocks and held-out blocks (from --eval-data, the built-in held-out split, or a
    hashed --eval-fraction of the training records)."""
    from upcycle.data import DATA_ALIASES

    if opts.data in DATA_ALIASES:
        train = _records(opts.data, "calibration")
        held = _records(opts.data, "heldout") if opts.eval_data is None else []
    else:
        train = _records(opts.data, "all")
        held = []
        if opts.eval_data is None:
            train, held = split_records(train, opts.eval_fraction)
    if opts.eval_data is not None:
        held = _records(opts.eval_data, "heldout")
    blocks = build_blocks(train, tokenizer, opts.seq_len, opts.packing)
    eval_blocks = None
    if held:
        try:
            eval_blocks = build_blocks(held, tokenizer, opts.seq_len, opts.packing)
        except InputError:
            eval_blocks = None  # too little held-out text for one block: no eval loss
    if eval_blocks is not None and opts.max_eval_blocks:
        eval_blocks = Blocks(
            *(
                t[: opts.max_eval_blocks]
                for t in (eval_blocks.input_ids, eval_blocks.labels, eval_blocks.attention_mask)
            )
        )
    return blocks, eval_blocks


def load_model(opts: TrainOptions, path: str, tokenizer_path: str | None = None):
    """(model from `path`, tokenizer from `tokenizer_path` or `path`)."""
    from upcycle.io.models import load_causal_lm, load_tokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[opts.dtype]
    kwargs = {"dtype": dtype}
    if opts.load_in_4bit or opts.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise UnsupportedError(
                "--load-in-4bit/--load-in-8bit need bitsandbytes: pip install 'upcycle[quant]'"
            ) from None
        if opts.load_in_8bit:  # bitsandbytes says it per layer and step (docs/mixlora.md)
            import warnings

            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=opts.load_in_4bit,
            load_in_8bit=opts.load_in_8bit,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
        )
    from transformers.utils import logging as hf_logging

    from upcycle.io.checkpoint import Checkpoint

    Checkpoint(path)  # one-line errors for missing or malformed model folders
    hf_logging.disable_progress_bar()  # the run's own log and progress bar say enough
    model = load_causal_lm(path, trust_remote_code=opts.trust_remote_code, **kwargs)
    tokenizer = load_tokenizer(tokenizer_path or path, trust_remote_code=opts.trust_remote_code)
    return model, tokenizer


def enable_checkpointing(model, ffn_outside: bool = True) -> None:
    """Activation checkpointing per decoder layer; with `ffn_outside`, fused MixLoRA FFNs
    stay outside the checkpoints (`upcycle.adapters.checkpointing`)."""
    from upcycle.adapters.checkpointing import checkpoint_attention_only

    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    if ffn_outside:
        checkpoint_attention_only(model)


def check_out(opts: TrainOptions) -> str | None:
    """Validate OUT for a new run or a resume; returns the checkpoint to resume from."""
    out = opts.out
    if os.path.isfile(out):
        raise OutputError(f"{out}: exists and is a file")
    if opts.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise InputError(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')}")
        return ckpt
    if os.path.isdir(out) and os.listdir(out):
        if not opts.force:
            raise OutputError(
                f"{out}: exists and is not empty (use --resume to continue, --force to replace it)"
            )
    return None


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class Sigint:
    """The first Ctrl-C asks for a checkpoint at the end of the step; the second aborts."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def trimmed_length(blocks: Blocks, rows: torch.Tensor) -> int:
    """Columns up to the last real token of any row (padding after it is never computed)."""
    mask = blocks.attention_mask[rows]
    filled = mask.any(dim=0).nonzero()
    return int(filled[-1]) + 1 if len(filled) else 1


def micro_batch(blocks: Blocks, rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
    length = trimmed_length(blocks, rows)
    return {
        "input_ids": blocks.input_ids[rows, :length].to(device),
        "attention_mask": blocks.attention_mask[rows, :length].to(device),
        "labels": blocks.labels[rows, :length].to(device),
    }


def token_loss_sum(model, batch: dict):
    """(sum of token losses, router aux loss or None) for one micro-batch.

    The LM head runs only at positions that predict a trained token (transformers'
    `logits_to_keep`), which skips prompts and padding. Where the model allows it, the loss
    runs in chunks without materializing the logits (`upcycle.train.loss`).
    """
    targets = batch["labels"][:, 1:]
    wanted = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs.update(logits_to_keep=wanted, use_cache=False)
    kept = targets[:, wanted].reshape(-1)
    if chunked_head(model) is not None:
        with hidden_instead_of_logits(model) as head:
            out = model(**inputs)
        hidden = out.logits.reshape(-1, out.logits.shape[-1])
        loss = linear_cross_entropy(hidden, head.weight, kept)
    else:
        out = model(**inputs)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), kept, ignore_index=IGNORE, reduction="sum"
        )
    return loss, getattr(out, "aux_loss", None)


def batch_loss(model, batch: dict, num_items: float):
    """(token-loss sum / num_items, router aux loss or None) for one micro-batch."""
    loss, aux = token_loss_sum(model, batch)
    return loss / num_items, aux


def evaluate_loss(model, blocks: Blocks, batch_size: int, acc) -> float:
    """Mean token loss over the held-out blocks (split across processes). Every process makes
    the same number of model calls (a sharded model gathers its weights in each call): one
    left without blocks runs the first block and does not count it."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    rows = torch.arange(acc.process_index, len(blocks), acc.num_processes)
    calls = math.ceil(math.ceil(len(blocks) / acc.num_processes) / batch_size)
    with torch.no_grad():
        for i in range(0, calls * batch_size, batch_size):
            chunk = rows[i : i + batch_size]
            batch = micro_batch(blocks, chunk if len(chunk) else torch.tensor([0]), acc.device)
            loss = token_loss_sum(model, batch)[0].double()
            if len(chunk):
                total[0] += loss
                total[1] += (batch["labels"][:, 1:] != IGNORE).sum()
    total = acc.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1])


def truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines past `step` (a resumed run rewrites them)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if step == 0:
        keep = []
    with open(path, "w") as f:
        f.writelines(keep)


def check_trajectory(opts: TrainOptions, state: dict) -> None:
    """--resume continues the same run: the options that shape it must not change. An option
    the checkpoint does not record (it predates the option) must be at its default."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(TrainOptions)}
    saved = state.get("options") or {}
    for k, v in opts.trajectory().items():
        was = saved.get(k, defaults.get(k))
        if k not in ("model", "out") and was != v:
            raise OptionError(f"--resume: option {k} was {was!r} and is now {v!r}")


def save_final(model, out: str, record: dict, strategy, weights: dict | None = None) -> None:
    """The weights at the root of OUT (as the strategy saves them; `weights`: a sharded model's
    full tensors), each file renamed into place.

    The record goes first out and last in, so a root with a record is always whole; weight
    files of an earlier finish (a resumed run that had finished) are removed first."""
    tmp = os.path.join(out, ".final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    strategy.save(model, tmp, weights)
    with open(os.path.join(tmp, RECORD), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    if os.path.isfile(os.path.join(out, RECORD)):
        os.remove(os.path.join(out, RECORD))
    for name in os.listdir(out):
        if is_weight_file(name) and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    for name in sorted(os.listdir(tmp), key=lambda n: n == RECORD):  # the record goes last
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)


# -- the parts of a recipe's run ----------------------------------------------------------------


def log_to_stderr(message: str) -> None:
    """A recipe's default log: one line on stderr."""
    print(message, file=sys.stderr)


def start_fresh(opts: TrainOptions) -> None:
    """OUT for a new run: emptied first with --force (`check_out` allowed it), then created."""
    if opts.force and os.path.isdir(opts.out):
        shutil.rmtree(opts.out)
    os.makedirs(opts.out, exist_ok=True)


class MetricsLog:
    """OUT/metrics.jsonl: one JSON line per entry. Only the main process writes (`enabled`)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def truncate(self, step: int) -> None:
        """Drop the lines past `step` (`truncate_metrics`)."""
        if self.enabled:
            truncate_metrics(self.path, step)

    def write(self, entry: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """The step loop's tqdm bar on stderr."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


class Throughput:
    """Tokens per second since the loop started, and the run's elapsed seconds (a resumed run
    adds the ones its checkpoint recorded)."""

    def __init__(self, tokens: int, elapsed_before: float = 0.0):
        self.t0 = time.perf_counter()
        self.tokens_at_start = tokens
        self.elapsed_before = elapsed_before

    def measure(self, tokens: int) -> tuple[float, dict]:
        """(tokens/s, the metrics entry's tokens, tokens_per_s and elapsed_s)."""
        elapsed = time.perf_counter() - self.t0
        tps = (tokens - self.tokens_at_start) / max(elapsed, 1e-9)
        return tps, {
            "tokens": tokens,
            "tokens_per_s": round(tps, 2),
            "elapsed_s": round(self.elapsed_before + elapsed, 3),
        }


def trim_heap(opts: TrainOptions, model, device, say) -> HeapTrimmer:
    """A HeapTrimmer, attached to the model under --trim-memory on CPU (`upcycle.train.memory`)."""
    trimmer = HeapTrimmer()
    if opts.trim_memory and device.type == "cpu" and not trimmer.attach(model):
        say("note: --trim-memory needs glibc and decoder layers with `self_attn`; ignored")
    return trimmer


def end_steps(bar, trimmer: HeapTrimmer) -> None:
    """After the last step: close the bar, free the kernels' workspace, detach the trimmer."""
    bar.close()
    release_workspace()
    trimmer.detach()


def interrupted(bar, step: int, path: str) -> Interrupted:
    """The error that ends a run after Ctrl-C, once its checkpoint is saved in `path`."""
    bar.close()
    return Interrupted(
        f"interrupted at step {step}; checkpoint saved in {path} (continue with --resume)"
    )
