"""LoRA-expert tuners (MixLoRA) for peft; installed as ``upcycle.adapters``.

Importing this package registers MixLoRA with peft, so the usual peft calls work::

    import upcycle.adapters
    from peft import get_peft_model, PeftModel
    model = get_peft_model(base, upcycle.adapters.MixLoraConfig(num_experts=8, top_k=2))
    model.save_pretrained("run")                  # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(base, "run")

Imported under any other name (from the repository root this folder is importable as a
top-level `adapters`, AdapterHub's package), it hands the import over to the installed
`adapters`, or fails as that import fails where none is installed (`upcycle.checkout`).
"""

if __name__ != "upcycle.adapters":
    from upcycle.checkout import hand_over

    hand_over(__name__, __file__)
else:
    from upcycle.io.hub import offline_import

    offline_import("peft")  # peft imports bitsandbytes, whose import may try the Hub
    from upcycle.adapters.config import MixLoraConfig
    from upcycle.adapters.layers import LoraLinear, MixLoraFFN
    from upcycle.adapters.model import MixLoraModel
    from upcycle.adapters.registry import register

    register()

__all__ = ["LoraLinear", "MixLoraConfig", "MixLoraFFN", "MixLoraModel"]
