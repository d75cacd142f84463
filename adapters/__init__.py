"""LoRA-expert tuners (MixLoRA) for peft; installed as ``upcycle.adapters``.

Importing this package registers MixLoRA with peft, so the usual peft calls work::

    import upcycle.adapters
    from peft import get_peft_model, PeftModel
    model = get_peft_model(base, upcycle.adapters.MixLoraConfig(num_experts=8, top_k=2))
    model.save_pretrained("run")                  # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(base, "run")
"""

from upcycle.adapters.config import MixLoraConfig
from upcycle.adapters.layers import LoraLinear, MixLoraFFN
from upcycle.adapters.model import MixLoraModel
from upcycle.adapters.registry import register

register()

__all__ = ["LoraLinear", "MixLoraConfig", "MixLoraFFN", "MixLoraModel"]
