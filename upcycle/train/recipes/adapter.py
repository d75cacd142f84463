"""The adapter recipe (`upcycle train --method adapter`, the default): train what --adapter says
(a peft adapter, the whole model or its routers: `upcycle.train.strategies`). Accelerate-based,
one process or many (DDP or FSDP2), exact resume.

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

Where things are: `train` runs an `AdapterRun` through its stages, in file order: `load` (OUT,
the strategy, the model and the data), `prepare` (the strategy's trainable parameters, sharding,
optimizer and scheduler), `open` (resume from a checkpoint or start OUT afresh, the run's
record), `evaluate_before`, `steps` (the step loop: `accumulate`, `update`, `record`, and the
checkpoints) and `finish` (the last evaluation, checkpoint and the weights at the root of OUT).
What it shares with the Read-ME recipe is `upcycle.train.components`.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from upcycle.errors import InputError
from upcycle.run_format import METRICS
from upcycle.train.checkpoints import load_checkpoint, read_state, save_checkpoint
from upcycle.train.components import (
    MetricsLog,
    Sigint,
    Throughput,
    batch_loss,
    check_out,
    check_trajectory,
    enable_checkpointing,
    end_steps,
    epoch_order,
    evaluate_loss,
    interrupted,
    load_data,
    load_model,
    log_to_stderr,
    micro_batch,
    progress_bar,
    save_final,
    start_fresh,
    trim_heap,
    trimmed_length,
)
from upcycle.train.data import IGNORE
from upcycle.train.options import TrainOptions
from upcycle.train.sharding import (
    check_launch,
    full_weights,
    is_sharded,
    no_sync,
    shard,
    shard_sizes,
)
from upcycle.train.strategies.registry import strategy_for


def train(opts: TrainOptions, log=None) -> dict:
    """Train opts.adapter (a peft adapter, the whole model or its routers; see
    `upcycle.train.strategies`) on opts.data; returns the final metrics. See the module
    docstring. `opts` is validated by the caller (`upcycle.train.recipes.train`)."""
    from accelerate import Accelerator

    log = log or log_to_stderr
    check_launch(opts)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    run = AdapterRun(opts, acc, log if acc.is_main_process else (lambda m: None))
    if acc.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        run.say(
            "note: `accelerate launch --cpu` starts one process; for N CPU processes use "
            "`accelerate launch --multi_gpu --num_processes N --num_machines 1 -m upcycle train ...`"
        )
    run.load()
    run.prepare()
    run.open()
    first_eval = run.evaluate_before()
    step, last = run.steps()
    return run.finish(step, last, first_eval)


class AdapterRun:
    """One run of the adapter recipe: its state, built up stage by stage (see `train`)."""

    def __init__(self, opts: TrainOptions, acc, say):
        self.opts, self.acc, self.say = opts, acc, say
        self.main = acc.is_main_process
        self.world = acc.num_processes

    # -- set-up -----------------------------------------------------------------------------

    def load(self) -> None:
        """OUT checked, the strategy (its options fail here), the resume state, the model and
        tokenizer, the data and the number of steps."""
        from accelerate.utils import set_seed

        from upcycle.adapters.fingerprint import model_fingerprint
        from upcycle.io.default_model import resolve_model

        opts = self.opts
        self.resume_from = check_out(opts)
        self.strategy = strategy_for(opts)
        resumed = None
        if self.resume_from is not None:
            resumed = read_state(self.resume_from)
            check_trajectory(opts, resumed)
        self.base_path = resolve_model(opts.model, log=self.say)
        set_seed(opts.seed)
        weights_path = self.strategy.load_from(self.base_path, self.resume_from)
        self.model, tokenizer = load_model(opts, weights_path, self.base_path)
        if weights_path == self.base_path:
            self.fingerprint = model_fingerprint(self.model)
        else:  # a full run resumed from its checkpoint: the base's fingerprint as recorded
            self.fingerprint = resumed.get("base_fingerprint")
        self.blocks, self.eval_blocks = load_data(opts, tokenizer)
        self.global_batch = opts.batch_size * self.world * opts.grad_accum
        self.steps_per_epoch = len(self.blocks) // self.global_batch
        if self.steps_per_epoch == 0:
            raise InputError(
                f"the data makes {len(self.blocks)} blocks of {opts.seq_len} tokens, fewer than "
                f"one global batch ({opts.batch_size} x {self.world} processes x "
                f"{opts.grad_accum} accumulation)"
            )
        self.total_steps = opts.max_steps or max(1, math.ceil(opts.epochs * self.steps_per_epoch))

    def prepare(self) -> None:
        """The strategy's trainable parameters (a checkpoint's weights loaded into them), FSDP2
        where accelerate does not shard, AdamW and the schedule, accelerate's wrapping."""
        from transformers import get_scheduler

        opts, acc = self.opts, self.acc
        torch.manual_seed(opts.seed)
        model = self.strategy.prepare(self.model, self.base_path)
        if opts.gradient_checkpointing:
            enable_checkpointing(model, ffn_outside=not opts.checkpoint_ffn)
        if self.resume_from is not None:  # full weights, into the model before it is sharded
            self.strategy.load(model, self.resume_from)
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.sharded_here = shard(acc, model)  # FSDP2 on CPU, where accelerate does not apply it
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
        self.scheduler = get_scheduler(
            opts.schedule if opts.schedule != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=opts.warmup_steps,
            num_training_steps=self.total_steps,
        )
        if self.sharded_here:  # accelerate would wrap the sharded model in DDP
            optimizer = acc.prepare(optimizer)
        else:
            model, optimizer = acc.prepare(model, optimizer)
        self.params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them
        model.train()
        self.model, self.optimizer = model, optimizer
        self.trimmer = trim_heap(opts, model, acc.device, self.say)

    def open(self) -> None:
        """Resume from the checkpoint (optimizer, scheduler, RNG, position) or start OUT
        afresh; the metrics file cut back to the start, the run's record."""
        opts, acc = self.opts, self.acc
        self.start_step, self.tokens, self.elapsed_before = 0, 0, 0.0
        if self.resume_from is not None:
            state = load_checkpoint(acc, self.optimizer, self.scheduler, self.resume_from)
            if state.get("world_size") != self.world:
                self.say(
                    f"note: resuming with {self.world} processes, the checkpoint had "
                    f"{state.get('world_size')}"
                )
            self.start_step, self.tokens = state["step"], state["tokens"]
            self.elapsed_before = state.get("elapsed_s", 0.0)
            self.say(
                f"resuming from {self.resume_from} (step {self.start_step} of {self.total_steps})"
            )
        elif self.main:
            start_fresh(opts)
        acc.wait_for_everyone()
        self.metrics = MetricsLog(os.path.join(opts.out, METRICS), enabled=self.main)
        self.metrics.truncate(self.start_step)
        self.run_state = self.record_state()
        processes = f"{self.world} process{'es' if self.world > 1 else ''}"
        self.say(
            f"training {opts.adapter} on {self.base_path}: {self.n_trainable:,} trainable params, "
            f"{len(self.blocks)} blocks of {opts.seq_len} tokens, {self.total_steps} steps of "
            f"{self.global_batch} blocks ({processes})"
        )

    def record_state(self) -> dict:
        """What every checkpoint and the final record say about the run (FSDP2's sharding
        included, which it also reports)."""
        run_state = {
            "options": self.opts.trajectory(),
            "base": self.base_path,
            "base_fingerprint": self.fingerprint,
            "world_size": self.world,
        }
        if is_sharded(self.model):
            local, full = shard_sizes(self.model)
            by = "upcycle" if self.sharded_here else "accelerate"
            run_state["fsdp"] = {
                "version": 2,
                "sharded_by": by,
                "local_elements": local,
                "elements": full,
            }
            self.say(
                f"FSDP2 ({by}): parameters sharded over {self.world} "
                f"process{'es' if self.world > 1 else ''} "
                f"({local:,} of {full:,} elements on the main process)"
            )
        return run_state

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self) -> float:
        return evaluate_loss(self.model, self.eval_blocks, self.opts.batch_size, self.acc)

    def evaluate_before(self) -> float | None:
        """The held-out loss before the first step (a new run with held-out data), logged."""
        if self.eval_blocks is None or self.start_step != 0:
            return None
        first = self.evaluate()
        self.metrics.write({"step": 0, "eval_loss": first})
        self.say(f"held-out loss before training: {first:.4f}")
        return first

    # -- the step loop ------------------------------------------------------------------------

    def steps(self) -> tuple[int, dict]:
        """Steps from the start position to the last; (last step, its metrics). Ctrl-C saves a
        checkpoint after the step and raises Interrupted."""
        opts, total = self.opts, self.total_steps
        bar = progress_bar(total, self.start_step, "training", opts.progress and self.main)
        clock = Throughput(self.tokens, self.elapsed_before)
        last, step = {}, self.start_step
        with Sigint() as sigint:
            while step < total:
                lm_sum, aux_sum = self.accumulate(step)
                grad_norm = self.update()
                step += 1
                last = self.record(step, lm_sum, aux_sum, grad_norm, clock, bar)
                if (
                    self.eval_blocks is not None
                    and opts.eval_steps
                    and step % opts.eval_steps == 0
                    and step < total
                ):
                    self.metrics.write({"step": step, "eval_loss": self.evaluate()})
                stop = self.stop_requested(sigint)
                if stop or (opts.save_steps and step % opts.save_steps == 0 and step < total):
                    path = self.checkpoint(step, last["elapsed_s"])
                    if stop:
                        raise interrupted(bar, step, path)
        end_steps(bar, self.trimmer)
        return step, last

    def accumulate(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of this process's micro-batches of `step`; (sum of their LM
        losses, sum of their aux losses / grad_accum). Counts the step's tokens."""
        opts, acc, blocks, world = self.opts, self.acc, self.blocks, self.world
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(opts.seed, epoch, len(blocks))
        idx = order[within * self.global_batch : (within + 1) * self.global_batch]
        idx = idx.view(opts.grad_accum, world, opts.batch_size)
        labels_all = blocks.labels[idx.reshape(-1)]
        global_count = int((labels_all[:, 1:] != IGNORE).sum())
        lm_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        for m in range(opts.grad_accum):
            batch = micro_batch(blocks, idx[m, acc.process_index], acc.device)
            sync = m == opts.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else no_sync(acc, self.model)
            with ctx:
                lm, aux = batch_loss(self.model, batch, max(global_count, 1) / world)
                if not torch.is_tensor(aux):  # None, or 0 from a model without routers
                    aux = None
                elif self.strategy.aux_scale != 1.0:
                    aux = aux * self.strategy.aux_scale
                loss = lm + aux / opts.grad_accum if aux is not None else lm
                acc.backward(loss)
            lm_sum += lm.detach().double()
            if aux is not None:
                aux_sum += aux.detach().double() / opts.grad_accum
        self.tokens += sum(
            trimmed_length(blocks, idx[m, r]) * opts.batch_size
            for m in range(opts.grad_accum)
            for r in range(world)
        )
        return lm_sum, aux_sum

    def update(self):
        """Clip, step the optimizer and the schedule, clear the gradients; the gradient norm."""
        grad_norm = self.acc.clip_grad_norm_(self.params, self.opts.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def record(self, step: int, lm_sum, aux_sum, grad_norm, clock: Throughput, bar) -> dict:
        """The step's metrics (losses averaged over the processes), logged every
        --logging-steps and at the last step, and shown on the bar."""
        stats = self.acc.reduce(torch.stack([lm_sum, aux_sum]), reduction="mean")
        tps, timing = clock.measure(self.tokens)
        last = {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "loss": float(stats[0] + stats[1]),
            "lm_loss": float(stats[0]),
            "aux_loss": float(stats[1]),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            **timing,
        }
        if step % self.opts.logging_steps == 0 or step == self.total_steps:
            self.metrics.write(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['lm_loss']:.4f}", tok_s=f"{tps:.0f}")
        return last

    def stop_requested(self, sigint) -> bool:
        """Ctrl-C in any process stops every process after this step."""
        stop = sigint.requested
        if self.world > 1:
            flag = torch.tensor([float(stop)], device=self.acc.device)
            stop = bool(self.acc.reduce(flag, reduction="sum").item() > 0)
        return stop

    def checkpoint(self, step: int, elapsed_s: float) -> str:
        """checkpoints/step-N (every process takes part); its path."""
        state = {**self.run_state, "tokens": self.tokens, "elapsed_s": elapsed_s}
        return save_checkpoint(
            self.acc,
            self.model,
            self.optimizer,
            self.scheduler,
            self.opts.out,
            step,
            state,
            self.strategy,
        )

    # -- finishing ----------------------------------------------------------------------------

    def finish(self, step: int, last: dict, first_eval: float | None) -> dict:
        """The final held-out loss, the last checkpoint, the weights and the record at the root
        of OUT; returns the final metrics."""
        final = dict(last)
        if self.eval_blocks is not None:
            final["eval_loss"] = self.evaluate()
            self.metrics.write({"step": step, "eval_loss": final["eval_loss"]})
            if first_eval is not None:
                final["eval_loss_before"] = first_eval
        self.checkpoint(step, last.get("elapsed_s", 0.0))
        model = self.acc.unwrap_model(self.model)
        weights = full_weights(model)  # every process: gathering is collective
        if self.main:
            record = {
                **self.run_state,
                "final": final,
                "steps": step,
                "trainable_params": self.n_trainable,
            }
            save_final(model, self.opts.out, record, self.strategy, weights)
        self.acc.wait_for_everyone()
        return final
