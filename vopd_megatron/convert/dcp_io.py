"""Stream tensors into and out of a megatron-core `torch_dist` checkpoint, one chunk at a time.

Writing. megatron-core's own save needs every tensor of the state dict in
memory. Instead, torch.distributed.checkpoint (which `torch_dist` is) is given
a state dict of `LazyTensor`s: each knows its global shape, dtype and chunks
(one per layer for stacked tensors) and a function that makes a chunk.
Planning uses only that metadata; the file writer (one thread, no CUDA: torch's
serial loader) asks `LazySavePlanner.resolve_data` for one chunk at a time, so
the peak is about one layer's tensors. The directory then gets megatron-core's
`metadata.json` and a `common.pt` (the legacy common-state file, which every
megatron-core from 0.16 to 0.19 reads), and loads with `dist_checkpointing.load`
at any TP/PP like a checkpoint megatron-core saved.

Reading. `ChunkReader` reads the torch_dist metadata and then only the stored
chunks that overlap the requested slice (one layer of a stacked tensor), so a
checkpoint saved at any layout (per-TP-rank chunks included) is read back as
global tensors without loading the whole checkpoint. Objects (megatron-core's
`ShardedObject`s, stored as pickled bytes) are read as their raw bytes and can
be written back unchanged (`RawBytes`), without unpickling them.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


@dataclass
class LazyTensor:
    """A global tensor stored as chunks made on demand: `make(offsets) -> tensor of that chunk's shape`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]  # (offsets, sizes)
    make: Callable[[tuple[int, ...]], torch.Tensor]

    @classmethod
    def stacked(cls, num_layers: int, layer_shape, dtype, make_layer) -> "LazyTensor":
        """[L, *layer_shape] with one chunk per layer: `make_layer(i) -> [*layer_shape]`."""
        zeros = (0,) * len(layer_shape)
        chunks = [((i, *zeros), (1, *layer_shape)) for i in range(num_layers)]
        return cls((num_layers, *layer_shape), dtype, chunks, lambda off: make_layer(off[0]).unsqueeze(0))

    @classmethod
    def whole(cls, shape, dtype, make) -> "LazyTensor":
        return cls(tuple(shape), dtype, [((0,) * len(shape), tuple(shape))], lambda off: make())

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:  # torch DCP's checkpointable hook
        props = TensorProperties(dtype=self.dtype)
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(off)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size)),
                    properties=props, size=torch.Size(self.shape),
                ),
            )
            for off, size in self.chunks
        ]


@dataclass
class RawBytes:
    """An object's stored bytes, written back as they are (not pickled again)."""

    data: bytes


class LazySavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner that makes `LazyTensor` chunks only when the writer asks for them."""

    def __init__(self, on_chunk=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.on_chunk = on_chunk  # called once per LazyTensor chunk made (progress)

    def resolve_data(self, write_item: WriteItem):
        obj = self.state_dict[write_item.index.fqn]
        if isinstance(obj, RawBytes):
            return io.BytesIO(obj.data)
        if not isinstance(obj, LazyTensor):
            return super().resolve_data(write_item)
        chunk = obj.make(tuple(write_item.index.offset))
        expected = tuple(write_item.tensor_data.chunk.sizes)
        if tuple(chunk.shape) != expected or chunk.dtype != obj.dtype:
            raise ValueError(f"{write_item.index.fqn}: made a {tuple(chunk.shape)} {chunk.dtype} chunk, "
                             f"expected {expected} {obj.dtype}")
        if self.on_chunk is not None:
            self.on_chunk()
        return chunk.contiguous()


def write_torch_dist(path: str, tensors: dict[str, LazyTensor], objects: dict[str, object], common: dict,
                     on_chunk=None) -> None:
    """A megatron-core torch_dist checkpoint directory at `path` (which must exist and be empty).

    `tensors`: ShardedTensor key -> LazyTensor (global view); `objects`: ShardedObject unique
    key (`name/shard_<offsets>_<shape>`) -> value (pickled on write) or `RawBytes` (written as
    they are); `common`: the common state dict; `on_chunk()`: called as each tensor chunk is
    made for writing (progress).
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    state = {**tensors, **objects}
    writer = FileSystemWriter(path, single_file_per_rank=True, thread_count=1, sync_files=True)
    dcp_save(state, storage_writer=writer, planner=LazySavePlanner(on_chunk), no_dist=True)
    torch.save(common, os.path.join(path, "common.pt"))
    save_config(CheckpointingConfig("torch_dist", 1), path)


