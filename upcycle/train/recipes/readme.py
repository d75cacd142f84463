"""`upcycle train --method readme`: Read-ME's alternating router and backbone rounds.

Read-ME (Cai et al., NeurIPS 2024, https://arxiv.org/abs/2410.19123) trains the pre-gating
router and the MoE backbone of an `upcycle_readme` model in turns. Each of `--rounds` rounds:

1. router phase (`--router-steps`): only `model.model.router` trains. The router reads token
   ids only, so the backbone never runs. Loss per token:
   (1 - w) * CE(router logits, hard label) + w * KL(soft target || softmax(router logits)),
   w = `--router-kl-weight` (0.25: the paper's 0.75 CE + 0.25 KL).
2. backbone phase (`--backbone-steps`): every other parameter trains (attention, residual and
   routed experts, norms, embeddings and LM head), the router is frozen; the LM loss of the
   other training modes (`upcycle.train.components.batch_loss`).

Each phase gets a fresh AdamW (`--router-lr` or `--lr`, times `--lr-decay` ** round, constant
within the phase): moments of parameters frozen for a whole phase would be stale.

Labels. A token's activation scores are the |h| mass the dense source model (h: each layer's
down-projection input) puts on each expert's neurons, summed over layers
(`upcycle.methods.readme.activation_scores`). Hard label = argmax; soft target = the scores
divided by their sum over experts (a distribution proportional to each expert's activation mass).
They are computed once, before training, for exactly the training blocks the router phases will
draw and for the held-out blocks, and stored in OUT/readme_labels.safetensors, so a resumed run
needs no dense model and sees the same labels.

Batches are drawn by index arithmetic (`upcycle.train.components.epoch_order`): backbone phases from
the permutation stream of `--seed` (the one `--adapter full` draws), router phases from their own
stream; global phase step g of round r is r * steps + s. So the state of a run is its position
(round, phase, step in phase), the weights and the phase's optimizer: checkpoints hold those and
`--resume` continues with the same result as an uninterrupted run.

Where things are, in file order: `ReadmeStrategy` (what a checkpoint saves and loads) and the
batch arithmetic (`_draw`, `_positions`, `_router_rows`); the dense source and its labels
(`dense_source`, `compute_labels`, label files); the router's loss and metrics
(`router_terms`, `router_metrics`); checkpoints; `train_readme`, which runs a `ReadmeRun`
through its stages (`load`, `label`, `prepare`, `start`, `rounds` of `phase`s of steps,
`finish`); and the two step functions, `_router_step` and `_backbone_step`. What it shares with
the adapter recipe (data, model loading, batches and loss, the run folder, metrics, the
progress bar, Ctrl-C) is `upcycle.train.components`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys

import torch

from upcycle.errors import InputError, OptionError
from upcycle.io.jsonfile import read_json
from upcycle.methods.readme import NEURONS_FILE, ROUTER_PREFIX
from upcycle.run_format import METRICS
from upcycle.train.checkpoints import (
    STATE,
    checkpoint_root,
    load_optimizer,
    optimizer_tensors,
    read_state,
    rng_state,
    set_rng_state,
)
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
from upcycle.train.data import IGNORE, Blocks
from upcycle.train.options import TrainOptions
from upcycle.train.strategies.full import FullStrategy

LABELS = "readme_labels.safetensors"
PHASES = ("router", "backbone")
ROUTER_STREAM = 104_729  # the router phases' data order: seed + this (backbone: seed)


class _OneProcess:
    """What `upcycle.train.components.evaluate_loss` asks of an Accelerator, for one process."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self, device):
        self.device = device

    def reduce(self, tensor, reduction="sum"):
        return tensor


class ReadmeStrategy(FullStrategy):
    """How a readme run stores weights: as `--adapter full` does (the whole model as
    `save_pretrained` writes it, the base's config.json with auto_map and its code files),
    plus the base's readme_neurons.json. The recipe chooses the trainable parameters itself."""

    def __init__(self, opts: TrainOptions, base: str):
        super().__init__(opts)
        self.base = base

    def save(self, model, folder: str, weights: dict | None = None) -> None:
        super().save(model, folder, weights)
        src = os.path.join(self.base, NEURONS_FILE)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, NEURONS_FILE))


