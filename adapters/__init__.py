"""LoRA-expert tuners (MixLoRA and friends); installed as ``upcycle.adapters``."""
