"""TrainOptions: everything `upcycle train` depends on (recorded with every checkpoint)."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from upcycle.errors import OptionError

# the --adapter names, and which options apply to which, come from the strategies' registry
from upcycle.train.strategies.registry import ADAPTERS, LORA_ONLY, OWN_OPTIONS, WEIGHT_MODES

METHODS = ("adapter", "readme")  # the recipes (upcycle.train.recipes): adapter, readme
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# Options that may change between a run and its --resume (they do not change the trajectory).
RESUMABLE = {
    "max_steps",
    "epochs",
    "eval_steps",
    "save_steps",
    "logging_steps",
    "resume",
    "force",
    "progress",
    "max_eval_blocks",
    "trim_memory",
    "checkpoint_ffn",
    "dense",
    "trust_remote_code",
}

# Options of --method readme (name -> default), refused by the other methods when changed.
README_ONLY = {
    "rounds": 5,
    "router_steps": 100,
    "backbone_steps": 200,
    "router_lr": 1e-4,
    "lr_decay": 0.8,
    "router_kl_weight": 0.25,
    "dense": None,
}
# Options that --method readme does not use: name -> how the command line spells it.
NOT_README = {
    **LORA_ONLY,
    "adapter": "--adapter",
    "max_steps": "--max-steps",
    "epochs": "--epochs",
    "schedule": "--schedule",
    "warmup_steps": "--warmup-steps",
    "eval_steps": "--eval-steps",
    "router_aux_loss_coef": "--router-aux-loss-coef",
    "checkpoint_ffn": "--checkpoint-ffn",
}


@dataclass
class TrainOptions:
    model: str
    out: str
    data: str
    eval_data: str | None = None
    eval_fraction: float = 0.05
    adapter: str = "mixlora"
    num_experts: int = 8
    top_k: int = 2
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str = ALL_PROJECTIONS
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    jitter_noise: float = 0.0
    expert_view: str = "copy"
    granularity: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    packing: bool = True
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    checkpoint_ffn: bool = False
    trim_memory: bool = False
    trust_remote_code: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    eval_steps: int = 0
    max_eval_blocks: int = 64
    save_steps: int = 0
    logging_steps: int = 1
    seed: int = 0
    method: str = "adapter"
    rounds: int = 5
    router_steps: int = 100
    backbone_steps: int = 200
    router_lr: float = 1e-4
    lr_decay: float = 0.8
    router_kl_weight: float = 0.25
    dense: str | None = None
    resume: bool = False
    force: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"unknown --method {self.method!r}; choose from {', '.join(METHODS)}")
        self._validate_method()
        if self.adapter not in ADAPTERS:
            raise OptionError(
                f"unknown --adapter {self.adapter!r}; choose from {', '.join(ADAPTERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise OptionError(
                f"unknown --schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}"
            )
        if self.dtype not in DTYPES:
            raise OptionError(f"unknown --dtype {self.dtype!r}; choose float32 or bfloat16")
        self.dtype = DTYPES[self.dtype]
        positive = ("batch_size", "grad_accum", "r", "num_experts", "top_k", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("eval_steps", "save_steps", "warmup_steps", "max_eval_blocks"):
            if getattr(self, name) < 0:
                raise OptionError(f"--{name.replace('_', '-')} must not be negative")
        if self.max_steps is not None and self.max_steps < 1:
            raise OptionError("--max-steps must be at least 1")
        if self.epochs <= 0:
            raise OptionError("--epochs must be positive")
        if self.lr <= 0:
            raise OptionError("--lr must be positive")
        if self.seq_len < 2:
            raise OptionError("--seq-len must be at least 2")
        if self.load_in_4bit and self.load_in_8bit:
            raise OptionError("--load-in-4bit and --load-in-8bit exclude each other")
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        if self.adapter in WEIGHT_MODES:
            for name, flag in LORA_ONLY.items():
                if getattr(self, name) != defaults[name]:
                    raise OptionError(
                        f"{flag} applies to the LoRA adapters, not to --adapter {self.adapter}"
                    )
        for adapter, names in OWN_OPTIONS.items():
            if adapter != self.adapter:
                for name in names:
                    if getattr(self, name) != defaults[name]:
                        flag = "--" + name.replace("_", "-")
                        raise OptionError(f"{flag} applies to --adapter {adapter}")

    def _validate_method(self) -> None:
        """--method readme: its schedule options, and no option it does not use."""
        if self.method != "readme":
            for name, default in README_ONLY.items():
                if getattr(self, name) != default:
                    flag = "--" + name.replace("_", "-")
                    raise OptionError(f"{flag} applies to --method readme")
            return
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        for name, flag in NOT_README.items():
            if getattr(self, name) != defaults[name]:
                raise OptionError(f"{flag} does not apply to --method readme")
        if self.rounds < 1:
            raise OptionError(f"--rounds must be at least 1, got {self.rounds}")
        for name in ("router_steps", "backbone_steps"):
            if getattr(self, name) < 0:
                flag = "--" + name.replace("_", "-")
                raise OptionError(f"{flag} must not be negative, got {getattr(self, name)}")
        if self.router_steps == 0 and self.backbone_steps == 0:
            raise OptionError("--router-steps and --backbone-steps are both 0: nothing to train")
        if not self.router_lr > 0:
            raise OptionError(f"--router-lr must be positive, got {self.router_lr}")
        if not 0 < self.lr_decay <= 1:
            raise OptionError(f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        if not 0 <= self.router_kl_weight <= 1:
            raise OptionError(f"--router-kl-weight must be in [0, 1], got {self.router_kl_weight}")

    @property
    def modules(self) -> list[str]:
        mods = [m.strip() for m in str(self.target_modules).split(",") if m.strip()]
        if not mods:
            raise OptionError("--target-modules names no module")
        return mods

    def trajectory(self) -> dict:
        """The options that must match for --resume to continue the same run."""
        return {k: v for k, v in asdict(self).items() if k not in RESUMABLE}
