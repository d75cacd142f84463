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
import shutil
import sys
import time

import torch

from upcycle.errors import InputError
from upcycle.kernels.workspace import release_workspace
from upcycle.run_format import METRICS
from upcycle.train.checkpoints import (
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from upcycle.train.components import (
    Interrupted,
    Sigint,
    batch_loss,
    check_out,
    check_trajectory,
    enable_checkpointing,
    epoch_order,
    evaluate_loss,
    load_data,
    load_model,
    micro_batch,
    save_final,
    trimmed_length,
    truncate_metrics,
)
from upcycle.train.data import IGNORE
from upcycle.train.memory import HeapTrimmer
from upcycle.train.modes import mode_for
from upcycle.train.options import TrainOptions
from upcycle.train.sharding import (
    check_launch,
    full_weights,
    is_sharded,
    no_sync,
    shard,
    shard_sizes,
)


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
    resume_from = check_out(opts)
    mode = mode_for(opts)
    resumed = None
    if resume_from is not None:
        resumed = read_state(resume_from)
        check_trajectory(opts, resumed)
    base_path = resolve_model(opts.model, log=say)
    set_seed(opts.seed)
    weights_path = mode.load_from(base_path, resume_from)
    model, tokenizer = load_model(opts, weights_path, base_path)
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
        truncate_metrics(metrics_path, start_step)
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
    with Sigint() as sigint:
        while step < total_steps:
            epoch, within = divmod(step, steps_per_epoch)
            order = epoch_order(opts.seed, epoch, len(blocks))
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
        save_final(
            acc.unwrap_model(model),
            opts.out,
            {**run_state, "final": final, "steps": step, "trainable_params": n_trainable},
            mode,
            weights,
        )
    acc.wait_for_everyone()
    return final