class ChunkReader:
    """Global tensors (or one layer of a stacked tensor) from a torch_dist checkpoint, chunk by chunk."""

    def __init__(self, path: str):
        self.path = path
        self.metadata = FileSystemReader(path).read_metadata()

    def keys(self) -> list[str]:
        """Every stored key: tensors and objects."""
        return list(self.metadata.state_dict_metadata)

    def is_tensor(self, key: str) -> bool:
        return hasattr(self.metadata.state_dict_metadata[key], "chunks")

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor_meta(key).properties.dtype

    def read_bytes(self, key: str) -> bytes:
        """The stored bytes of the object `key` (a ShardedObject's unique key), not unpickled."""
        if key not in self.metadata.state_dict_metadata or self.is_tensor(key):
            raise KeyError(f"{self.path} has no object {key!r}")
        return self._read_item(key, MetadataIndex(key))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor_meta(key).size)

    def _tensor_meta(self, key):
        meta = self.metadata.state_dict_metadata.get(key)
        if meta is None or not hasattr(meta, "chunks"):
            raise KeyError(f"{self.path} has no tensor {key!r}")
        return meta

    def _read_item(self, key: str, index: MetadataIndex) -> bytes:
        """The stored bytes of one item, naming a missing or truncated file."""
        from .hf_config import ConversionError

        info = self.metadata.storage_data[index]
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(f"{key}: chunk stored with transforms {info.transform_descriptors}, not supported")
        file = os.path.join(self.path, info.relative_path)
        try:
            with open(file, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except FileNotFoundError:
            raise ConversionError(f"{file} is missing (a damaged checkpoint: {key} is stored there)") from None
        if len(data) != info.length:
            raise ConversionError(f"{file} is truncated: {key} needs bytes {info.offset}..{info.offset + info.length},"
                                  f" the file ends at {info.offset + len(data)}")
        return data

    def _read_chunk(self, key: str, offsets) -> torch.Tensor:
        from .hf_config import ConversionError

        data = self._read_item(key, MetadataIndex(key, torch.Size(offsets)))
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means damaged bytes
            file = os.path.join(self.path, self.metadata.storage_data[MetadataIndex(key, torch.Size(offsets))]
                                .relative_path)
            raise ConversionError(f"{file}: {key} cannot be read (damaged?): {type(exc).__name__}") from None

    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        """The global tensor `key`, or its slice `[layer]` along the leading (stacked layer) axis."""
        meta = self._tensor_meta(key)
        size = tuple(meta.size)
        lo, hi = (0, size[0]) if layer is None else (layer, layer + 1)
        out = torch.empty((hi - lo, *size[1:]), dtype=meta.properties.dtype)
        covered = 0
        for chunk in meta.chunks:
            off, sz = tuple(chunk.offsets), tuple(chunk.sizes)
            a, b = max(lo, off[0]), min(hi, off[0] + sz[0])
            if a >= b:
                continue
            part = self._read_chunk(key, off).reshape(sz)[a - off[0] : b - off[0]]
            index = (slice(a - lo, b - lo),) + tuple(slice(o, o + s) for o, s in zip(off[1:], sz[1:]))
            out[index] = part
            covered += part.numel()
        if covered != out.numel():  # torch_dist stores each element once (replicas deduplicated)
            raise ValueError(f"{self.path}: chunks of {key} cover {covered} of {out.numel()} elements")
        return out if layer is None else out[0]
