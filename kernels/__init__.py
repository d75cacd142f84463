"""MoE expert and LoRA-expert kernels; installed as ``upcycle.kernels``.

Importing this package registers `experts_implementation="upcycle"` with transformers
(`upcycle.kernels.experts`). The check on the module name matters: from the repository root
this folder is also importable as a top-level `kernels`, which transformers probes for the
Hub's kernels package while it is still being imported itself.
"""

if __name__ == "upcycle.kernels":
    from upcycle.kernels.experts import register

    register()
