"""A lazily read Hugging Face checkpoint directory (config.json + safetensors shards)."""

from __future__ import annotations

import json
import os

import numpy as np

from upcycle.errors import InputError
from upcycle.io.arrays import FLOATS, cast
from upcycle.io.jsonfile import read_json
from upcycle.io.safetensors_io import TensorInfo, read_header, read_rows, read_tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """Tensor names, shapes and dtypes from the headers; tensor data read on demand."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.exists(path):
            raise InputError(f"{path}: no such file or directory")
        if not os.path.isdir(path):
            raise InputError(f"{path}: not a model directory (expected a folder with config.json)")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise InputError(f"{path}: not a model directory (no config.json)")
        self.config: dict = read_json(cfg_path)
        if "model_type" not in self.config:
            raise InputError(f"{cfg_path}: no model_type")
        self.model_type: str = self.config["model_type"]
        self._files: dict[str, str] = {}
        self.infos: dict[str, TensorInfo] = {}
        self._load_headers()

    def _load_headers(self) -> None:
        index = os.path.join(self.path, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise InputError(f"{index}: not a valid safetensors index") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(self.path, SINGLE)):
            weight_map, files = None, [SINGLE]
        else:
            other = [
                f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth", ".gguf"))
            ]
            hint = f" (found {other[0]}; upcycle reads safetensors only)" if other else ""
            raise InputError(f"{self.path}: no safetensors weights{hint}")
        for name in files:
            fpath = os.path.join(self.path, name)
            if not os.path.isfile(fpath):
                raise InputError(f"{fpath}: shard listed in the index is missing")
            infos, _ = read_header(fpath)
            for key, info in infos.items():
                if weight_map is not None and weight_map.get(key) != name:
                    continue
                self.infos[key] = info
                self._files[key] = fpath
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self.infos]
            if missing:
                raise InputError(
                    f"{self.path}: tensor {missing[0]} listed in the index is in no shard"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def keys(self) -> list[str]:
        return list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def get(self, name: str, dtype: str | None = None) -> np.ndarray:
        """The tensor as an array of its storage dtype, or cast to `dtype` (F32, BF16, ...)."""
        if name not in self.infos:
            raise InputError(f"{self.path}: tensor {name} is missing")
        info = self.infos[name]
        a = read_tensor(self._files[name], info)
        return a if dtype is None else cast(a, info.dtype, dtype)

    def get_rows(self, name: str, rows) -> np.ndarray:
        """Rows `rows` (sorted, unique indices into the first dimension) of a tensor, in its
        storage dtype, without reading the rest (`read_rows`)."""
        if name not in self.infos:
            raise InputError(f"{self.path}: tensor {name} is missing")
        return read_rows(self._files[name], self.infos[name], rows)

    def get_torch(self, name: str, dtype=None):
        """The tensor as a torch tensor (optionally cast to a torch dtype)."""
        from upcycle.io.arrays import to_torch

        t = to_torch(self.get(name), self.infos[name].dtype)
        return t if dtype is None else t.to(dtype)

    @property
    def dtype(self) -> str:
        """The safetensors dtype name of most floating-point parameters."""
        count: dict[str, int] = {}
        for info in self.infos.values():
            if info.dtype in FLOATS:
                count[info.dtype] = count.get(info.dtype, 0) + info.nbytes
        return max(count, key=count.get) if count else "F32"

    def num_params(self) -> int:
        total = 0
        for info in self.infos.values():
            n = 1
            for s in info.shape:
                n *= s
            total += n
        return total
