"""vopd-sft: its loss is plain cross entropy, and its gradient is the same at TP2 and DP2 as in one process.

One set of initial weights is written at TP1 with the project's checkpoint
writer (the file vopd-train reads). The reference is single-process plain
autograd: the model's full logits, `torch.nn.functional.cross_entropy` in
float64 on the completion tokens, token mean over the whole batch. Each layout
runs vopd-sft's path (Megatron's schedule, Megatron's vocab-parallel cross
entropy, finalize_model_grads) on the same global batch; its loss must equal the
reference loss and its finalized gradient, written through the sharded state
dict (gradient in place of weight) and read back at TP1, the reference
gradient tensor by tensor. The data side is checked on the real arithmetic
task: prompt tokens are context only, every completion ends with EOS.
"""
import json

import pytest
import torch

from tests.test_train_step import _teardown, _unwrap
from vopd_megatron.config import ModelArgs, ParallelArgs, RunConfig, TrainArgs
from vopd_megatron.rollout.types import Rollout
from vopd_megatron.training.batch import collate

VOCAB, SEQ, BATCH = 23, 12, 4


def run_config(tp=1):
    # divisible 16: the padded vocabulary is 32 at TP1 and TP2, so the checkpoint reshards.
    m = ModelArgs(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, seq_length=SEQ,
                  make_vocab_size_divisible_by=16, normalization="RMSNorm", swiglu=True,
                  untie_embeddings_and_output_weights=True, disable_bias_linear=True)
    return RunConfig(model=m, teacher=m, parallel=ParallelArgs(tensor_model_parallel_size=tp),
                     train=TrainArgs(micro_batch_size=1, global_batch_size=BATCH, lr=1e-3))


def global_batch():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(BATCH):
        n_prompt = 2 + i
        ids = torch.randint(0, VOCAB, (SEQ + 1 - i,), generator=g).tolist()
        out.append(Rollout(ids[:n_prompt], ids[n_prompt:]))
    return out


def _build(run):
    """vopd-sft's model: the student alone, built and wired as vopd-sft does."""
    from vopd_megatron.runtime.pipeline import wire_grad_hooks
    from vopd_megatron.runtime.startup import initialize_parallel
    from vopd_megatron.training.setup import build_models

    models = build_models(run, initialize_parallel(run), with_teacher=False)
    wire_grad_hooks(models.student[0].config, models.student)
    return models


def make_initial(ckpt):
    from vopd_megatron.training.checkpoint import save_checkpoint

    try:
        save_checkpoint(ckpt, 0, _build(run_config()).student, None, None, {"iteration": 0})
    finally:
        _teardown()


def reference(ckpt):
    """Single process: plain float64 cross entropy over the whole batch; loss and grads."""
    from vopd_megatron.training.checkpoint import load_model_weights
    from vopd_megatron.model.masks import causal_mask

    try:
        model = _build(run_config()).student[0]
        load_model_weights(ckpt, [model])
        b = collate(global_batch(), SEQ)
        logits = _unwrap(model)(b["tokens"], b["position_ids"], causal_mask(SEQ, "cpu"))  # [b, s, 32]
        ce = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), b["labels"].flatten(),
                                               reduction="none")
        mask = b["loss_mask"].flatten().double()
        loss = (ce * mask).sum() / mask.sum()
        loss.backward()
        return float(loss), {n: p.main_grad.detach().clone() for n, p in _unwrap(model).named_parameters()}
    finally:
        _teardown()


def layout(tp, ckpt, grad_dir):
    """vopd-sft's forward/backward at this layout; returns its loss, saves grads as weights."""
    from megatron.core import dist_checkpointing

    from vopd_megatron.training.checkpoint import load_model_weights
    from vopd_megatron.runtime.context import ParallelContext
    from vopd_megatron.runtime.sharding import shard
    from vopd_megatron.training.batch import to_microbatches
    from vopd_megatron.training.sft_step import mean_loss, sft_forward_backward

    run = run_config(tp)
    try:
        models = _build(run)
        model = models.student[0]
        load_model_weights(ckpt, [model])
        ctx = ParallelContext.from_megatron()
        mine = shard(global_batch(), ctx.dp_size, ctx.dp_rank)
        losses = sft_forward_backward(models, to_microbatches(mine, run.train.micro_batch_size, SEQ, "cpu"), run)
        loss = mean_loss(losses, ctx)
        inner = _unwrap(model)
        with torch.no_grad():
            for p in inner.parameters():
                p.copy_(p.main_grad)
        dist_checkpointing.save(inner.sharded_state_dict(), grad_dir)
        return loss
    finally:
        _teardown()