# -- schedule -----------------------------------------------------------------------------------


def _draw(seed: int, g: int, per_step: int, n: int) -> torch.Tensor:
    """Block indices of global phase step g: a slice of the (seed, epoch) permutation."""
    epoch, within = divmod(g, n // per_step)
    return epoch_order(seed, epoch, n)[within * per_step : (within + 1) * per_step]


def _phase_steps(opts: TrainOptions, phase: str) -> int:
    return opts.router_steps if phase == "router" else opts.backbone_steps


def _positions(opts: TrainOptions):
    """(round, phase) of every phase with steps, in training order."""
    return [(r, p) for r in range(opts.rounds) for p in PHASES if _phase_steps(opts, p)]


def _router_rows(opts: TrainOptions, n: int) -> list[int]:
    """Every training block a router phase of the schedule draws (the blocks to label)."""
    per = opts.batch_size * opts.grad_accum
    seed = opts.seed + ROUTER_STREAM
    rows: set[int] = set()
    for g in range(opts.rounds * opts.router_steps):
        rows.update(_draw(seed, g, per, n).tolist())
    return sorted(rows)


# -- labels -------------------------------------------------------------------------------------


def dense_source(opts: TrainOptions, base: str) -> str:
    """The dense model whose activations label the tokens: --dense, else the base's
    upcycle.json (`dense`, written by `upcycle merge`, or `source.path`, by `upcycle convert`)."""
    from upcycle.io.default_model import resolve_model

    if opts.dense:
        path = resolve_model(opts.dense)
        named = "--dense"
    else:
        prov = os.path.join(base, "upcycle.json")
        record = read_json(prov) if os.path.isfile(prov) else {}
        source = record.get("source")
        path = record.get("dense") or (source or {}).get("path")
        if not path:
            raise InputError(f"{base}: upcycle.json names no dense source model; pass --dense")
        named = f"{prov}"
    if not os.path.isdir(path):
        raise InputError(f"dense model {path} (named by {named}) not found; pass --dense")
    return path


def _check_dense(path: str, member, vocab_size: int) -> None:
    """The dense model must have the Read-ME model's layers, FFN width and vocabulary."""
    from upcycle.io.models import read_config

    cfg = read_config(path)
    want = (member.shape[0], member.shape[1], vocab_size)
    got = (cfg.get("num_hidden_layers"), cfg.get("intermediate_size"), cfg.get("vocab_size"))
    if got != want:
        raise InputError(
            f"dense model {path} does not fit the Read-ME model (layers, FFN width, vocab "
            f"{list(got)}, expected {list(want)}); pass --dense with its source model"
        )


def _load_dense(path: str, device):
    from upcycle.io.models import load_causal_lm

    model = load_causal_lm(path, dtype=torch.float32).to(device).eval()
    if not all(hasattr(getattr(x, "mlp", None), "down_proj") for x in model.model.layers):
        raise InputError(f"dense model {path}: its layers have no mlp.down_proj")
    return model


class _Backbone:
    """The dense model without its LM head, for activation_scores (which only reads hooks)."""

    def __init__(self, lm):
        self.model = lm.model

    def __call__(self, **kwargs):
        return self.model(**kwargs, use_cache=False)


def compute_labels(dense, blocks: Blocks, rows: list[int], member, batch_size: int):
    """(hard (n, T) long with IGNORE at padding, soft (n, T, E) float32) for blocks[rows]."""
    from upcycle.methods.readme import activation_scores

    E = member.shape[-1]
    T = blocks.input_ids.shape[1]
    if not rows:
        return torch.zeros(0, T, dtype=torch.long), torch.zeros(0, T, E)
    index = torch.tensor(rows)
    ids = blocks.input_ids[index].to(next(dense.model.parameters()).device)
    scores = activation_scores(_Backbone(dense), ids, member, batch_size=batch_size)
    scores = scores.reshape(len(rows), T, E).float().cpu()
    soft = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)
    hard = soft.argmax(-1)
    hard[blocks.attention_mask[index] == 0] = IGNORE
    return hard, soft.contiguous()


