"""Fold a training run into a standalone checkpoint that stock transformers loads.

    MixLoRA run   -> stock MoE (mixtral for llama/mistral, qwen2_moe/qwen3_moe for qwen):
                     expert e = base FFN (or its slice) + expert e's LoRA deltas,
                     router   = the adapter's router (same softmax -> top-k -> renormalize),
                     attention LoRA added into the base projections.
    LoRA run      -> the merged dense model (W + (alpha/r) B A), same architecture.
    full run      -> the trained model (its saved weights, the base's tokenizer files).
    router run    -> the base with the trained routers in place of its own.

Weights stream one decoder layer at a time through the converter's writer, so memory stays
at about one layer whatever the model size; the output folder appears only when complete.

Where things are, in file order: `Adapter` (a saved peft folder) and `PatchedCheckpoint` (a
base whose tensors read with deltas added or replaced); `MixLoraMerge`, the conversion method
that turns MixLoRA layers into experts (its slices and scales come from
`upcycle.adapters.export`, as the adapter's forward does); `merge`, the entry point that
dispatches on the run's kind, with `_patched_base` (the base read with the adapter's deltas)
and `merge_mixlora` (MixLoRA runs through the converter); `weights_run` / `merge_weights` for
full, router and readme runs (`_weights_base`, `_trained_model`, `_with_trained_routers`,
`_weights_provenance`); `experts_patches` for experts-lora runs (stock per-expert or fused
layouts, FFN and attention routers); `merge_dense` and `write_standalone`, which stream any
patched checkpoint to OUT through `upcycle.engine.outputs.write_model`.
"""

from __future__ import annotations

import os
import re
import sys
import time

import numpy as np

from upcycle.engine.outputs import Contents, write_model
from upcycle.errors import InputError, UnsupportedError
from upcycle.io.arrays import cast, to_float32
from upcycle.io.checkpoint import Checkpoint
from upcycle.io.jsonfile import read_json
from upcycle.methods.base import Method, MethodInfo, MoELayer, MoELayout
from upcycle.run_format import (
    RECORD,
    ROUTER_WEIGHTS,  # `upcycle train --adapter router`
)
from upcycle.train.options import WEIGHT_MODES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_ROLES = ("gate", "up", "down")

INFO = MethodInfo(
    name="mixlora",
    paper="https://arxiv.org/abs/2404.15159",
    summary="MixLoRA experts folded into a stock MoE (expert = base FFN + its LoRA delta)",
    exact="exact: the merged model computes the adapter model's function",
)


class Adapter:
    """A saved peft adapter folder: its config and its tensors (fp32 numpy, prefix stripped)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        cfg_path = os.path.join(path, ADAPTER_CONFIG)
        if not os.path.isdir(path):
            raise InputError(f"{path}: no such adapter folder")
        if not os.path.isfile(cfg_path):
            raise InputError(f"{path}: no {ADAPTER_CONFIG} (not a saved adapter)")
        self.config: dict = read_json(cfg_path)
        self.kind = str(self.config.get("peft_type", "")).upper()
        if self.kind not in ("MIXLORA", "LORA"):
            raise UnsupportedError(
                f"{path}: cannot merge a {self.kind or 'typeless'} adapter (MixLoRA and LoRA only)"
            )
        weights = os.path.join(path, ADAPTER_WEIGHTS)
        if not os.path.isfile(weights):
            other = [f for f in os.listdir(path) if f.startswith("adapter_model")]
            hint = f" (found {other[0]}; only safetensors are read)" if other else ""
            raise InputError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(weights)
        except (SafetensorError, OSError) as e:
            raise InputError(f"{weights}: not a readable safetensors file ({e})") from None
        self.tensors = {k.removeprefix(_PEFT_PREFIX): t.float().numpy() for k, t in tensors.items()}
        if self.kind == "LORA":
            for key in ("use_dora", "use_rslora"):
                if self.config.get(key):
                    raise UnsupportedError(f"{path}: merging LoRA with {key} is not supported")
            if self.config.get("rank_pattern") or self.config.get("alpha_pattern"):
                raise UnsupportedError(f"{path}: merging per-module ranks is not supported")
        from upcycle.adapters.export import lora_scaling

        self.scaling = lora_scaling(self.config["lora_alpha"], self.config["r"])

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def base_fingerprint(self) -> str | None:
        """Recorded by MixLoRA configs, and by `upcycle train` runs in RECORD."""
        if self.config.get("base_fingerprint"):
            return self.config["base_fingerprint"]
        for name in (RECORD, "trainer_state.json"):  # a run's root, or one checkpoint
            record = os.path.join(self.path, name)
            if not os.path.isfile(record):
                continue
            return read_json(record).get("base_fingerprint")
        return None

    def check_base(self, ckpt: Checkpoint, embed_name: str) -> None:
        from upcycle.adapters.fingerprint import checkpoint_fingerprint

        want = self.base_fingerprint
        if want and embed_name in ckpt and checkpoint_fingerprint(ckpt, embed_name) != want:
            raise InputError(
                f"{self.path} was trained on another base model than {ckpt.path} "
                "(fingerprints differ); pass --base with the model it was trained on"
            )

    def linear_deltas(self) -> dict[str, np.ndarray]:
        """Module weight name -> fp32 delta (alpha/r) B A for every plain-LoRA module."""
        a_name, b_name = (
            ("lora_A.weight", "lora_B.weight")
            if self.kind == "LORA"
            else ("mixlora_A.weight", "mixlora_B.weight")
        )
        deltas = {}
        for key, a in self.tensors.items():
            if not key.endswith("." + a_name):
                continue
            module = key[: -len(a_name) - 1]
            b = self.tensors.get(f"{module}.{b_name}")
            if b is None:
                raise InputError(f"{self.path}: {module} has a LoRA A but no B")
            deltas[module + ".weight"] = self.scaling * (b.astype(np.float64) @ a)
        return deltas

    def mixlora_layers(self) -> dict[str, dict[str, np.ndarray]]:
        """FFN module name -> {"router": (E, H), "gate_A": ..., ...} for every MixLoRA FFN."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for key, t in self.tensors.items():
            for marker in (".mixlora_router.weight", ".mixlora_experts."):
                if marker in key:
                    module, _, rest = key.partition(marker)
                    name = "router" if marker.endswith("weight") else rest
                    out.setdefault(module, {})[name] = t
        return out


