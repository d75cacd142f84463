"""What `upcycle train --adapter X` trains, and how a run folder stores it: one strategy per
adapter, one module per family, and the registry that names them.

    peft.py       mixlora, lora, experts-lora: a peft adapter on the frozen model
                  (adapter_config.json + adapter_model.safetensors)
    full.py       full: every parameter, the model as `save_pretrained` writes it (config.json =
                  the base's, model*.safetensors in the on-disk layout transformers writes, e.g.
                  Mixtral's per-expert block_sparse_moe.experts.E.w1/w2/w3; custom *.py copied)
    router.py     router: only the routers; routers.safetensors holds them under the names the
                  base checkpoint stores them (Mixtral's in-memory mlp.gate.weight is
                  block_sparse_moe.gate.weight on disk)
    base.py       `Strategy`, the defaults every family starts from
    registry.py   --adapter name -> strategy, and what is derived from it: the adapter names,
                  the ones that train the model's own weights, options only some adapters take,
                  the weight files a run's root may hold

A new adapter is a `Strategy` subclass in its own module and one entry in
`registry.STRATEGIES`; `upcycle.train.options` and `upcycle merge` read the rest from there.
Strategy modules import neither torch nor the recipes at module level: `upcycle.train.options`
(and through it `upcycle.merge`) reads the registry without paying for torch.
"""
