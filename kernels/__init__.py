"""MoE expert and LoRA-expert kernels; installed as ``upcycle.kernels``.

Importing this package registers `experts_implementation="upcycle"` with transformers
(`upcycle.kernels.dispatch`). Imported under any other name (from the repository root this
folder is importable as a top-level `kernels`, the Hub's package that transformers imports),
it hands the import over to the installed `kernels` (`upcycle.checkout`).
"""

if __name__ != "upcycle.kernels":
    from upcycle.checkout import hand_over

    hand_over(__name__, __file__)
else:
    from upcycle.kernels.dispatch import register

    register()