class PatchedCheckpoint(Checkpoint):
    """A checkpoint whose listed weights read as weight + fp32 delta (cast back on the way out).

    `deltas` maps tensor names to arrays, or to (shape, function) pairs computed on demand;
    `replace` maps tensor names to arrays that stand in for the stored ones.
    """

    def __init__(self, path: str, deltas: dict, replace: dict[str, np.ndarray] | None = None):
        super().__init__(path)
        self.deltas = deltas
        self.replace = replace or {}
        for name, delta in [*deltas.items(), *self.replace.items()]:
            shape = delta[0] if isinstance(delta, tuple) else delta.shape
            if name not in self.infos:
                raise InputError(
                    f"the adapter does not fit {path}: the base has no tensor {name} "
                    "(was it trained on another model?)"
                )
            if tuple(self.infos[name].shape) != tuple(shape):
                raise InputError(
                    f"the adapter does not fit {path}: {name} is {list(self.infos[name].shape)} "
                    f"in the base but {list(shape)} in the adapter"
                )

    def get(self, name: str, dtype: str | None = None) -> np.ndarray:
        stored = self.infos[name].dtype if name in self.infos else None
        if name in self.replace:
            return cast(
                np.ascontiguousarray(self.replace[name], np.float32), "F32", dtype or stored
            )
        if name not in self.deltas:
            return super().get(name, dtype)
        delta = self.deltas[name]
        delta = delta[1]() if isinstance(delta, tuple) else delta
        merged = to_float32(super().get(name), stored) + delta  # float64: one rounding at the end
        return cast(merged.astype(np.float32), "F32", dtype or stored)


