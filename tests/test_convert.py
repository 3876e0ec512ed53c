"""HF <-> Megatron conversion (issue 5): parity with `transformers`, round trip, errors, vopd-train.

Tiny random-weight models of each family are made with `transformers` itself
(fp32, every weight perturbed so that a swapped or mis-interleaved tensor
shows), converted, loaded into `build_gpt_stage` models at TP1, TP2 and PP2 in
gloo pools, and their full-vocabulary logits compared with the HF forward on
the same tokens.
"""
import json
import os
import subprocess
from pathlib import Path
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from vopd_megatron.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf  # noqa: E402
from vopd_megatron.convert.cli import main as convert_cli  # noqa: E402

VOCAB, SEQ = 300, 12  # padded to 384 at TP1, 512 at TP2: the TP2 load pads the stored vocabulary
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAMILIES = {
    # GQA, untied, Llama-3.1 RoPE scaling (megatron-core's fixed low/high factors), theta 500k.
    "llama": lambda **kw: transformers.LlamaConfig(
        **kw, num_key_value_heads=2, max_position_embeddings=16384, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, rope_theta=500000.0),
    # QKV bias, tied embeddings, theta 1e6.
    "qwen2": lambda **kw: transformers.Qwen2Config(**kw, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    # QK-norm, head_dim != hidden / heads.
    "qwen3": lambda **kw: transformers.Qwen3Config(**kw, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    "mistral": lambda **kw: transformers.MistralConfig(**kw, num_key_value_heads=1, sliding_window=None,
                                                        head_dim=kw["hidden_size"] // 4, tie_word_embeddings=False),
}


def make_hf_model(family, path, vocab=VOCAB, hidden=64, layers=2, seed=0):
    """A tiny random-weight HF model of `family`, saved with save_pretrained (safetensors, fp32)."""
    torch.manual_seed(seed)
    cfg = FAMILIES[family](vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, rms_norm_eps=1e-6)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


def tokens(seed=1):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (hf dir, megatron dir, flags, HF logits [b, s, V])."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        hf_dir, mg_dir = str(root / "hf"), str(root / "megatron")
        model = make_hf_model(family, hf_dir)
        flags = convert_hf_to_megatron(hf_dir, mg_dir)
        with torch.no_grad():
            logits = model(tokens()).logits
        out[family] = (hf_dir, mg_dir, flags, logits)
    return out


# ----------------------------------------------------------------- pool workers


def megatron_logits(cases, tp, pp):
    """For each (checkpoint, flags, tokens): full-vocabulary logits [b, s, V] of the loaded Megatron model."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from vopd_megatron.config.schema import ModelArgs, ParallelArgs, TrainArgs
    from vopd_megatron.training.model_flags import flags_to_model_args
    from vopd_megatron.model.builder import build_gpt_stage
    from vopd_megatron.training.checkpoint import load_model_weights
    from vopd_megatron.model.masks import causal_mask

    results = []
    for ckpt_dir, flags, toks in cases:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        try:
            m = flags_to_model_args(flags, ModelArgs(seq_length=SEQ))
            first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
            model = build_gpt_stage(m, ParallelArgs(tp, pp), TrainArgs(), first, last).eval()
            load_model_weights(ckpt_dir, [model])
            b, s = toks.shape
            pos = torch.arange(s).unsqueeze(0).expand(b, s)
            with torch.no_grad():
                if not first:  # [s, b, h] activations from the previous stage
                    h = torch.empty(s, b, m.hidden_size)
                    dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
                    model.set_input_tensor(h)
                out = model(toks, pos, causal_mask(s, "cpu"))
                if not last:
                    dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
                    results.append(None)
                    continue
                parts = [torch.empty_like(out) for _ in range(tp)]  # [b, s, V/tp] each
                dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                results.append(torch.cat(parts, dim=-1)[..., : m.vocab_size])
        finally:
            ps.destroy_model_parallel()
    return results


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2)], ids=["TP1", "TP2", "PP2"])
def test_logits_match_transformers(gloo_pools, converted, world, tp, pp):
    families = list(converted)
    cases = [(converted[f][1], converted[f][2], tokens()) for f in families]
    per_rank = gloo_pools(world).run(megatron_logits, cases, tp, pp)
    got = per_rank[-1]  # the last rank is on the last pipeline stage
    for family, logits in zip(families, got):
        ref = converted[family][3]
        err = float((logits - ref).abs().max())
        assert err <= 1e-4, f"{family} TP{tp} PP{pp}: max |logit diff| {err:.2e} (logit scale {float(ref.abs().max()):.2f})"


# ----------------------------------------------------------------- round trip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_identical(converted, tmp_path, family):
    hf_dir, mg_dir, _, _ = converted[family]
    back = tmp_path / "back"
    convert_megatron_to_hf(mg_dir, str(back), max_shard_bytes=40_000)  # several shards + index
    assert (back / "model.safetensors.index.json").exists()
    with open(os.path.join(hf_dir, "config.json")) as a, open(back / "config.json") as b:
        assert json.load(a) == json.load(b)
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    index = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
    restored = {}
    for file in sorted(set(index.values())):
        restored.update(load_file(str(back / file)))
    assert restored.keys() == original.keys()
    for name, t in original.items():
        assert restored[name].dtype == t.dtype and torch.equal(restored[name], t), name
    # transformers loads it and computes the same logits
    model = transformers.AutoModelForCausalLM.from_pretrained(str(back), attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, converted[family][3])


def test_cli_writes_flags_and_bf16(converted, tmp_path, capsys):
    hf_dir = converted["llama"][0]
    out = tmp_path / "bf16"
    assert convert_cli(["hf-to-megatron", "--hf-dir", hf_dir, "--out", str(out), "--dtype", "bf16",
                        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]) == 0
    printed = capsys.readouterr()
    assert "num-query-groups: 2" in printed.out and "use-rope-scaling: true" in printed.out
    # progress (a log, not a terminal): one line per 30 s at most, the last one at every chunk written
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(out / "iter_0000000")).read_metadata().state_dict_metadata
    chunks = sum(len(m.chunks) for m in meta.values() if hasattr(m, "chunks"))
    last = printed.err.strip().splitlines()[-1]
    assert last.startswith(f"[vopd-convert] hf-to-megatron {chunks}/{chunks} [") and "\r" not in printed.err
    from vopd_megatron.config import parse_config

    run, _ = parse_config(["--config", str(out / "model_flags.yaml")])
    assert (run.model.num_query_groups, run.model.rotary_base, run.model.kv_channels) == (2, 500000, 16)
    back = tmp_path / "back"
    assert convert_cli(["megatron-to-hf", "--load", str(out), "--out", str(back)]) == 0
    layers = run.model.num_layers  # + the embedding, + the final norm and output
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"[vopd-convert] megatron-to-hf {layers + 2}/{layers + 2} [")
    w = load_file(str(back / "model.safetensors"))
    assert w["model.embed_tokens.weight"].dtype == torch.bfloat16


# ----------------------------------------------------------------- errors


def _write_config(path, **cfg):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_unsupported_architecture(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "gpt2" / "model.safetensors"))
    with pytest.raises(ConversionError, match="unsupported architecture: model_type 'gpt2'"):
        convert_hf_to_megatron(str(tmp_path / "gpt2"), str(tmp_path / "out"))


def test_missing_shard(converted, tmp_path):
    import shutil

    src = tmp_path / "sharded"
    shutil.copytree(converted["llama"][0], src)
    with open(src / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model.safetensors",
                                  "lm_head.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(ConversionError, match="missing safetensors shard.*model-00002-of-00002"):
        convert_hf_to_megatron(str(src), str(tmp_path / "out"))


def test_corrupt_safetensors_header(converted, tmp_path):
    import shutil

    src = tmp_path / "corrupt"
    shutil.copytree(converted["qwen2"][0], src)
    with open(src / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ConversionError, match="cannot read the safetensors header"):
        convert_hf_to_megatron(str(src), str(tmp_path / "out"))


@pytest.mark.parametrize("tp,match", [(3, "num-attention-heads 4 is not divisible"),
                                      (4, "num-query-groups 2 is not divisible")])
def test_tp_must_divide_heads_and_groups(converted, tmp_path, tp, match):
    with pytest.raises(ConversionError, match=match):
        convert_hf_to_megatron(converted["llama"][0], str(tmp_path / "out"), check_tp=tp)


def test_cli_error_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as info:
        convert_cli(["hf-to-megatron", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert str(info.value.code) == f"error: {tmp_path}: no config.json (not a Hugging Face model directory)"


def test_rope_scaling_megatron_cannot_express(converted, tmp_path):
    import shutil

    src = tmp_path / "rope"
    shutil.copytree(converted["llama"][0], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"]["low_freq_factor"] = 2.0
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="low_freq_factor=2.0 cannot be expressed"):
        convert_hf_to_megatron(str(src), str(tmp_path / "out"))
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="'yarn' is not supported"):
        convert_hf_to_megatron(str(src), str(tmp_path / "out"))


# ----------------------------------------------------------------- vopd-train with a converted teacher


def test_vopd_train_uses_converted_teacher(tmp_path, monkeypatch):
    """A tiny HF Llama teacher (the tiny example's vocabulary), converted, drives two training steps;
    the trained student (a vopd-train checkpoint with optimizer state) converts to HF and loads in transformers."""
    hf_dir, mg_dir = tmp_path / "teacher_hf", tmp_path / "teacher"
    make_hf_model("llama", str(hf_dir), vocab=250, hidden=96, layers=4)
    convert_hf_to_megatron(str(hf_dir), str(mg_dir))
    cmd = [sys.executable, "-m", "vopd_megatron.training.train", "--config", "examples/tiny/config.yaml",
           "--teacher-model-config", str(mg_dir / "model_flags.yaml"), "--teacher-load", str(mg_dir),
           "--train-iters", "2", "--save", str(tmp_path / "student"), "--tensorboard-dir", str(tmp_path / "tb")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no --teacher-load" not in done.stdout
    assert (tmp_path / "student" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    monkeypatch.chdir(ROOT)
    from vopd_megatron.config import parse_config

    student = parse_config(["--config", "examples/tiny/config.yaml"])[0].model
    convert_megatron_to_hf(str(tmp_path / "student"), str(tmp_path / "student_hf"), model_args=student)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "student_hf"))
    assert model.config.vocab_size == 250 and model.get_input_embeddings().weight.shape == (250, 64)


def test_vopd_train_starts_student_from_converted_checkpoint(tmp_path):
    """--load <converted HF student> --finetune: weights only, from iteration 1 with a fresh
    optimizer. The first step's mean student log-prob of the completion tokens is the HF
    model's own (computed here with transformers on the same tokens)."""
    import torch

    from tests.test_examples_tiny import read_scalars
    from vopd_megatron.rollout.file_source import JsonlRolloutSource
    from vopd_megatron.training.batch import collate

    hf_dir, mg_dir = tmp_path / "student_hf", tmp_path / "student"
    make_hf_model("llama", str(hf_dir), vocab=250, hidden=64, layers=2)
    convert_hf_to_megatron(str(hf_dir), str(mg_dir))
    cmd = [sys.executable, "-m", "vopd_megatron.training.train", "--config", str(mg_dir / "model_flags.yaml"),
           "--rollout-data", "examples/tiny/rollouts.jsonl", "--train-iters", "1", "--global-batch-size", "2",
           "--micro-batch-size", "2", "--seq-length", "64", "--lr", "1e-4", "--tensorboard-dir", str(tmp_path / "tb"),
           "--load", str(mg_dir), "--finetune"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "iterations 1..1" in done.stdout
    logged = read_scalars(tmp_path / "tb")["student_logprob"][0]

    batch = collate(JsonlRolloutSource(Path(ROOT) / "examples/tiny/rollouts.jsonl").take(2), 64)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        logp = model(batch["tokens"]).logits.double().log_softmax(-1)
    lp = logp.gather(-1, batch["labels"][..., None]).squeeze(-1)
    expected = float((lp * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
    assert abs(logged - expected) < 1e-4, (logged, expected)
