"""MoE expert and LoRA-expert kernels; installed as ``upcycle.kernels``."""