def read_full(grad_dir):
    from megatron.core import dist_checkpointing

    try:
        inner = _unwrap(_build(run_config()).student[0])
        inner.load_state_dict(dist_checkpointing.load(inner.sharded_state_dict(), grad_dir))
        return {n: p.detach().clone() for n, p in inner.named_parameters()}
    finally:
        _teardown()


def test_sft_loss_and_gradients_match_plain_cross_entropy(gloo_pools, tmp_path):
    ckpt = str(tmp_path / "init")
    one = gloo_pools(1)
    one.run(make_initial, ckpt)
    ref_loss, ref_grads = one.run(reference, ckpt)[0]
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, tp in (("tp1", 1), ("tp2", 2), ("dp2", 1)):
        world = 1 if name == "tp1" else 2
        grad_dir = tmp_path / f"grad_{name}"
        grad_dir.mkdir()
        losses = gloo_pools(world).run(layout, tp, ckpt, str(grad_dir))
        for loss in losses:
            assert loss == pytest.approx(ref_loss, rel=1e-5), name
        got = one.run(read_full, str(grad_dir))[0]
        assert got.keys() == ref_grads.keys()
        for key, g in ref_grads.items():
            err = float((got[key].double() - g.double()).abs().max()) / scale
            assert err < 2e-5, f"{name}: {key} gradient error {err:.2e}"


def test_sft_rows_mask_the_prompt_and_end_with_eos(tmp_path):
    import importlib.util
    from pathlib import Path

    from vopd_megatron.data import load_tokenizer
    from vopd_megatron.training.sft_data import load_sft_rows

    spec = importlib.util.spec_from_file_location("task", Path(__file__).parents[1] / "examples/arithmetic/task.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    task.build_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": task.prompt(347, 85),
                                                    "completion": task.solution(347, 85)}) + "\n")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok._hf.decode(tok.encode("347+85=7+5=12;\\boxed{432}")) == "347+85=7+5=12;\\boxed{432}"
    eos = tok.encode("<eos>", add_special_tokens=False)[0]
    (row,) = load_sft_rows(tmp_path / "sft.jsonl", tok, eos, seq_length=48)
    assert task.solution(347, 85) == "7+5=12;4+8+1=13;3+0+1=4;\\boxed{432}"
    assert len(row.prompt_ids) == len("347+85=") and row.completion_ids[-1] == eos
    b = collate([row], 48)
    n = len(row.prompt_ids) + len(row.completion_ids)
    assert b["loss_mask"][0].tolist() == [0.0] * (len(row.prompt_ids) - 1) + [1.0] * len(row.completion_ids) + \
        [0.0] * (48 - n + 1)
    with pytest.raises(ValueError, match="do not fit"):
        load_sft_rows(tmp_path / "sft.jsonl", tok, eos, seq_length=20)


def test_sft_bf16_trains_bf16_parameters(tmp_path):
    """`vopd-sft --bf16` wraps the model as vopd-train wraps its student (Float16Module): every weight
    it trains and saves is bf16. Before, it built the model unwrapped: the final norm's weight stayed
    fp32 and the forward ran outside Megatron's mixed-precision wrapper."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from torch.distributed.checkpoint import FileSystemReader

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("task", root / "examples/arithmetic/task.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    task.build_tokenizer(tmp_path / "tokenizer.json")
    rows = [{"prompt": task.prompt(a, b), "completion": task.solution(a, b)} for a, b in ((12, 34), (56, 7))]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "vopd_megatron.training.sft", "--config", "examples/arithmetic/config.yaml",
           "--tokenizer-model", str(tmp_path / "tokenizer.json"), "--sft-data", str(tmp_path / "sft.jsonl"),
           "--train-iters", "1", "--global-batch-size", "2", "--micro-batch-size", "2", "--bf16",
           "--save", str(out), "--save-interval", "1"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (iteration,) = [p for p in out.iterdir() if p.name.startswith("iter_")]
    metadata = FileSystemReader(str(iteration)).read_metadata().state_dict_metadata
    dtypes = {k: m.properties.dtype for k, m in metadata.items()
              if hasattr(m, "properties") and m.properties.dtype.is_floating_point and "_extra_state" not in k}
    weights = {k: d for k, d in dtypes.items() if k.endswith(".weight")}
    assert weights, f"no weights in the checkpoint: {sorted(metadata)[:5]}"
    assert set(weights.values()) == {torch.bfloat16}, {k: d for k, d in weights.items() if d != torch.bfloat16}
