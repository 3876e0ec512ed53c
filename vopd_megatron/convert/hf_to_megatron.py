"""Hugging Face directory -> vopd_megatron torch_dist checkpoint (+ model flags YAML), streaming.

    vopd-convert hf-to-megatron --hf-dir Llama-3.1-8B --out ckpt/llama8b [--dtype bf16]

The output is `out/iter_0000000/` with `out/latest_checkpointed_iteration.txt`,
exactly what `vopd_megatron.training.checkpoint` writes (completion marker,
`vopd` common state), so `--teacher-load out` loads it at any TP/PP. The
model flags that match it go to `out/model_flags.yaml` (a `--config` or
`--teacher-model-config`); the source `config.json` is kept in the
checkpoint's common state so Megatron -> HF restores it verbatim.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch
import yaml

from ..config.schema import ModelArgs
from ..training import checkpoint as ckpt
from . import mappings as mp
from .dcp_io import LazyTensor, write_torch_dist
from .hf_config import ConversionError, check_layout, hf_config_to_model_args, model_flags
from .hf_io import HFCheckpoint

FLAGS_FILE = "model_flags.yaml"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _lazy_tensors(hf: HFCheckpoint, m: ModelArgs, dtype) -> dict[str, LazyTensor]:
    """Megatron checkpoint key -> LazyTensor, reading HF tensors only when a chunk is written."""
    def cast(t):
        return t if dtype is None else t.to(dtype)

    def shape_of(name):
        return hf.meta(name)[0]

    def whole(hf_name, pad=False):
        shape = list(shape_of(hf_name))
        if pad:
            shape[0] = m.padded_vocab_size(1)
        make = (lambda: mp.pad_vocab(cast(hf.get(hf_name)), shape[0])) if pad else (lambda: cast(hf.get(hf_name)))
        return LazyTensor.whole(shape, dt, make)

    dt = dtype or hf.meta(mp.EMBEDDING[1])[1]
    if hf.meta(mp.EMBEDDING[1])[0][0] != m.vocab_size:
        raise ConversionError(f"{mp.EMBEDDING[1]} has {shape_of(mp.EMBEDDING[1])[0]} rows, config vocab_size "
                              f"is {m.vocab_size}")
    out = {mp.EMBEDDING[0]: whole(mp.EMBEDDING[1], pad=True), mp.FINAL_NORM[0]: whole(mp.FINAL_NORM[1])}
    if m.untie_embeddings_and_output_weights:
        out[mp.OUTPUT[0]] = whole(mp.OUTPUT[1], pad=True)
    for lt in mp.layer_tensors(m):
        names = [mp.hf_layer_name(0, n) for n in lt.hf]
        for name in names:
            if name not in hf:
                raise ConversionError(f"{hf.path}: tensor {name!r} not found (does config.json match the weights?)")
        layer_shape = lt.to_megatron(*(torch.empty(shape_of(n), device="meta") for n in names), m).shape

        def make_layer(i, lt=lt):
            return cast(lt.to_megatron(*(hf.get(mp.hf_layer_name(i, n)) for n in lt.hf), m))

        out[mp.LAYER + lt.key] = LazyTensor.stacked(m.num_layers, tuple(layer_shape), dt, make_layer)
    return out


def weights_only_info() -> dict:
    """The `vopd` common state of a weights-only checkpoint (iteration 0, no optimizer, TP1 view),
    as `load_model_weights` and `--load ... --finetune` read it."""
    layout = dict(world_size=1, model_chunks=1, tp=1, pp=1, cp=1, dp=1)
    return dict(format_version=ckpt.FORMAT_VERSION, iteration=0, layout=layout, has_optimizer=False,
                distrib_optim_sharding_type=None, base_seed=0, state={"iteration": 0, "consumed_samples": 0})


def _common_state(hf_config: dict, m: ModelArgs) -> dict:
    """The `vopd` common state `load_checkpoint`/`load_model_weights` read, plus the HF origin."""
    return {"vopd": weights_only_info(), "vopd_convert": dict(hf_config=hf_config, model_flags=model_flags(m))}


def convert_hf_to_megatron(hf_dir: str, out_dir: str, *, make_vocab_size_divisible_by: int = 128,
                           dtype: str | None = None, check_tp: int = 1, check_pp: int = 1) -> dict:
    """Convert; returns the model flags written to `out_dir/model_flags.yaml`."""
    hf = HFCheckpoint(hf_dir)
    m = hf_config_to_model_args(hf.config, make_vocab_size_divisible_by)
    check_layout(m, check_tp, check_pp)
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    tensors = _lazy_tensors(hf, m, _DTYPES.get(dtype))
    objects = {
        f"{mp.LAYER}{name}._extra_state/shard_{i}_{m.num_layers}": [None]  # megatron stores [obj.data]
        for name in mp.EXTRA_STATE_KEYS for i in range(m.num_layers)
    }
    flags = model_flags(m)
    write_weights_checkpoint(out_dir, tensors, objects, _common_state(hf.config, m),
                             {"converted_from": os.path.abspath(hf_dir)}, flags,
                             f"Megatron model flags of {os.path.abspath(hf_dir)} (vopd-convert)")
    return flags


def write_weights_checkpoint(out_dir: str, tensors: dict, objects: dict, common: dict, marker: dict,
                             flags: dict, flags_title: str) -> None:
    """A weights-only checkpoint `out_dir/iter_0000000` published the way `vopd-train` publishes one
    (staging directory, completion marker, then the tracker), and `out_dir/model_flags.yaml`."""
    final = ckpt.checkpoint_dir(out_dir, 0)
    staging = final + ".incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    write_torch_dist(staging, tensors, objects, common)
    with open(os.path.join(staging, ckpt.COMPLETE_MARKER), "w") as f:
        json.dump(dict(iteration=0, format_version=ckpt.FORMAT_VERSION, saved_at=time.time(), **marker), f)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(staging, final)
    with open(os.path.join(out_dir, ckpt.TRACKER_FILENAME), "w") as f:
        f.write("0\n")
    with open(os.path.join(out_dir, FLAGS_FILE), "w") as f:
        f.write(f"# {flags_title}; use as --config or --teacher-model-config\n")
        yaml.safe_dump(flags, f, sort_keys=False)
