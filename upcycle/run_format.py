"""The files of a training run folder, as `upcycle train` writes them and `upcycle merge` reads
them: names only, in one place.

    RUN/adapter_config.json, adapter_model.safetensors   a peft adapter (lora, mixlora, ...)
    RUN/model.safetensors[.index.json], config.json        whole weights (full mode)
    RUN/ROUTER_WEIGHTS                                     the routers alone (router mode)
    RUN/RECORD                                             options, trajectory, final metrics
    RUN/METRICS                                            one JSON line per logged step
    RUN/checkpoint-N/                                      resumable states (train/checkpoints.py)
"""

RECORD = "upcycle_train.json"
METRICS = "metrics.jsonl"
ROUTER_WEIGHTS = "routers.safetensors"
