"""Lazy reads of a Hugging Face checkpoint directory and size-capped safetensors writes.

`HFCheckpoint` checks up front that `config.json` parses, that every shard the
index names exists and that every safetensors header parses (a truncated or
corrupt file fails here, naming it, not halfway through a conversion). Tensors
are then read one at a time with `safe_open`, opened per read so no file stays
memory-mapped while the rest of the model streams through.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .hf_config import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFCheckpoint:
    """config + name -> file map of an HF directory; `get(name)` reads one tensor."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise ConversionError(f"--hf-dir {path} does not exist")
        if not os.path.isdir(path):
            raise ConversionError(f"--hf-dir {path} is a file; expected a Hugging Face model directory")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConversionError(f"{path}: no config.json (not a Hugging Face model directory)")
        self.config = _read_json(cfg_path)
        if not isinstance(self.config, dict):
            raise ConversionError(f"{cfg_path}: expected a JSON object, got {type(self.config).__name__}")
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX)
        if os.path.isfile(index):
            weight_map = _read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index}: no 'weight_map' of tensor name -> file name")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(self.path, SINGLE)):
            files, weight_map = [SINGLE], None
        else:
            raise ConversionError(f"{self.path}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")
        missing = [f for f in files if not os.path.isfile(os.path.join(self.path, f))]
        if missing:
            raise ConversionError(f"{self.path}: missing safetensors shard(s) named in {INDEX}: {missing}")
        names = {}
        for file in files:
            for name in self._header_names(file):
                names[name] = file
        if weight_map is not None:
            absent = sorted(n for n, f in weight_map.items() if names.get(n) != f)
            if absent:
                raise ConversionError(f"{self.path}: tensors listed in {INDEX} are not in their shard: {absent[:5]}")
        return names

    def _header_names(self, file: str) -> list[str]:
        path = os.path.join(self.path, file)
        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConversionError(f"{path}: cannot read the safetensors header (corrupt or truncated?): {exc}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        with safe_open(os.path.join(self.path, self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) from the header, without reading data."""
        file = os.path.join(self.path, self.weight_map[name])
        with safe_open(file, framework="pt") as f:
            sl = f.get_slice(name)
            kind = sl.get_dtype()
            if kind not in _DTYPES:
                raise ConversionError(f"{file}: tensor {name!r} is stored as {kind}; only floating-point weights "
                                      f"({', '.join(_DTYPES)}) convert (a quantized checkpoint?)")
            return tuple(sl.get_shape()), _DTYPES[kind]


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None


class ShardedSafetensorsWriter:
    """Writes tensors in order into shards of at most `max_shard_bytes`, then the HF index."""

    def __init__(self, path: str, max_shard_bytes: int):
        self.path, self.max = path, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.files, self.weight_map, self.total = 0, [], {}, 0
        os.makedirs(path, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() != size:  # a view (vocab slice, fused split): own storage
            tensor = tensor.clone()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        name = f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, os.path.join(self.path, name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, rename to `model-0000i-of-0000n.safetensors` (or `model.safetensors`), write the index."""
        if self.pending:
            self._flush()
        n = len(self.files)
        final_names = []
        for i, (tmp, names) in enumerate(self.files):
            final = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.path, tmp), os.path.join(self.path, final))
            self.weight_map.update({k: final for k in names})
            final_names.append(final)
        if n > 1:
            with open(os.path.join(self.path, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, f, indent=2)
        return final_names