class MixLoraMerge(Method):
    """The converter method that materializes MixLoRA experts from one dense FFN per layer."""

    info = INFO

    def __init__(self, adapter: Adapter, layer_prefix: str, ffn_module: str, num_layers: int):
        cfg = adapter.config
        self.num_experts = int(cfg["num_experts"])
        self.top_k = int(cfg["top_k"])
        self.scaling = adapter.scaling
        self.granularity = int(cfg.get("granularity") or 1)
        self.granular = cfg.get("expert_view", "copy") == "granular"
        self.layers: dict[int, dict[str, np.ndarray]] = {}
        found = adapter.mixlora_layers()
        for i in range(num_layers):
            module = layer_prefix.format(i=i) + ffn_module
            if module in found:
                self.layers[i] = found.pop(module)
        if found:
            raise InputError(
                f"the adapter does not fit the base model: it has {next(iter(found))}, "
                "which the base lacks (was it trained on another model?)"
            )
        if not self.layers:
            raise InputError(f"{adapter.path}: the adapter has no MixLoRA FFN layers")
        if self.granular and len(self.layers) != num_layers:
            raise UnsupportedError(
                "merging a granular MixLoRA view adapted on only some layers is not supported"
            )

    def describe(self) -> str:
        view = f"granular view G={self.granularity}" if self.granular else "copy view"
        return f"MixLoRA experts ({view}, LoRA scale {self.scaling:g}) and trained routers"

    def layout(self, hidden: int, intermediate: int) -> MoELayout:
        if self.granular and intermediate % self.granularity:
            raise InputError(
                f"the adapter's granularity {self.granularity} does not divide the base's FFN "
                f"width {intermediate} (was it trained on another model?)"
            )
        from upcycle.adapters.export import expert_view

        self.view = expert_view(
            self.granular, self.num_experts, self.top_k, intermediate, self.granularity
        )
        return MoELayout(self.num_experts, self.top_k, expert_width=self.view.width)

    def layer(self, i: int, ffn: dict[str, np.ndarray], dtype: str) -> MoELayer:
        E, H = self.num_experts, ffn["down"].shape[0]
        if i not in self.layers:  # not adapted: identical experts compute the dense FFN exactly
            return MoELayer(router=np.zeros((E, H), np.float32), experts=[dict(ffn)] * E)
        lay = self.layers[i]
        router = lay["router"]
        if router.shape != (E, H):
            raise InputError(
                f"the adapter does not fit the base model: layer {i}'s router is "
                f"{list(router.shape)}, expected {[E, H]}"
            )
        base = {role: to_float32(ffn[role], dtype) for role in _ROLES}
        scale = self.view.scale  # the forward's factor on routing weights, here in down
        experts = []
        for e in range(E):
            lo, hi = self.view.neurons(e)
            w = {
                "gate": base["gate"][lo:hi],
                "up": base["up"][lo:hi],
                "down": base["down"][:, lo:hi],
            }
            expert = {}
            for role in _ROLES:
                a, b = lay.get(f"{role}_A"), lay.get(f"{role}_B")
                m = w[role]
                if a is not None:
                    delta = b[e].astype(np.float64) @ a[e]
                    if delta.shape != m.shape:
                        raise InputError(
                            f"the adapter does not fit the base model: layer {i}'s {role} LoRA "
                            f"is {list(delta.shape)}, the FFN slice {list(m.shape)}"
                        )
                    m = m + self.scaling * delta
                if role == "down" and scale != 1.0:
                    m = m * scale
                expert[role] = cast(np.ascontiguousarray(m, np.float32), "F32", dtype)
            experts.append(expert)
        return MoELayer(router=router.astype(np.float32), experts=experts)


def _resolve_base(adapter: Adapter, base: str | None, log) -> str:
    from upcycle.io.default_model import resolve_model

    path = base or adapter.base
    if not path:
        raise InputError(f"{adapter.path}: the adapter names no base model; pass --base")
    path = resolve_model(path, log=log)
    if not os.path.isdir(path):
        raise InputError(
            f"base model {path} (named by the adapter) not found; pass --base with its folder"
        )
    return path


def merge(
    run: str,
    out: str,
    *,
    base: str | None = None,
    target: str | None = None,
    dtype: str = "float32",
    max_shard_size: str = "5GB",
    force: bool = False,
    progress: bool = True,
    log=None,
):
    """Merge the adapter saved in `run` into its base and write a standalone checkpoint to `out`."""
    from upcycle.io.writer import check_output_dir

    log = log or (lambda msg: print(msg, file=sys.stderr))
    check_output_dir(out, force)
    written = dict(dtype=dtype, max_shard_size=max_shard_size, force=force, progress=progress)
    record = weights_run(run)
    if record is not None:  # --adapter full or router: trained weights, no adapter
        return merge_weights(run, record, out, base=base, target=target, log=log, **written)
    if not os.path.isfile(os.path.join(run, ADAPTER_CONFIG)) and os.path.isdir(
        os.path.join(run, "checkpoints")
    ):
        raise InputError(
            f"{run}: the run has not finished (nothing at its root); "
            f"merge one of {os.path.join(run, 'checkpoints')}/step-N"
        )
    adapter = Adapter(run)
    base_dir = _resolve_base(adapter, base, log)
    ckpt = _patched_base(adapter, base_dir, target)
    adapter.check_base(ckpt, _embed_name(ckpt))
    if adapter.kind == "LORA" or adapter.config.get("mode") == "experts":
        # same architecture as the base: every tensor written under its own name
        return merge_dense(ckpt, out, adapter, **written)
    return merge_mixlora(adapter, ckpt, base_dir, out, target=target, log=log, **written)


