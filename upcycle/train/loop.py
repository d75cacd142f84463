"""The training loop: accelerate-based, one process or many (DDP or FSDP2), exact resume.

Batches are drawn by index arithmetic from a per-epoch permutation seeded by (seed, epoch), so
step s always sees the same examples whatever the number of processes: the global batch of a
step is `batch_size * processes * grad_accum` blocks, split into micro-batches by process.
The loss of a step is the token-mean over its whole global batch: every process divides its
token-loss sum by the global count of trained tokens (known to all processes, since each holds
the data), and DDP's gradient average over processes restores the sum. So one process with
batch 4 and two with batch 2 take the same steps, and resuming from a checkpoint (which
restores weights, optimizer, scheduler and every process's RNG) continues the same curve.
Under an FSDP2 launch config the model is sharded over the processes instead of replicated
(`upcycle.train.sharding`); the steps, the loss and the checkpoints are the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time

import torch

from upcycle.errors import InputError, OptionError, OutputError, UnsupportedError, UpcycleError
from upcycle.kernels.fused import release_workspace
from upcycle.train.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from upcycle.train.data import IGNORE, Blocks, build_blocks, split_records
from upcycle.train.loss import chunked_head, hidden_instead_of_logits, linear_cross_entropy
from upcycle.train.memory import HeapTrimmer
from upcycle.train.modes import (  # noqa: F401  (adapter_config, attach_adapter: public here too)
    ADAPTER_FILES,
    WEIGHT_FILES,
    adapter_config,
    attach_adapter,
    mode_for,
)
from upcycle.train.options import TrainOptions
from upcycle.train.sharding import (
    check_launch,
    full_weights,
    is_sharded,
    no_sync,
    shard,
    shard_sizes,
)

METRICS = "metrics.jsonl"
RECORD = "upcycle_train.json"


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


def _load_model(opts: TrainOptions, path: str, tokenizer_path: str | None = None):
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


def _check_out(opts: TrainOptions) -> str | None:
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


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class _Sigint:
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


def train(opts: TrainOptions, log=None) -> dict:
    """Train opts.adapter (a peft adapter, the whole model or its routers; see
    `upcycle.train.modes`) on opts.data; returns the final metrics. See the module docstring.
    `--method readme` runs `upcycle.train.readme` instead."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from upcycle.adapters.fingerprint import model_fingerprint
    from upcycle.io.default_model import resolve_model

    opts.validate()
    log = log or (lambda m: print(m, file=sys.stderr))
    if opts.method == "readme":  # Read-ME's router and backbone rounds
        from upcycle.train.readme import train_readme

        return train_readme(opts, log=log)
    check_launch(opts)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    say = log if main else (lambda m: None)
    if acc.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        say(
            "note: `accelerate launch --cpu` starts one process; for N CPU processes use "
            "`accelerate launch --multi_gpu --num_processes N --num_machines 1 -m upcycle train ...`"
        )
    resume_from = _check_out(opts)
    mode = mode_for(opts)
    resumed = None
    if resume_from is not None:
        resumed = read_state(resume_from)
        _check_trajectory(opts, resumed)
    base_path = resolve_model(opts.model, log=say)
    set_seed(opts.seed)
    weights_path = mode.load_from(base_path, resume_from)
    model, tokenizer = _load_model(opts, weights_path, base_path)
    if weights_path == base_path:
        fingerprint = model_fingerprint(model)
    else:  # a full run resumed from its checkpoint: the base's fingerprint as recorded
        fingerprint = resumed.get("base_fingerprint")
    blocks, eval_blocks = load_data(opts, tokenizer)
    world, rank = acc.num_processes, acc.process_index
    global_batch = opts.batch_size * world * opts.grad_accum
    steps_per_epoch = len(blocks) // global_batch
    if steps_per_epoch == 0:
        raise InputError(
            f"the data makes {len(blocks)} blocks of {opts.seq_len} tokens, fewer than one "
            f"global batch ({opts.batch_size} x {world} processes x {opts.grad_accum} accumulation)"
        )
    total_steps = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))

    torch.manual_seed(opts.seed)
    model = mode.prepare(model, base_path)
    if opts.gradient_checkpointing:
        enable_checkpointing(model, ffn_outside=not opts.checkpoint_ffn)
    if resume_from is not None:  # full weights, into the model before it is sharded
        mode.load(model, resume_from)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sharded_here = shard(acc, model)  # FSDP2 on CPU, where accelerate does not apply it
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = get_scheduler(
        opts.schedule if opts.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=opts.warmup_steps,
        num_training_steps=total_steps,
    )
    if sharded_here:  # accelerate would wrap the sharded model in DDP
        optimizer = acc.prepare(optimizer)
    else:
        model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them
    model.train()
    trimmer = HeapTrimmer()
    if opts.trim_memory and acc.device.type == "cpu" and not trimmer.attach(model):
        say("note: --trim-memory needs glibc and decoder layers with `self_attn`; ignored")

    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    if resume_from is not None:
        state = load_checkpoint(acc, optimizer, scheduler, resume_from)
        if state.get("world_size") != world:
            say(
                f"note: resuming with {world} processes, the checkpoint had {state.get('world_size')}"
            )
        start_step, tokens_seen = state["step"], state["tokens"]
        elapsed_before = state.get("elapsed_s", 0.0)
        say(f"resuming from {resume_from} (step {start_step} of {total_steps})")
    elif main:
        if opts.force and os.path.isdir(opts.out):
            shutil.rmtree(opts.out)
        os.makedirs(opts.out, exist_ok=True)
    acc.wait_for_everyone()

    metrics_path = os.path.join(opts.out, METRICS)
    if main:
        _truncate_metrics(metrics_path, start_step)
    run_state = {
        "options": opts.trajectory(),
        "base": base_path,
        "base_fingerprint": fingerprint,
        "world_size": world,
    }
    if is_sharded(model):
        local, full = shard_sizes(model)
        by = "upcycle" if sharded_here else "accelerate"
        run_state["fsdp"] = {
            "version": 2,
            "sharded_by": by,
            "local_elements": local,
            "elements": full,
        }
        say(
            f"FSDP2 ({by}): parameters sharded over {world} process{'es' if world > 1 else ''} "
            f"({local:,} of {full:,} elements on the main process)"
        )

    def write_metrics(entry: dict) -> None:
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    say(
        f"training {opts.adapter} on {base_path}: {n_trainable:,} trainable params, "
        f"{len(blocks)} blocks of {opts.seq_len} tokens, {total_steps} steps of {global_batch} "
        f"blocks ({world} process{'es' if world > 1 else ''})"
    )
    first_eval = None
    if eval_blocks is not None and start_step == 0:
        first_eval = evaluate_loss(model, eval_blocks, opts.batch_size, acc)
        write_metrics({"step": 0, "eval_loss": first_eval})
        say(f"held-out loss before training: {first_eval:.4f}")

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="training",
        unit="step",
        disable=not (opts.progress and main),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    tokens_at_start = tokens_seen
    last = {}
    step = start_step
    with _Sigint() as sigint:
        while step < total_steps:
            epoch, within = divmod(step, steps_per_epoch)
            order = _epoch_order(opts.seed, epoch, len(blocks))
            idx = order[within * global_batch : (within + 1) * global_batch]
            idx = idx.view(opts.grad_accum, world, opts.batch_size)
            labels_all = blocks.labels[idx.reshape(-1)]
            global_count = int((labels_all[:, 1:] != IGNORE).sum())
            lm_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
            aux_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
            for m in range(opts.grad_accum):
                batch = micro_batch(blocks, idx[m, rank], acc.device)
                sync = m == opts.grad_accum - 1
                ctx = contextlib.nullcontext() if sync else no_sync(acc, model)
                with ctx:
                    lm, aux = batch_loss(model, batch, max(global_count, 1) / world)
                    if not torch.is_tensor(aux):  # None, or 0 from a model without routers
                        aux = None
                    elif mode.aux_scale != 1.0:
                        aux = aux * mode.aux_scale
                    loss = lm + aux / opts.grad_accum if aux is not None else lm
                    acc.backward(loss)
                lm_sum += lm.detach().double()
                if aux is not None:
                    aux_sum += aux.detach().double() / opts.grad_accum
            tokens_seen += sum(
                trimmed_length(blocks, idx[m, r]) * opts.batch_size
                for m in range(opts.grad_accum)
                for r in range(world)
            )
            grad_norm = acc.clip_grad_norm_(params, opts.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            stats = acc.reduce(torch.stack([lm_sum, aux_sum]), reduction="mean")
            elapsed = time.perf_counter() - t0
            tps = (tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
            last = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "loss": float(stats[0] + stats[1]),
                "lm_loss": float(stats[0]),
                "aux_loss": float(stats[1]),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens": tokens_seen,
                "tokens_per_s": round(tps, 2),
                "elapsed_s": round(elapsed_before + elapsed, 3),
            }
            if step % opts.logging_steps == 0 or step == total_steps:
                write_metrics(last)
            bar.update(1)
            bar.set_postfix(loss=f"{last['lm_loss']:.4f}", tok_s=f"{tps:.0f}")
            if (
                eval_blocks is not None
                and opts.eval_steps
                and step % opts.eval_steps == 0
                and step < total_steps
            ):
                write_metrics(
                    {
                        "step": step,
                        "eval_loss": evaluate_loss(model, eval_blocks, opts.batch_size, acc),
                    }
                )
            stop = sigint.requested
            if world > 1:
                flag = torch.tensor([float(stop)], device=acc.device)
                stop = bool(acc.reduce(flag, reduction="sum").item() > 0)
            state = {**run_state, "tokens": tokens_seen, "elapsed_s": last["elapsed_s"]}
            if stop or (opts.save_steps and step % opts.save_steps == 0 and step < total_steps):
                path = save_checkpoint(
                    acc, model, optimizer, scheduler, opts.out, step, state, mode
                )
                if stop:
                    bar.close()
                    raise Interrupted(
                        f"interrupted at step {step}; checkpoint saved in {path} "
                        f"(continue with --resume)"
                    )
    bar.close()
    release_workspace()
    trimmer.detach()
    final = dict(last)
    if eval_blocks is not None:
        final["eval_loss"] = evaluate_loss(model, eval_blocks, opts.batch_size, acc)
        write_metrics({"step": step, "eval_loss": final["eval_loss"]})
        if first_eval is not None:
            final["eval_loss_before"] = first_eval
    save_checkpoint(
        acc,
        model,
        optimizer,
        scheduler,
        opts.out,
        step,
        {**run_state, "tokens": tokens_seen, "elapsed_s": last.get("elapsed_s", 0.0)},
        mode,
    )
    weights = full_weights(acc.unwrap_model(model))  # every process: gathering is collective
    if main:
        _save_final(
            acc.unwrap_model(model),
            opts.out,
            {**run_state, "final": final, "steps": step, "trainable_params": n_trainable},
            mode,
            weights,
        )
    acc.wait_for_everyone()
    return final


def _truncate_metrics(path: str, step: int) -> None:
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


def _check_trajectory(opts: TrainOptions, state: dict) -> None:
    """--resume continues the same run: the options that shape it must not change. An option
    the checkpoint does not record (it predates the option) must be at its default."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(TrainOptions)}
    saved = state.get("options") or {}
    for k, v in opts.trajectory().items():
        was = saved.get(k, defaults.get(k))
        if k not in ("model", "out") and was != v:
            raise OptionError(f"--resume: option {k} was {was!r} and is now {v!r}")


def _is_weight_file(name: str) -> bool:
    return name in WEIGHT_FILES or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name) is not None


def _save_final(model, out: str, record: dict, mode, weights: dict | None = None) -> None:
    """The weights at the root of OUT (as the mode saves them; `weights`: a sharded model's
    full tensors), each file renamed into place.

    The record goes first out and last in, so a root with a record is always whole; weight
    files of an earlier finish (a resumed run that had finished) are removed first."""
    tmp = os.path.join(out, ".final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    mode.save(model, tmp, weights)
    with open(os.path.join(tmp, RECORD), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    if os.path.isfile(os.path.join(out, RECORD)):
        os.remove(os.path.join(out, RECORD))
    for name in os.listdir(out):
        if _is_weight_file(name) and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    for name in sorted(os.listdir(tmp), key=lambda n: n == RECORD):  # the record goes last
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)
