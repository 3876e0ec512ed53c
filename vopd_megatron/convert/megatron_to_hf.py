"""vopd_megatron / megatron-core torch_dist checkpoint -> Hugging Face `config.json` + safetensors, streaming.

    vopd-convert megatron-to-hf --load ckpt/llama8b --out hf/llama8b [--config model.yaml]

Reads the newest intact checkpoint under `--load` (a converted one, or one
`vopd-train` or Megatron-LM saved at any TP/PP: stored chunks are reassembled
per layer; a damaged newest iteration is skipped with a warning naming the
file). The HF config is the one the checkpoint was converted from when it has
one (restored verbatim), else it is derived from the model flags (`--config`,
Megatron-LM flag names), else from the Megatron-LM `args` the checkpoint
records; the family comes from the flags or `--model-type`. Padded vocabulary
rows are dropped. The output is a new directory
(`outdir.staged_output`: a non-empty `--out` is refused unless `overwrite`; a
failed conversion leaves nothing behind).
"""
from __future__ import annotations

import json
import os
import warnings

from ..config.schema import ModelArgs
from ..training.checkpoint_files import find_latest, short_error
from ..training.model_flags import flags_to_model_args, model_flags_from_args
from ..progress import Progress
from . import mappings as mp
from .dcp_io import ChunkReader
from .hf_config import ConversionError, hf_config_to_model_args, model_args_to_hf_config
from .hf_io import ShardedSafetensorsWriter
from .outdir import staged_output


def _resolve_model(common: dict, model_args: ModelArgs | None, model_type: str | None) -> tuple[ModelArgs, dict]:
    origin = common.get("vopd_convert")
    if origin is not None and model_args is None:
        cfg = origin["hf_config"]
        return flags_to_model_args(origin["model_flags"]), cfg
    if model_args is None and common.get("args") is not None:  # a Megatron-LM (or vopd-train) checkpoint
        model_args = flags_to_model_args(model_flags_from_args(common["args"]))
    if model_args is None:
        raise ConversionError("this checkpoint was not converted from Hugging Face: pass the model's flags "
                              "(--config model.yaml) so its shape is known")
    cfg = model_args_to_hf_config(model_args, model_type)
    hf_config_to_model_args(cfg)  # the derived config must itself be convertible
    return model_args, cfg


def open_checkpoint(load_dir: str, doing: str = "converting"):
    """(path of the newest complete iteration, its common state, a ChunkReader), naming what is wrong;
    a damaged newer iteration is skipped with a warning ("...; <doing> iteration N")."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    if not os.path.isdir(load_dir):
        raise ConversionError(f"--load {load_dir} " + ("is a file; expected a checkpoint directory"
                                                        if os.path.exists(load_dir) else "does not exist"))
    found = find_latest(load_dir)  # the newest intact iteration; damaged newer ones are named
    if found.path is None:
        detail = "; ".join(found.notes)
        raise ConversionError(f"--load {load_dir} holds no complete torch_dist checkpoint"
                              + (f" ({detail})" if detail else ""))
    for note in found.notes:
        warnings.warn(f"{load_dir}: {note}; {doing} iteration {found.iteration}", stacklevel=3)
    path, common = found.path, found.common
    if common is None:
        try:
            common = load_common_state_dict(path)
        except Exception as exc:  # noqa: BLE001 - megatron wraps unpickling and I/O errors in several types
            raise ConversionError(f"{path}: cannot read the checkpoint's common state ({type(exc).__name__}: "
                                  f"{short_error(exc)})") from None
    try:
        reader = ChunkReader(path)
    except Exception as exc:  # noqa: BLE001 - torch DCP raises bare errors for a damaged .metadata
        raise ConversionError(f"{path}/.metadata: cannot read the torch_dist metadata ({type(exc).__name__}: "
                              f"{short_error(exc)})") from None
    return path, common, reader


def _check_shapes(path: str, reader: ChunkReader, m: ModelArgs) -> None:
    """The stored tensors have the model's shape (layers, hidden size, vocabulary)."""
    key = mp.LAYER + mp.layer_tensors(m)[0].key
    try:
        layers = reader.shape(key)[0]
        embedding = reader.shape(mp.EMBEDDING[0])
    except KeyError as exc:
        raise ConversionError(f"{exc.args[0]} (not a GPT checkpoint of this layout?)") from None
    if layers != m.num_layers:
        raise ConversionError(f"{path} has {layers} layers, the flags say {m.num_layers}")
    if embedding[1] != m.hidden_size or embedding[0] < m.vocab_size:
        raise ConversionError(f"{path}: embedding is {tuple(embedding)}, the flags say hidden size "
                              f"{m.hidden_size} and vocabulary {m.vocab_size}")


def convert_megatron_to_hf(load_dir: str, out_dir: str, *, model_args: ModelArgs | None = None,
                           model_type: str | None = None, max_shard_bytes: int = 5 * 2**30,
                           overwrite: bool = False, show_progress: bool = False) -> list[str]:
    """Convert the newest complete checkpoint under `load_dir`; returns the safetensors files written.
    `out_dir` must be missing or empty unless `overwrite` (outdir.py). show_progress: a
    progress display over the layers written (the CLI's)."""
    path, common, reader = open_checkpoint(load_dir)
    m, cfg = _resolve_model(common, model_args, model_type)
    _check_shapes(path, reader, m)
    # Progress over the layers, plus one for the embedding and one for the final norm and output.
    progress = Progress(m.num_layers + 2, "[vopd-convert] megatron-to-hf", unit="layer", enabled=show_progress)
    with staged_output(out_dir, load_dir, overwrite) as staging, progress:
        writer = ShardedSafetensorsWriter(staging, max_shard_bytes)
        writer.add(mp.EMBEDDING[1], reader.read(mp.EMBEDDING[0])[: m.vocab_size])
        progress.update(1)
        for i in range(m.num_layers):
            for lt in mp.layer_tensors(m):
                parts = lt.to_hf(reader.read(mp.LAYER + lt.key, layer=i), m)
                for name, t in zip(lt.hf, parts):
                    writer.add(mp.hf_layer_name(i, name), t)
            progress.update(1)
        writer.add(mp.FINAL_NORM[1], reader.read(mp.FINAL_NORM[0]))
        if m.untie_embeddings_and_output_weights:
            writer.add(mp.OUTPUT[1], reader.read(mp.OUTPUT[0])[: m.vocab_size])
        progress.update(1)
        files = writer.close()
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    return files