def _patched_base(adapter: Adapter, base_dir: str, target: str | None) -> PatchedCheckpoint:
    """The base read with the adapter's deltas added (and an experts-lora run's routers in
    place); refuses --target where the output keeps the base's architecture."""
    if adapter.kind == "MIXLORA" and adapter.config.get("mode") == "experts":
        if target:
            raise UnsupportedError(
                "--target does not apply: an experts-lora run keeps its MoE architecture"
            )
        deltas, replace = experts_patches(adapter, Checkpoint(base_dir))
        return PatchedCheckpoint(base_dir, {**adapter.linear_deltas(), **deltas}, replace)
    ckpt = PatchedCheckpoint(base_dir, adapter.linear_deltas())
    if adapter.kind == "LORA" and target:
        raise UnsupportedError("--target applies to MixLoRA runs; a LoRA run merges into its base")
    return ckpt


def merge_mixlora(
    adapter: Adapter,
    ckpt: PatchedCheckpoint,
    base_dir: str,
    out: str,
    *,
    target: str | None,
    dtype: str,
    max_shard_size: str,
    force: bool,
    progress: bool,
    log,
):
    """A MixLoRA run on a dense base: the converter writes a stock MoE whose experts are the
    base FFN (or its slices) plus each expert's LoRA delta (`MixLoraMerge`)."""
    from upcycle.engine.plan import family_of
    from upcycle.engine.stream import convert
    from upcycle.methods.options import ConvertOptions

    family = family_of(ckpt)
    num_layers = ckpt.config["num_hidden_layers"]
    ffn_module = family.ffn.down.rsplit(".", 2)[0]  # "mlp.down_proj.weight" -> "mlp"
    method = MixLoraMerge(adapter, family.layer_prefix, ffn_module, num_layers)
    opts = ConvertOptions(
        method="mixlora",
        num_experts=method.num_experts,
        top_k=method.top_k,
        target=target,
        router_aux_loss_coef=float(adapter.config.get("router_aux_loss_coef", 0.01)),
        dtype=dtype,
        max_shard_size=max_shard_size,
        method_options={"router_init": "trained"},
    )
    return convert(
        base_dir, out, opts, force=force, progress=progress, log=log, method=method, ckpt=ckpt
    )


def weights_run(path: str) -> dict | None:
    """The training record of an `upcycle train --adapter full|router` or `--method readme`
    folder (its root's upcycle_train.json or a checkpoint's trainer_state.json), else None."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        return None
    for name in (RECORD, "trainer_state.json"):
        record_path = os.path.join(path, name)
        if not os.path.isfile(record_path):
            continue
        record = read_json(record_path)
        options = record.get("options")
        if isinstance(options, dict) and (
            options.get("method") == "readme" or options.get("adapter") in WEIGHT_MODES
        ):
            return record
    return None


def merge_weights(
    run: str,
    record: dict,
    out: str,
    *,
    base: str | None,
    target: str | None,
    dtype: str,
    max_shard_size: str,
    force: bool,
    progress: bool,
    log,
):
    """A full run: its model, written standalone with the base's tokenizer. A router run: the
    base with its routers replaced by the trained ones (every other tensor copied as is). A
    readme run (`upcycle train --method readme`): as a full run, with readme_neurons.json."""
    readme = record["options"].get("method") == "readme"
    kind = "readme" if readme else record["options"]["adapter"]
    if target:
        raise UnsupportedError(
            f"--target applies to MixLoRA runs; a {kind} run keeps its base's architecture"
        )
    base_dir = _weights_base(record, base, kind, log)
    if kind in ("full", "readme"):
        ckpt = _trained_model(run, base_dir)
    else:
        ckpt = _with_trained_routers(run, record, base_dir)
    provenance, extra = _weights_provenance(run, record, kind, base_dir, ckpt)
    return write_standalone(
        ckpt,
        out,
        provenance,
        aux_dir=base_dir,
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        progress=progress,
        extra_files=extra,
    )


def _weights_base(record: dict, base: str | None, kind: str, log) -> str | None:
    """The base folder (--base, else the one the run names); None where a full or readme run's
    base is missing (then no tokenizer files are copied)."""
    from upcycle.io.default_model import resolve_model

    base_dir = resolve_model(base or record.get("base") or "", log=log)
    if not base_dir or not os.path.isdir(base_dir):
        if kind == "router":
            raise InputError(
                f"base model {base_dir or '?'} (named by the run) not found; "
                "pass --base with its folder"
            )
        log(f"note: base model {base_dir or '?'} not found; no tokenizer files copied (--base)")
        return None
    return base_dir


def _trained_model(run: str, base_dir: str | None) -> Checkpoint:
    """A full or readme run's saved model, checked against the base where there is one."""
    ckpt = Checkpoint(run)
    if base_dir is not None:
        base_cfg = Checkpoint(base_dir).config
        for key in ("model_type", "vocab_size"):
            if base_cfg.get(key) != ckpt.config.get(key):
                raise InputError(
                    f"{run} was trained on another base model than {base_dir} "
                    f"({key} {ckpt.config.get(key)!r} vs {base_cfg.get(key)!r}); pass --base"
                )
    return ckpt


