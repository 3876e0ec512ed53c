"""Depth pruning of a torch_dist checkpoint: drop transformer layers, renumber the rest, write a new one.

    vopd-convert prune --load ckpt/teacher --out ckpt/student --drop-layers 1-29:2   # every other layer
    vopd-convert prune --load runs/x/checkpoints --out ckpt/x20 --keep-layers 0-15,28,29 --config model.yaml

The compression step of Minitron-style recipes (prune, then distil back from
the unpruned model). It works on the checkpoint files, not on a model: any
checkpoint `vopd-convert` or `vopd-train` wrote, saved at any TP/PP (the
per-layer slices are read from whatever chunks the save produced,
`dcp_io.ChunkReader`), and it never holds more than one layer's tensors plus
the largest non-layer tensor (the embedding): each kept layer is read when
the writer asks for it (`dcp_io.LazyTensor`).

What is written is a weights-only checkpoint in the global (TP1·PP1) view,
loadable at any layout with `--load DIR --finetune` (a student) or
`--teacher-load DIR`: every model tensor, the stacked `decoder.layers.*`
ones restricted to the kept layers (in their original order, renumbered
0..n-1), the per-layer objects (`_extra_state`) of the kept layers copied
byte for byte, and everything else (embedding, final norm, output layer)
unchanged. Optimizer state and RNG states are dropped: they belong to the
unpruned model. `model_flags.yaml` gets the new `--num-layers`; a checkpoint
converted from Hugging Face keeps its `config.json` (with the new
`num_hidden_layers`), so `megatron-to-hf` turns the pruned model into an HF
directory.

Parity check: after writing, every tensor and object of the new checkpoint is
read back and compared, bit for bit, with the source's kept layer it came
from (streamed the same way). A model built from the pruned checkpoint then
computes exactly what the source model computes with those layers skipped;
tests/test_smollm2.py checks that against `transformers` on SmolLM2.
"""
from __future__ import annotations

import os
import re

from ..training.model_flags import flags_to_model_args, model_flags
from . import mappings as mp
from .dcp_io import ChunkReader, LazyTensor, RawBytes
from .hf_config import ConversionError
from .hf_to_megatron import FLAGS_FILE, megatron_common, weights_only_info, write_weights_checkpoint
from .megatron_to_hf import open_checkpoint

#: Stored keys that are not model state: the optimizer's tensors and objects, vopd-train's and
#: Megatron-LM's RNG states.
NON_MODEL_PREFIXES = ("optimizer.", "vopd.rng_state", "rng_state")
_LAYER_OBJECT = re.compile(r"^(decoder\.layers\.[^/]+)/shard_(\d+)((?:\.\d+)*)_(\d+)((?:\.\d+)*)$")


