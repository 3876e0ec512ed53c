"""vopd_megatron / megatron-core torch_dist checkpoint -> Hugging Face `config.json` + safetensors, streaming.

    vopd-convert megatron-to-hf --load ckpt/llama8b --out hf/llama8b [--config model.yaml]

Reads the newest complete checkpoint under `--load` (a converted one, or one
`vopd-train` saved at any TP/PP: stored chunks are reassembled per layer).
The HF config is the one the checkpoint was converted from when it has one
(restored verbatim), else it is derived from the model flags (`--config`,
Megatron-LM flag names; family from the flags or `--model-type`). Padded
vocabulary rows are dropped.
"""
from __future__ import annotations

import json
import os

from ..config.schema import ModelArgs
from ..progress import Progress
from ..training import checkpoint as ckpt
from . import mappings as mp
from .dcp_io import ChunkReader
from .hf_config import ConversionError, flags_to_model_args, hf_config_to_model_args, model_args_to_hf_config
from .hf_io import ShardedSafetensorsWriter


def _resolve_model(common: dict, model_args: ModelArgs | None, model_type: str | None) -> tuple[ModelArgs, dict]:
    origin = common.get("vopd_convert")
    if origin is not None and model_args is None:
        cfg = origin["hf_config"]
        return flags_to_model_args(origin["model_flags"]), cfg
    if model_args is None:
        raise ConversionError("this checkpoint was not converted from Hugging Face: pass the model's flags "
                              "(--config model.yaml) so its shape is known")
    cfg = model_args_to_hf_config(model_args, model_type)
    hf_config_to_model_args(cfg)  # the derived config must itself be convertible
    return model_args, cfg


def convert_megatron_to_hf(load_dir: str, out_dir: str, *, model_args: ModelArgs | None = None,
                           model_type: str | None = None, max_shard_bytes: int = 5 * 2**30,
                           show_progress: bool = False) -> list[str]:
    """Convert the newest complete checkpoint under `load_dir`; returns the safetensors files written.
    show_progress: a progress display over the layers written (the CLI's)."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    iteration = ckpt.latest_iteration(load_dir)
    if iteration is None:
        raise ConversionError(f"{load_dir} holds no complete vopd_megatron checkpoint")
    path = ckpt.checkpoint_dir(load_dir, iteration)
    m, cfg = _resolve_model(load_common_state_dict(path), model_args, model_type)
    reader = ChunkReader(path)
    if reader.shape(mp.LAYER + mp.layer_tensors(m)[0].key)[0] != m.num_layers:
        raise ConversionError(f"{path} has {reader.shape(mp.LAYER + mp.layer_tensors(m)[0].key)[0]} layers, "
                              f"the flags say {m.num_layers}")
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    # Progress over the layers, plus one for the embedding and one for the final norm and output.
    with Progress(m.num_layers + 2, "[vopd-convert] megatron-to-hf", unit="layer", enabled=show_progress) as progress:
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
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return files
