"""Hugging Face directory -> vopd_megatron torch_dist checkpoint (+ model flags YAML), streaming.

    vopd-convert hf-to-megatron --hf-dir Llama-3.1-8B --out ckpt/llama8b [--dtype bf16]

The output is a new directory (`outdir.staged_output`: a non-empty `--out` is
refused unless `overwrite`, and a failed conversion leaves nothing behind):
`out/iter_0000000/` with `out/latest_checkpointed_iteration.txt`,
exactly what `vopd_megatron.training.checkpoint` writes (completion marker,
`vopd` common state), so `--teacher-load out` loads it at any TP/PP. The
model flags that match it go to `out/model_flags.yaml` (a `--config` or
`--teacher-model-config`); the source `config.json` is kept in the
checkpoint's common state so Megatron -> HF restores it verbatim.
"""
from __future__ import annotations

import json
import os
import time

import torch
import yaml

from ..config.schema import ModelArgs
from ..progress import Progress
from ..training import checkpoint as ckpt
from ..training.model_flags import model_flags
from . import mappings as mp
from .dcp_io import LazyTensor, write_torch_dist
from .hf_config import FAMILIES, ConversionError, check_layout, hf_config_to_model_args
from .hf_io import HFCheckpoint
from .outdir import staged_output

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
    out = {mp.EMBEDDING[0]: whole(mp.EMBEDDING[1], pad=True), mp.FINAL_NORM[0]: whole(mp.FINAL_NORM[1])}
    if m.untie_embeddings_and_output_weights:
        out[mp.OUTPUT[0]] = whole(mp.OUTPUT[1], pad=True)
    for lt in mp.layer_tensors(m):
        names = [mp.hf_layer_name(0, n) for n in lt.hf]
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
    """The `vopd` common state `load_checkpoint`/`load_model_weights` read, the HF origin, and the keys
    Megatron-LM reads (`megatron_common`)."""
    return {**megatron_common(m), "vopd": weights_only_info(),
            "vopd_convert": dict(hf_config=hf_config, model_flags=model_flags(m))}


def megatron_common(m: ModelArgs) -> dict:
    """The keys Megatron-LM's load_checkpoint reads of a weights-only checkpoint of model `m`:
    `args` with the model shape, `iteration` 0 (load it there with --finetune), the version."""
    from ..training import megatron_format as mf

    layout = dict(world_size=1, model_chunks=1, tp=1, pp=1, cp=1, dp=1)
    args = mf.checkpoint_args(mf.namespace_from_model_args(m), layout, iteration=0, consumed_samples=0,
                              has_optimizer=False, distopt_sharding=None)
    return {"args": args, "iteration": 0, "checkpoint_version": mf.CHECKPOINT_VERSION}


