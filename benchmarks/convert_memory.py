"""Peak host memory (RSS) of `vopd-convert` in both directions, against the checkpoint size.

Writes a synthetic Llama-style HF checkpoint (random weights, sharded safetensors,
no transformers needed), converts HF -> Megatron and back in child processes, and
reports each child's peak RSS (`ru_maxrss`) next to the checkpoint size and the
peak RSS of a child that only imports the converter (the interpreter + torch +
megatron-core floor). Streaming means the conversion peak stays near that floor
plus about one layer, not the checkpoint size.

    .venv/bin/python benchmarks/convert_memory.py --layers 16 --hidden 1024 --out runs/convert_memory.csv
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from vopd_megatron.errors import entry_point


def synth_llama(path, layers, hidden, ffn, heads, kv_heads, vocab, shard_bytes=256 * 2**20):
    """A random-weight Llama checkpoint written shard by shard (never whole in memory)."""
    os.makedirs(path, exist_ok=True)
    d = hidden // heads
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", hidden_size=hidden,
               intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=d, rms_norm_eps=1e-5, vocab_size=vocab,
               max_position_embeddings=4096, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))

    def tensors():
        yield "model.embed_tokens.weight", (vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (hidden,)
            yield p + "self_attn.q_proj.weight", (heads * d, hidden)
            yield p + "self_attn.k_proj.weight", (kv_heads * d, hidden)
            yield p + "self_attn.v_proj.weight", (kv_heads * d, hidden)
            yield p + "self_attn.o_proj.weight", (hidden, heads * d)
            yield p + "post_attention_layernorm.weight", (hidden,)
            yield p + "mlp.gate_proj.weight", (ffn, hidden)
            yield p + "mlp.up_proj.weight", (ffn, hidden)
            yield p + "mlp.down_proj.weight", (hidden, ffn)
        yield "model.norm.weight", (hidden,)
        yield "lm_head.weight", (vocab, hidden)

    shard, size, files, weight_map, total = {}, 0, [], {}, 0
    for name, shape in list(tensors()) + [(None, None)]:
        if name is None or (shard and size + 4 * torch.Size(shape).numel() > shard_bytes):
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, fname))
            files.append(fname)
            weight_map.update({k: fname for k in shard})
            shard, size = {}, 0
            if name is None:
                break
        shard[name] = torch.randn(shape) * 0.02
        size += shard[name].numel() * 4
        total += shard[name].numel() * 4
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(path, "model.safetensors.index.json"), "w"))
    return total


def peak_rss_mb(cmd) -> tuple[float, float]:
    """(peak RSS of the child in MiB, wall seconds)."""
    start = time.time()
    child = subprocess.run([sys.executable, "-c", _CHILD, *cmd], capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(child.stdout + child.stderr)
    return float(child.stdout.strip().splitlines()[-1]), time.time() - start


_CHILD = """
import resource, sys
from vopd_megatron.convert.cli import main
if sys.argv[1:] != ['--import-only']:
    rc = main(sys.argv[1:])
    assert rc == 0, rc
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


@entry_point
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="runs/convert_memory.csv")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="vopd_convert_mem_")
    hf, mg, back = (os.path.join(work, n) for n in ("hf", "megatron", "hf_back"))
    for p in (hf, mg, back):
        shutil.rmtree(p, ignore_errors=True)
    total = synth_llama(hf, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab)
    layer_bytes = 4 * (2 * args.hidden + args.hidden * (args.hidden // args.heads) * (2 * args.heads + 2 * args.kv_heads)
                       + 3 * args.hidden * args.ffn)
    rows = []
    for what, cmd in (
        ("import only", ["--import-only"]),
        ("hf-to-megatron", ["hf-to-megatron", "--hf-dir", hf, "--out", mg]),
        ("megatron-to-hf", ["megatron-to-hf", "--load", mg, "--out", back, "--max-shard-size-gb", "0.25"]),
    ):
        rss, wall = peak_rss_mb(cmd)
        rows.append(dict(step=what, peak_rss_mib=round(rss, 1), wall_s=round(wall, 1),
                         checkpoint_mib=round(total / 2**20, 1), largest_layer_mib=round(layer_bytes / 2**20, 1),
                         embedding_mib=round(4 * args.vocab * args.hidden / 2**20, 1)))
        print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