def _save_labels(out: str, labels: dict[str, torch.Tensor], dense: str) -> None:
    from safetensors.torch import save_file

    tmp = os.path.join(out, f".{LABELS}.tmp")
    save_file(labels, tmp, metadata={"dense": dense})
    os.replace(tmp, os.path.join(out, LABELS))


def _read_labels(out: str, rows: list[int], n_eval: int) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(out, LABELS)
    try:
        labels = load_file(path)
    except (OSError, SafetensorError) as e:
        raise InputError(f"--resume: {path} is missing or damaged ({e})") from None
    if labels.get("train_rows", torch.zeros(0)).tolist() != rows or "eval_soft" not in labels:
        raise InputError(f"--resume: {path} does not label this run's blocks")
    held = labels["eval_hard"].shape[0]
    if n_eval > held:
        raise OptionError(
            f"--resume: the run labeled {held} held-out blocks; --max-eval-blocks cannot grow"
        )
    for key in ("eval_hard", "eval_soft"):  # the held-out blocks are a prefix of the same list
        labels[key] = labels[key][:n_eval]
    return labels


# -- losses and metrics -------------------------------------------------------------------------


def router_logits(model, input_ids, attention_mask):
    """The pre-gate's (B, T, E) logits, as the model computes them (positions 0..T-1)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    return model.model.router(input_ids, attention_mask, positions).float()


def router_terms(logits, hard, soft):
    """Sums over labeled tokens: (CE vs hard, KL(soft || softmax), correct top-1, count)."""
    valid = hard != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(-1, hard.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kl = (torch.special.xlogy(soft, soft) - soft * logp).sum(-1)
    correct = (logits.argmax(-1) == hard) & valid
    return (ce * valid).sum(), (kl * valid).sum(), correct.sum(), valid.sum()


@torch.no_grad()
def router_metrics(model, ids, mask, hard, soft, batch_size: int, device) -> dict:
    """Top-1 agreement with the hard labels, mean CE and KL over the labeled tokens."""
    totals = torch.zeros(4, dtype=torch.float64)
    for i in range(0, ids.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        logits = router_logits(model, ids[sl].to(device), mask[sl].to(device))
        terms = router_terms(logits, hard[sl].to(device), soft[sl].to(device))
        totals += torch.stack([t.double().cpu() for t in terms])
    n = max(float(totals[3]), 1.0)
    return {
        "accuracy": float(totals[2]) / n,
        "ce": float(totals[0]) / n,
        "kl": float(totals[1]) / n,
    }


# -- checkpoints --------------------------------------------------------------------------------


def _save_checkpoint(model, strategy, out: str, step: int, state: dict, optimizer=None) -> str:
    """checkpoints/step-N: weights, RNG, the phase's optimizer (mid-phase only), the state."""
    from safetensors.torch import save_file

    root = checkpoint_root(out)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    strategy.save(model, tmp)
    save_file(rng_state(), os.path.join(tmp, "rng-0.safetensors"))
    groups = None
    if optimizer is not None:
        tensors, groups = optimizer_tensors(optimizer)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, STATE), "w") as f:
        json.dump({**state, "step": step, "param_groups": groups}, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


# -- the run ------------------------------------------------------------------------------------


def _check_base(opts: TrainOptions, base: str):
    """The base must be an upcycle_readme model; returns its (L, I, E) expert membership."""
    from upcycle.io.models import read_config
    from upcycle.methods.readme import load_membership

    model_type = read_config(base).get("model_type")
    if model_type != "upcycle_readme":
        raise OptionError(
            f"--method readme: {opts.model} is not a Read-ME model (model_type {model_type!r}; "
            "make one with `upcycle convert DENSE OUT --method readme`)"
        )
    return load_membership(base)


def train_readme(opts: TrainOptions, log=None) -> dict:
    """Run Read-ME's schedule (module docstring); returns the final metrics. `opts` is
    validated by the caller (`upcycle.train.recipes.train`)."""
    run = ReadmeRun(opts, log or log_to_stderr)
    run.load()
    run.label()
    run.prepare()
    with Sigint() as sigint:  # Ctrl-C from here on: a checkpoint after the step
        run.start()
        run.rounds(sigint)
    end_steps(run.bar, run.trimmer)
    return run.finish()


class ReadmeRun:
    """One run of the Read-ME recipe: its state, built up stage by stage (see `train_readme`)."""

    def __init__(self, opts: TrainOptions, log):
        self.opts, self.log = opts, log

    # -- set-up -----------------------------------------------------------------------------

    def read_resume(self) -> dict | None:
        """The state of the checkpoint --resume continues (checked), or None for a new run."""
        if self.resume_from is None:
            return None
        resumed = read_state(self.resume_from)
        if (resumed.get("options") or {}).get("method") != "readme":
            raise OptionError("--resume: the run in OUT was not trained with --method readme")
        missing = [k for k in ("round", "phase", "phase_step", "tokens") if k not in resumed]
        if missing or resumed["phase"] not in PHASES:
            raise InputError(f"{self.resume_from}: not a complete readme checkpoint ({STATE})")
        check_trajectory(self.opts, resumed)
        return resumed

    def load(self) -> None:
        """OUT checked, the resume state, the Read-ME base and its expert membership, the model
        and tokenizer, the data, and the router's and the backbone's parameters."""
        from upcycle.adapters.fingerprint import model_fingerprint
        from upcycle.io.default_model import resolve_model

        opts = self.opts
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise OptionError("--method readme trains in one process (no accelerate launch)")
        self.resume_from = check_out(opts)
        self.resumed = self.read_resume()
        self.base = resolve_model(opts.model, log=self.log)
        self.member = _check_base(opts, self.base)
        self.strategy = ReadmeStrategy(opts, self.base)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(opts.seed)
        weights = self.strategy.load_from(self.base, self.resume_from)
        model, tokenizer = load_model(opts, weights, self.base)
        resumed = self.resumed
        self.fingerprint = (
            model_fingerprint(model) if resumed is None else resumed.get("base_fingerprint")
        )
        model.to(self.device)
        model.config.use_cache = False
        if hasattr(model.config, "output_router_logits"):
            model.config.output_router_logits = False  # backbone rounds: the LM loss only
        self.model = model
        self.blocks, self.eval_blocks = load_data(opts, tokenizer)
        self.per_step = opts.batch_size * opts.grad_accum
        if len(self.blocks) < self.per_step:
            raise InputError(
                f"the data makes {len(self.blocks)} blocks of {opts.seq_len} tokens, fewer than "
                f"one batch ({opts.batch_size} x {opts.grad_accum} accumulation)"
            )
        self.names = dict(model.named_parameters())
        router_names = [n for n in self.names if n.startswith(ROUTER_PREFIX)]
        if not router_names:
            raise InputError(f"{self.base}: the model has no pre-gating router ({ROUTER_PREFIX}*)")
        self.groups = {
            "router": [self.names[n] for n in router_names],
            "backbone": [p for n, p in self.names.items() if not n.startswith(ROUTER_PREFIX)],
        }
        self.counts = {k: sum(p.numel() for p in v) for k, v in self.groups.items()}

    def label(self) -> None:
        """The labels of the training blocks the router phases draw and of the held-out blocks:
        computed from the dense model (a new run, which starts OUT afresh and stores them) or
        read back (a resumed run)."""
        opts = self.opts
        rows = _router_rows(opts, len(self.blocks))
        self.n_eval = len(self.eval_blocks) if self.eval_blocks is not None else 0
        if self.resume_from is not None:
            self.labels = _read_labels(opts.out, rows, self.n_eval)
            self.dense_path = self.resumed.get("dense")
        else:
            self.dense_path = dense_source(opts, self.base)
            _check_dense(self.dense_path, self.member, self.model.config.vocab_size)
            self.log(
                f"readme: activation labels of {len(rows) + self.n_eval} blocks "
                f"({(len(rows) + self.n_eval) * opts.seq_len} tokens) from {self.dense_path} ..."
            )
            self.labels = self.dense_labels(rows)
            start_fresh(opts)
            _save_labels(opts.out, self.labels, self.dense_path)
        self.slot = torch.full((len(self.blocks),), -1, dtype=torch.long)  # block -> its row
        self.slot[self.labels["train_rows"]] = torch.arange(len(rows))
        # router accuracy on training labels: the first labeled blocks (as many as held out)
        self.probe = self.labels["train_rows"][: opts.max_eval_blocks or None]

    def dense_labels(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The labels of blocks[rows] and of the held-out blocks, from the dense model (loaded
        for this and released)."""
        batch_size = self.opts.batch_size
        dense = _load_dense(self.dense_path, self.device)
        train_hard, train_soft = compute_labels(dense, self.blocks, rows, self.member, batch_size)
        eval_hard, eval_soft = (
            compute_labels(
                dense, self.eval_blocks, list(range(self.n_eval)), self.member, batch_size
            )
            if self.n_eval
            else compute_labels(dense, self.blocks, [], self.member, batch_size)
        )
        del dense
        gc.collect()
        return {
            "train_rows": torch.tensor(rows, dtype=torch.long),
            "train_hard": train_hard,
            "train_soft": train_soft,
            "eval_hard": eval_hard,
            "eval_soft": eval_soft,
        }

    def prepare(self) -> None:
        """Checkpointed layers, the heap trimmer, the metrics file and the run's record."""
        opts = self.opts
        if opts.gradient_checkpointing:
            enable_checkpointing(self.model, ffn_outside=False)
        self.model.train()
        self.trimmer = trim_heap(opts, self.model, self.device, self.log)
        self.one = _OneProcess(self.device)
        self.metrics = MetricsLog(os.path.join(opts.out, METRICS))
        self.total = opts.rounds * (opts.router_steps + opts.backbone_steps)
        self.run_state = {
            "options": opts.trajectory(),
            "base": os.path.abspath(self.base),
            "base_fingerprint": self.fingerprint,
            "dense": os.path.abspath(self.dense_path) if self.dense_path else None,
            "world_size": 1,
        }

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, rnd: int, phase: str, step: int) -> dict:
        """Held-out loss and perplexity, the router's held-out accuracy and CE, its accuracy on
        the probed training blocks."""
        opts, model, labels, probe = self.opts, self.model, self.labels, self.probe
        entry = {"step": step, "round": rnd, "phase": phase}
        if self.n_eval:
            held = self.eval_blocks
            entry["eval_loss"] = evaluate_loss(model, held, opts.batch_size, self.one)
            entry["eval_ppl"] = math.exp(min(entry["eval_loss"], 50.0))
            m = router_metrics(
                model, held.input_ids, held.attention_mask, labels["eval_hard"],
                labels["eval_soft"], opts.batch_size, self.device,
            )  # fmt: skip
            entry.update(eval_router_accuracy=m["accuracy"], eval_router_ce=m["ce"])
        if len(probe):
            m = router_metrics(
                model, self.blocks.input_ids[probe], self.blocks.attention_mask[probe],
                labels["train_hard"][: len(probe)], labels["train_soft"][: len(probe)],
                opts.batch_size, self.device,
            )  # fmt: skip
            entry["train_router_accuracy"] = m["accuracy"]
        model.train()
        return entry

    # -- resume or start ----------------------------------------------------------------------

    def start(self) -> None:
        """The position to start from: the checkpoint's (its RNG restored) or the beginning,
        after the evaluation before training."""
        opts, resumed = self.opts, self.resumed
        if resumed is not None:
            self.position = (resumed["round"], resumed["phase"], resumed["phase_step"])
            self.step, self.tokens = resumed["step"], resumed["tokens"]
            self.elapsed_before = resumed.get("elapsed_s", 0.0)
            self.before = resumed.get("before") or {}
            self.history = list(resumed.get("history") or [])
            self.metrics.truncate(self.step)
            rng = os.path.join(self.resume_from, "rng-0.safetensors")
            if os.path.isfile(rng):
                from safetensors.torch import load_file

                set_rng_state(load_file(rng))
            rnd, phase, phase_step = self.position
            where = (
                f"round {rnd + 1}, {phase} step {phase_step}"
                if rnd < opts.rounds
                else "the run had finished"
            )
            self.log(f"resuming from {self.resume_from} ({where})")
            return
        self.position, self.step, self.tokens, self.elapsed_before = (0, "router", 0), 0, 0, 0.0
        self.metrics.truncate(0)
        self.history = []
        self.log(
            f"training Read-ME on {self.base}: router {self.counts['router']:,} / backbone "
            f"{self.counts['backbone']:,} params, {len(self.blocks)} blocks of {opts.seq_len} "
            f"tokens; {opts.rounds} rounds of {opts.router_steps} router + "
            f"{opts.backbone_steps} backbone steps of {self.per_step} blocks"
        )
        self.before = self.evaluate(0, "start", 0)
        self.metrics.write(self.before)
        self.log("before training: " + _describe(self.before))

    # -- the rounds ---------------------------------------------------------------------------

    def rounds(self, sigint) -> None:
        """Every phase from the start position on, in schedule order."""
        self.bar = progress_bar(self.total, self.step, "readme", self.opts.progress)
        self.clock = Throughput(self.tokens, self.elapsed_before)
        self.last: dict = {}
        rnd, phase, phase_step = self.position
        for r, p in _positions(self.opts):
            if _after((rnd, phase), (r, p)):
                continue
            self.phase(r, p, phase_step if (r, p) == (rnd, phase) else 0, sigint)

    def phase(self, r: int, p: str, start: int, sigint) -> None:
        """Phase p of round r from its step `start`: only its parameters train, with a fresh
        AdamW (the checkpoint's moments when it resumes mid-phase)."""
        opts = self.opts
        steps = _phase_steps(opts, p)
        base_lr = opts.router_lr if p == "router" else opts.lr
        lr = base_lr * opts.lr_decay**r
        for name, param in self.names.items():
            param.requires_grad_(name.startswith(ROUTER_PREFIX) == (p == "router"))
        params = self.groups[p]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
        if start:
            try:
                load_optimizer(optimizer, self.resume_from, self.resumed["param_groups"])
            except (OSError, KeyError, ValueError, TypeError) as e:
                raise InputError(
                    f"{self.resume_from}: the optimizer state does not fit this run ({e})"
                ) from None
        self.bar.set_description(f"round {r + 1}/{opts.rounds} {p}")
        seed = opts.seed + (ROUTER_STREAM if p == "router" else 0)
        for s in range(start, steps):
            idx = _draw(seed, r * steps + s, self.per_step, len(self.blocks))
            idx = idx.view(opts.grad_accum, opts.batch_size)
            if p == "router":
                entry = _router_step(
                    self.model, self.blocks, self.labels, self.slot, idx, opts, self.device
                )
            else:
                entry = _backbone_step(self.model, self.blocks, idx, self.device)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.record(r, p, s + 1 == steps, idx, entry, lr, grad_norm)
            self.after_step(r, p, s + 1, steps, optimizer, sigint)

    def record(self, r: int, p: str, phase_end: bool, idx, entry: dict, lr, grad_norm) -> None:
        """The step's metrics, logged every --logging-steps and at the end of a phase."""
        opts = self.opts
        self.step += 1
        self.tokens += sum(
            trimmed_length(self.blocks, idx[m]) * opts.batch_size for m in range(opts.grad_accum)
        )
        tps, timing = self.clock.measure(self.tokens)
        self.last = {
            "step": self.step,
            "round": r,
            "phase": p,
            **entry,
            "lr": lr,
            "grad_norm": float(grad_norm),
            **timing,
        }
        if self.step % opts.logging_steps == 0 or phase_end:
            self.metrics.write(self.last)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{tps:.0f}")

    def after_step(self, r: int, p: str, done: int, steps: int, optimizer, sigint) -> None:
        """After `done` steps of the phase: a finished phase is evaluated; a checkpoint at the
        end of a round, every --save-steps and on Ctrl-C (which then raises Interrupted)."""
        opts = self.opts
        position = (r, p, done)  # the position after this step
        if done == steps:  # a finished phase is evaluated before any save
            result = self.evaluate(r, p, self.step)
            self.metrics.write(result)
            self.history.append(result)
            self.bar.write(
                f"round {r + 1}/{opts.rounds} {p}: " + _describe(result), file=sys.stderr
            )
            nxt = next((x for x in _positions(opts) if _after(x, (r, p))), (opts.rounds, "router"))
            position = (*nxt, 0)
        round_end = done == steps and position[0] > r
        stop = sigint.requested
        if stop or round_end or (opts.save_steps and self.step % opts.save_steps == 0):
            state = {
                **self.run_state,
                "round": position[0],
                "phase": position[1],
                "phase_step": position[2],
                "tokens": self.tokens,
                "elapsed_s": self.last["elapsed_s"],
                "before": self.before,
                "history": self.history,
            }
            mid_phase = position[2] > 0
            path = _save_checkpoint(
                self.model, self.strategy, opts.out, self.step, state,
                optimizer if mid_phase else None,
            )  # fmt: skip
            if stop:
                raise interrupted(self.bar, self.step, path)

    # -- finishing ----------------------------------------------------------------------------

    def finish(self) -> dict:
        """The weights and the record at the root of OUT; returns the final metrics (the last
        phase's evaluation, the throughput, the values before training)."""
        before = self.before
        final = dict(self.history[-1]) if self.history else dict(before)
        timing = ("tokens", "tokens_per_s", "elapsed_s")
        final.update({k: v for k, v in self.last.items() if k in timing})
        for key in ("eval_loss", "eval_ppl", "eval_router_accuracy", "eval_router_ce"):
            if key in before:
                final[f"{key}_before"] = before[key]
        record = {
            **self.run_state,
            "method": "readme",
            "final": final,
            "steps": self.step,
            "history": self.history,
            "trainable_params": self.counts,
        }
        save_final(self.model, self.opts.out, record, self.strategy)
        return final


def _after(a: tuple, b: tuple) -> bool:
    """Phase position a comes after b."""
    return (a[0], PHASES.index(a[1])) > (b[0], PHASES.index(b[1]))


def _describe(entry: dict) -> str:
    parts = []
    if "eval_router_accuracy" in entry:
        parts.append(
            f"held-out router accuracy {entry['eval_router_accuracy']:.3f} "
            f"(CE {entry['eval_router_ce']:.3f})"
        )
    if "train_router_accuracy" in entry:
        parts.append(f"train {entry['train_router_accuracy']:.3f}")
    if "eval_loss" in entry:
        parts.append(f"held-out loss {entry['eval_loss']:.4f} (ppl {entry['eval_ppl']:.2f})")
    return ", ".join(parts) or "no held-out data"


def _router_step(model, blocks: Blocks, labels, slot, idx, opts: TrainOptions, device) -> dict:
    """Forward and backward of one router step (the backbone does not run)."""
    w = opts.router_kl_weight
    chunks = []
    for m in range(idx.shape[0]):
        rows = idx[m]
        length = trimmed_length(blocks, rows)
        at = slot[rows]
        chunks.append(
            (
                blocks.input_ids[rows, :length].to(device),
                blocks.attention_mask[rows, :length].to(device),
                labels["train_hard"][at, :length].to(device),
                labels["train_soft"][at, :length].to(device),
            )
        )
    count = max(sum(int((c[2] != IGNORE).sum()) for c in chunks), 1)
    totals = torch.zeros(4, dtype=torch.float64)
    for ids, mask, hard, soft in chunks:
        ce, kl, correct, n = router_terms(router_logits(model, ids, mask), hard, soft)
        (((1 - w) * ce + w * kl) / count).backward()
        totals += torch.stack([ce.detach(), kl.detach(), correct, n]).double().cpu()
    ce, kl = float(totals[0]) / count, float(totals[1]) / count
    return {
        "loss": (1 - w) * ce + w * kl,
        "router_ce": ce,
        "router_kl": kl,
        "router_accuracy": float(totals[2]) / count,
    }


def _backbone_step(model, blocks: Blocks, idx, device) -> dict:
    """Forward and backward of one backbone step: the token-mean LM loss of its blocks."""
    count = max(int((blocks.labels[idx.reshape(-1)][:, 1:] != IGNORE).sum()), 1)
    total = 0.0
    for m in range(idx.shape[0]):
        loss, _ = batch_loss(model, micro_batch(blocks, idx[m], device), count)
        loss.backward()
        total += float(loss.detach())
    return {"loss": total, "lm_loss": total}