def _with_trained_routers(run: str, record: dict, base_dir: str) -> PatchedCheckpoint:
    """The base with a router run's routers in place of its own (fingerprint checked)."""
    ckpt = PatchedCheckpoint(base_dir, {}, _router_tensors(run))
    want = record.get("base_fingerprint")
    embed = _embed_name(ckpt)
    if want and embed:
        from upcycle.adapters.fingerprint import checkpoint_fingerprint

        if checkpoint_fingerprint(ckpt, embed) != want:
            raise InputError(
                f"{run} was trained on another base model than {base_dir} "
                "(fingerprints differ); pass --base with the model it was trained on"
            )
    return ckpt


def _weights_provenance(
    run: str, record: dict, kind: str, base_dir: str | None, ckpt: Checkpoint
) -> tuple[dict, list[str]]:
    """upcycle.json of a full, router or readme run, and the files copied with it (a readme
    run's readme_neurons.json)."""
    from upcycle import __version__

    provenance = {
        "upcycle_version": __version__,
        "method": f"{kind}-finetune",
        "source": {"path": base_dir},
        "run": os.path.abspath(run),
        "step": record.get("steps", record.get("step")),
        "train_options": record["options"],
        "base_fingerprint": record.get("base_fingerprint"),
    }
    if kind == "router":
        provenance["replaced"] = sorted(ckpt.replace)
    extra = []
    if kind == "readme":  # which dense neurons each expert holds (labels for further training)
        provenance["dense"] = record.get("dense")
        neurons = [os.path.join(d, "readme_neurons.json") for d in (run, base_dir) if d]
        extra = [next((f for f in neurons if os.path.isfile(f)), None)]
        if extra[0] is None:
            raise InputError(f"{run}: no readme_neurons.json (here or in the base)")
    return provenance, extra