def parse_layers(spec: str, num_layers: int, flag: str = "--drop-layers") -> list[int]:
    """Sorted 0-based layer indices from `1,3,20-25,1-29:2` (ranges inclusive, optional step)."""
    out = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not m:
            raise ConversionError(f"{flag} {spec!r}: cannot read {part!r} (expected i, a-b or a-b:step)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        step = int(m.group(3) or 1)
        if hi < lo or step < 1:
            raise ConversionError(f"{flag} {spec!r}: {part!r} is an empty range")
        if hi >= num_layers:
            raise ConversionError(f"{flag} {spec!r}: layer {hi} does not exist (the checkpoint has layers "
                                  f"0..{num_layers - 1})")
        out.update(range(lo, hi + 1, step))
    if not out:
        raise ConversionError(f"{flag} {spec!r} names no layer")
    return sorted(out)


def kept_layers(num_layers: int, drop: str | None = None, keep: str | None = None) -> list[int]:
    """The layers that stay, from exactly one of a drop or a keep spec; at least one stays, one goes."""
    if (drop is None) == (keep is None):
        raise ConversionError("give exactly one of --drop-layers and --keep-layers")
    if keep is not None:
        kept = parse_layers(keep, num_layers, "--keep-layers")
    else:
        dropped = set(parse_layers(drop, num_layers, "--drop-layers"))
        kept = [i for i in range(num_layers) if i not in dropped]
    if not kept:
        raise ConversionError(f"pruning would remove all {num_layers} layers")
    if len(kept) == num_layers:
        raise ConversionError(f"pruning keeps all {num_layers} layers: nothing to do")
    return kept


class _Plan:
    """What the source checkpoint holds, sorted into stacked layer tensors, other tensors and objects."""

    def __init__(self, reader: ChunkReader):
        model_keys = [k for k in reader.keys() if not k.startswith(NON_MODEL_PREFIXES)]
        tensors = [k for k in model_keys if reader.is_tensor(k)]
        self.layer_tensors = [k for k in tensors if k.startswith(mp.LAYER)]
        self.other_tensors = [k for k in tensors if not k.startswith(mp.LAYER)]
        self.objects = [k for k in model_keys if not reader.is_tensor(k)]
        if not self.layer_tensors:
            raise ConversionError(f"{reader.path} has no stacked `{mp.LAYER}*` tensors: not a GPT checkpoint "
                                  "megatron-core wrote")
        depths = {reader.shape(k)[0] for k in self.layer_tensors}
        if len(depths) != 1:
            raise ConversionError(f"{reader.path}: the stacked layer tensors disagree on the layer count {depths}")
        self.num_layers = depths.pop()

    def object_target(self, key: str, kept: list[int]) -> str | None:
        """The pruned checkpoint's key of object `key` (None: it belongs to a dropped layer)."""
        m = _LAYER_OBJECT.match(key)
        if m is None:
            return key
        name, layer, off_rest, depth, shape_rest = m.groups()
        if int(depth) != self.num_layers:
            raise ConversionError(f"object {key}: global shape {depth} is not the {self.num_layers} layers")
        if int(layer) not in kept:
            return None
        return f"{name}/shard_{kept.index(int(layer))}{off_rest}_{len(kept)}{shape_rest}"


def _flags(common: dict, num_layers: int, kept: list[int], model_args) -> tuple[dict, dict]:
    """(model flags of the pruned model, common-state entries beyond `vopd`)."""
    extra = {}
    origin = common.get("vopd_convert")
    if model_args is not None:
        flags = model_flags(model_args)
    elif origin is not None:
        flags = dict(origin["model_flags"])
    else:
        flags = {"num-layers": num_layers}  # only the depth is known: an override on the source's flags
    if flags["num-layers"] != num_layers:
        raise ConversionError(f"the model flags say {flags['num-layers']} layers, the checkpoint has {num_layers}")
    flags["num-layers"] = len(kept)
    if origin is not None:
        hf_config = dict(origin["hf_config"], num_hidden_layers=len(kept))
        if isinstance(hf_config.get("layer_types"), list):  # per-layer attention kinds follow their layers
            hf_config["layer_types"] = [hf_config["layer_types"][i] for i in kept]
        extra["vopd_convert"] = dict(hf_config=hf_config, model_flags=model_flags(flags_to_model_args(flags)))
    return flags, extra


def prune_checkpoint(load_dir: str, out_dir: str, *, drop: str | None = None, keep: str | None = None,
                     model_args=None, check: bool = True, overwrite: bool = False,
                     show_progress: bool = False) -> dict:
    """Write the pruned checkpoint; returns {"kept": [...], "num_layers": n, "flags": {...}, "checked": k}.
    `out_dir` must be missing or empty unless `overwrite`; nothing is published unless the
    parity check (when on) passed."""
    source, common, reader = open_checkpoint(load_dir, doing="pruning")
    plan = _Plan(reader)
    kept = kept_layers(plan.num_layers, drop, keep)
    flags, extra = _flags(common, plan.num_layers, kept, model_args)

    tensors = {}
    for key in plan.layer_tensors:
        shape = reader.shape(key)
        tensors[key] = LazyTensor.stacked(len(kept), shape[1:], reader.dtype(key),
                                          lambda j, key=key: reader.read(key, layer=kept[j]))
    for key in plan.other_tensors:
        tensors[key] = LazyTensor.whole(reader.shape(key), reader.dtype(key), lambda key=key: reader.read(key))
    objects = {}
    for key in plan.objects:
        target = plan.object_target(key, kept)
        if target is not None:
            objects[target] = RawBytes(reader.read_bytes(key))
    # Megatron-LM's keys (args with the pruned shape) when the whole model is known.
    megatron = megatron_common(flags_to_model_args(flags)) if "hidden-size" in flags else {}
    common_out = {**megatron, "vopd": weights_only_info(), **extra,
                  "vopd_prune": dict(source=os.path.abspath(source), source_layers=plan.num_layers, kept=kept)}
    checked = write_weights_checkpoint(
        out_dir, tensors, objects, common_out, {"pruned_from": os.path.abspath(source), "kept_layers": kept},
        flags, f"Megatron model flags of {os.path.abspath(source)} pruned to layers {kept} (vopd-convert prune)",
        source=load_dir, overwrite=overwrite, show_progress=show_progress, label="[vopd-convert] prune",
        check=(lambda pruned: check_pruned(source, pruned, kept)) if check else None)
    return {"kept": kept, "num_layers": plan.num_layers, "flags": flags, "checked": checked or 0}


def check_pruned(source: str, pruned: str, kept: list[int]) -> int:
    """Compare every stored item of `pruned` with the source item it was made from, bit for bit.

    Returns the number of items compared; raises ConversionError naming the first difference."""
    import torch

    src, out = ChunkReader(source), ChunkReader(pruned)
    plan = _Plan(src)
    expected_objects = {plan.object_target(k, kept): k for k in plan.objects}
    expected_objects.pop(None, None)
    expected = set(plan.layer_tensors) | set(plan.other_tensors) | set(expected_objects)
    if set(out.keys()) != expected:
        raise ConversionError(f"pruned checkpoint keys differ: missing {sorted(expected - set(out.keys()))}, "
                              f"extra {sorted(set(out.keys()) - expected)}")
    n = 0
    for key in plan.layer_tensors:
        if out.shape(key) != (len(kept), *src.shape(key)[1:]):
            raise ConversionError(f"{key}: pruned shape {out.shape(key)}")
        for j, i in enumerate(kept):
            a, b = out.read(key, layer=j), src.read(key, layer=i)
            if a.dtype != b.dtype or not torch.equal(a, b):
                raise ConversionError(f"{key}: pruned layer {j} differs from source layer {i}")
            n += 1
    for key in plan.other_tensors:
        if not torch.equal(out.read(key), src.read(key)):
            raise ConversionError(f"{key} differs from the source")
        n += 1
    for target, key in expected_objects.items():
        if out.read_bytes(target) != src.read_bytes(key):
            raise ConversionError(f"object {target} differs from the source's {key}")
        n += 1
    return n


__all__ = ["prune_checkpoint", "check_pruned", "kept_layers", "parse_layers", "FLAGS_FILE"]