#: config.json fields that must be positive integers (the optional ones may be absent or null).
_POSITIVE_INTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
                  "num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def model_args_of(hf: HFCheckpoint, make_vocab_size_divisible_by: int = 128) -> ModelArgs:
    """The Megatron model of an HF directory, every refusal naming its config.json."""
    cfg_path = os.path.join(hf.path, "config.json")
    for key in _POSITIVE_INTS if hf.config.get("model_type") in FAMILIES else ():  # else: unsupported, below
        value = hf.config.get(key, 1 if key in _OPTIONAL else None)
        if value is None and key in _OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{cfg_path}: " + (f"missing field {key!r}" if key not in hf.config else
                                                     f"field {key!r} is {value!r}: the wrong type or value "
                                                     "(a positive integer)"))
    try:
        return hf_config_to_model_args(hf.config, make_vocab_size_divisible_by)
    except ConversionError as exc:
        raise ConversionError(f"{cfg_path}: {exc}") from None
    except KeyError as exc:
        raise ConversionError(f"{cfg_path}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConversionError(f"{cfg_path}: a field has the wrong type or value ({exc})") from None


def check_tensors(hf: HFCheckpoint, m: ModelArgs) -> None:
    """Every tensor the model needs is in the checkpoint with the shape config.json
    implies, and no layer beyond num_hidden_layers is: checked from the headers,
    before anything is written (a mismatch found mid-write would fail inside
    torch's checkpoint writer)."""
    expected = mp.hf_shapes(m)
    for name, shape in expected.items():
        if name not in hf:
            raise ConversionError(f"{hf.path}: tensor {name!r} not found (does config.json match the weights?)")
        found = hf.meta(name)[0]
        if found != shape:
            raise ConversionError(f"{hf.path}/{hf.weight_map[name]}: tensor {name!r} has shape {found}, "
                                  f"config.json implies {shape}")
    tied_head = mp.OUTPUT[1] if not m.untie_embeddings_and_output_weights else None
    extra = sorted(n for n in hf.weight_map if n not in expected and n != tied_head
                   and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConversionError(f"{hf.path}: {len(extra)} tensor(s) config.json does not account for, e.g. "
                              f"{extra[:3]} (num_hidden_layers {m.num_layers}; a different architecture?)")


def convert_hf_to_megatron(hf_dir: str, out_dir: str, *, make_vocab_size_divisible_by: int = 128,
                           dtype: str | None = None, check_tp: int = 1, check_pp: int = 1,
                           overwrite: bool = False, show_progress: bool = False) -> dict:
    """Convert; returns the model flags written to `out_dir/model_flags.yaml`.
    `out_dir` must be missing or empty unless `overwrite` (outdir.py). show_progress:
    a progress display over the tensor chunks written (the CLI's)."""
    hf = HFCheckpoint(hf_dir)
    m = model_args_of(hf, make_vocab_size_divisible_by)
    check_layout(m, check_tp, check_pp)
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    check_tensors(hf, m)
    tensors = _lazy_tensors(hf, m, _DTYPES.get(dtype))
    objects = {
        f"{mp.LAYER}{name}._extra_state/shard_{i}_{m.num_layers}": [None]  # megatron stores [obj.data]
        for name in mp.EXTRA_STATE_KEYS for i in range(m.num_layers)
    }
    flags = model_flags(m)
    write_weights_checkpoint(out_dir, tensors, objects, _common_state(hf.config, m),
                             {"converted_from": os.path.abspath(hf_dir)}, flags,
                             f"Megatron model flags of {os.path.abspath(hf_dir)} (vopd-convert)",
                             source=hf_dir, overwrite=overwrite, show_progress=show_progress,
                             label="[vopd-convert] hf-to-megatron")
    return flags


def write_weights_checkpoint(out_dir: str, tensors: dict, objects: dict, common: dict, marker: dict,
                             flags: dict, flags_title: str, *, source: str, overwrite: bool = False,
                             show_progress: bool = False, label: str = "[vopd-convert]", check=None):
    """A weights-only checkpoint `out_dir/iter_0000000` (completion marker, tracker) and
    `out_dir/model_flags.yaml`, built in a staging directory and moved in place only when
    complete (outdir.staged_output: a non-empty `out_dir` is refused unless `overwrite`).
    check(iteration_dir), if given, runs on the staged output before it is published; its
    result is returned (a failed check leaves nothing behind)."""
    result = None
    with staged_output(out_dir, source, overwrite) as staging:
        final = ckpt.checkpoint_dir(staging, 0)
        os.makedirs(final)
        chunks = sum(len(t.chunks) for t in tensors.values())
        with Progress(chunks, label, unit="tensor", enabled=show_progress) as progress:
            write_torch_dist(final, tensors, objects, common, on_chunk=progress.update)
        with open(os.path.join(final, ckpt.COMPLETE_MARKER), "w") as f:
            json.dump(dict(iteration=0, format_version=ckpt.FORMAT_VERSION, saved_at=time.time(), **marker), f)
        with open(os.path.join(staging, ckpt.TRACKER_FILENAME), "w") as f:
            f.write("0\n")
        with open(os.path.join(staging, FLAGS_FILE), "w") as f:
            f.write(f"# {flags_title}; use as --config or --teacher-model-config\n")
            yaml.safe_dump(flags, f, sort_keys=False)
        if check is not None:
            result = check(final)
    return result