def _router_tensors(run: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(run, ROUTER_WEIGHTS)
    if not os.path.isfile(path):
        raise InputError(f"{run}: no {ROUTER_WEIGHTS} (an incomplete router run?)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    if not tensors:
        raise InputError(f"{path}: holds no router tensor")
    return {k: t.float().numpy() for k, t in tensors.items()}


def _embed_name(ckpt) -> str | None:
    return next((n for n in ckpt.keys() if n.endswith("embed_tokens.weight")), None)


def experts_patches(adapter: Adapter, ckpt: Checkpoint) -> tuple[dict, dict]:
    """Per-expert LoRA deltas and trained routers of an experts-lora run, by tensor name."""
    from upcycle.arch.targets import CUSTOM_TARGETS, TARGETS

    target = TARGETS.get(ckpt.model_type) or CUSTOM_TARGETS.get(ckpt.model_type)
    if target is None:
        raise UnsupportedError(
            f"cannot merge experts-lora into a {ckpt.model_type} base "
            f"(supported: {', '.join([*TARGETS, *CUSTOM_TARGETS])})"
        )
    deltas: dict = {}
    replace: dict[str, np.ndarray] = {}
    s = adapter.scaling
    found = 0
    for key, t in adapter.tensors.items():
        m = re.match(r"^(model\.layers\.\d+\.)mlp\.gate\.mixlora_router$", key)
        if m:
            replace[m.group(1) + target.router] = t
            found += 1
            continue
        m = re.match(r"^(model\.layers\.\d+\.self_attn\.router\.)mixlora_router$", key)
        if m:  # bam's soft attention router
            replace[m.group(1) + "weight"] = t
            continue
        m = re.match(
            r"^(model\.layers\.\d+\.)mlp\.experts\.mixlora_experts\.(gate_up|down)_A$", key
        )
        if not m:
            continue
        prefix, role = m.groups()
        b = adapter.tensors[key[:-1] + "B"]
        if target.fused:  # one (E, out, in) tensor per role, as the model holds it
            name = prefix + target.fused[0 if role == "gate_up" else 1]
            deltas[name] = (
                (t.shape[0], b.shape[1], t.shape[2]),
                lambda a=t, b=b: s * np.matmul(b.astype(np.float64), a),
            )
            found += 1
            continue
        for e in range(t.shape[0]):
            if role == "down":
                deltas[prefix + target.expert_name(e, "down")] = (
                    (b.shape[1], t.shape[2]),
                    lambda a=t[e], b=b[e]: s * (b.astype(np.float64) @ a),
                )
            else:
                half = b.shape[1] // 2
                for name, rows in (("gate", slice(0, half)), ("up", slice(half, None))):
                    deltas[prefix + target.expert_name(e, name)] = (
                        (half, t.shape[2]),
                        lambda a=t[e], b=b[e, rows]: s * (b.astype(np.float64) @ a),
                    )
        found += 1
    if not found:
        raise InputError(f"{adapter.path}: the adapter has no expert LoRA or router tensors")
    return deltas, replace


def merge_dense(
    ckpt: PatchedCheckpoint,
    out: str,
    adapter: Adapter,
    *,
    dtype: str,
    max_shard_size: str,
    force: bool,
    progress: bool,
):
    """Write the base with LoRA deltas added: same architecture, names and config."""
    from upcycle import __version__

    provenance = {
        "upcycle_version": __version__,
        "method": "experts-lora-merge" if adapter.kind == "MIXLORA" else "lora-merge",
        "source": {"path": ckpt.path},
        "adapter": adapter.path,
        "adapter_config": adapter.config,
    }
    return write_standalone(
        ckpt,
        out,
        provenance,
        aux_dir=ckpt.path,
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        progress=progress,
    )


def write_standalone(
    ckpt: Checkpoint,
    out: str,
    provenance: dict,
    *,
    aux_dir: str | None,
    dtype: str,
    max_shard_size: str,
    force: bool,
    progress: bool,
    extra_files: tuple | list = (),
):
    """Stream every tensor of `ckpt` (patched or not) under its own name into `out`, with its
    config (dtype updated), the tokenizer files of `aux_dir`, the custom code files next to
    `ckpt` (config with auto_map), `extra_files` and `provenance` as upcycle.json; `out`
    appears when whole (`upcycle.engine.outputs.write_model`)."""
    from upcycle.engine.plan import active_params, output_dtype, shard_bytes
    from upcycle.engine.stream import Summary
    from upcycle.io.arrays import CONFIG_NAMES
    from upcycle.io.models import code_files

    start = time.perf_counter()
    out_dtype = output_dtype(dtype, ckpt.dtype)
    max_shard = shard_bytes(max_shard_size)
    names = [n for n in ckpt.keys() if not n.endswith(".rotary_emb.inv_freq")]
    floats = {n for n in names if ckpt.infos[n].dtype in CONFIG_NAMES}
    entries = [(n, out_dtype if n in floats else ckpt.infos[n].dtype, ckpt.shape(n)) for n in names]
    config = dict(ckpt.config)
    if dtype != "source":
        config["dtype"] = CONFIG_NAMES[out_dtype]
        config.pop("torch_dtype", None)
    contents = Contents(
        config=config,
        files_from=aux_dir,
        code_files=code_files(ckpt.path),  # custom architectures: trust_remote_code=True
        extra_files=extra_files,
        provenance=provenance,
    )
    tensors = _merged_tensors(ckpt, entries, floats, progress)
    size = write_model(out, entries, tensors, contents, max_shard_bytes=max_shard, force=force)
    return Summary(
        os.path.abspath(out),
        config.get("architectures", ["?"])[0],
        sum(int(np.prod(s)) for _, _, s in entries),
        active_params(entries, config),
        size,
        time.perf_counter() - start,
    )


def _merged_tensors(ckpt: Checkpoint, entries: list, floats: set[str], progress: bool):
    """One {name: array} per entry, in order, read from `ckpt` (floats cast to the output
    dtype), behind the "merging" progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(entries, desc="merging", unit="tensor", disable=not progress, file=sys.stderr)
    for name, d, _ in bar:
        yield {name: ckpt.get(name, d if name in floats else None)}
