"""Evaluation (vopd_megatron.eval): the reverse KL it reports equals the plain
reference on the very completions it sampled (TP1 with DP2, and TP2), it leaves
the RNG and training flags as it found them, and a vopd-train run with
evaluation trains exactly as one without."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vopd_megatron.config import DistillArgs, EvalArgs, ModelArgs, ParallelArgs, RunConfig, TrainArgs
from vopd_megatron.eval import EvalProblem
from vopd_megatron.loss import LossConfig
from vopd_megatron.loss.reference import reference_token_terms

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, TAU = 250, 24, 0.7


def _run_config(tp, fused_output=False):
    student = ModelArgs(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, seq_length=SEQ,
                        untie_embeddings_and_output_weights=True)
    teacher = ModelArgs(num_layers=3, hidden_size=96, num_attention_heads=4, ffn_hidden_size=320,
                        vocab_size=VOCAB, seq_length=SEQ, untie_embeddings_and_output_weights=True)
    return RunConfig(model=student, teacher=teacher,
                     parallel=ParallelArgs(tensor_model_parallel_size=tp),
                     train=TrainArgs(micro_batch_size=2, global_batch_size=4, seed=5),
                     distill=DistillArgs(vopd_temperature=TAU, vopd_fused_output=fused_output),
                     eval=EvalArgs(eval_samples=3, eval_max_new_tokens=7, eval_temperature=1.0))


def _gathered_logits(module, tokens):
    """[1, s, V] full-vocabulary logits of one sequence (TP shards gathered)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    s = len(tokens)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    local = unwrap_model(module)(torch.tensor([tokens]), torch.arange(s)[None], mask)  # [1, s, V/tp]
    pieces = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)


def _eval_case(tp, fused_output=False):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from vopd_megatron.eval import Evaluator, eval_sampling_config
    from vopd_megatron.runtime.startup import initialize_parallel
    from vopd_megatron.training.setup import build_models

    run = _run_config(tp, fused_output)
    ctx = initialize_parallel(run)
    try:
        models = build_models(run, ctx)
        rng = random.Random(3)
        problems = [EvalProblem(i, [rng.randrange(VOCAB) for _ in range(rng.randint(2, 6))], "1", None)
                    for i in range(5)]  # 5 problems over DP2: uneven blocks
        ev = Evaluator(run, models, problems, eval_sampling_config(run, None), ctx, samples=3, seed=11)
        tracker = {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
        host = torch.get_rng_state()
        flags = [m.training for m in models.stages[0].modules()]
        result = ev.evaluate()
        assert torch.equal(torch.get_rng_state(), host)
        assert all(torch.equal(v, tracker[k]) for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items())
        assert [m.training for m in models.stages[0].modules()] == flags
        again = ev.evaluate()  # same weights, same seed: the same completions
        assert [r["completion_ids"] for r in again.records] == [r["completion_ids"] for r in result.records]

        # The reference: plain full-vocabulary KL on gathered logits of the same sequences.
        kls = []
        with torch.no_grad():
            for rec, prob in zip(result.records, problems):
                assert rec["index"] == prob.index and len(rec["completion_ids"]) == 3
                for comp in rec["completion_ids"]:
                    seq = prob.prompt_ids + comp
                    z = _gathered_logits(models.student[0], seq[:-1]).double()  # [1, s, Vp]
                    u = _gathered_logits(models.teacher, seq[:-1]).double()
                    mask = torch.zeros(1, len(seq) - 1)
                    mask[0, len(prob.prompt_ids) - 1 :] = 1.0
                    terms = reference_token_terms(z, u, torch.tensor([seq[1:]]), mask, LossConfig(temperature=TAU),
                                                  vocab_size=VOCAB)
                    kls.append(terms.kl[mask != 0])
        ref = torch.cat(kls).mean().item()
        lengths = [len(c) for r in result.records for c in r["completion_ids"]]
        return result.metrics, ref, sum(lengths) / len(lengths)
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("tp,fused_output", [(1, False), (2, False), (2, True)],
                         ids=["tp1", "tp2", "tp2-fused-output"])
def test_eval_reverse_kl_matches_reference(gloo_pools, tp, fused_output):
    # fused_output: the evaluator's reverse-KL pass with --vopd-fused-output (no logits on the last stage).
    out = gloo_pools(2).run(_eval_case, tp, fused_output)
    for metrics, ref, mean_len in out:
        assert metrics["eval/reverse_kl"] > 0
        assert metrics["eval/reverse_kl"] == pytest.approx(ref, rel=1e-5, abs=1e-7)
        assert metrics["eval/completion_tokens"] == pytest.approx(mean_len)
        assert metrics["eval/hit_max_length"] == 1.0  # no EOS configured: every completion runs to the limit
        assert mean_len == 7
    assert out[0][0] == out[1][0]  # every rank reports the same numbers


def _train(tmp_path, name, *extra):
    tb = tmp_path / name
    out = subprocess.run(
        [sys.executable, "-m", "vopd_megatron.training.train", "--config", "examples/tiny/config.yaml",
         "--train-iters", "2", "--rollout-max-new-tokens", "8", "--save", "", "--tensorboard-dir", str(tb), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return [json.loads(line) for line in (tb / "metrics.jsonl").read_text().splitlines()]


def test_training_with_eval_equals_training_without(tmp_path):
    plain = _train(tmp_path, "plain")
    evald = _train(tmp_path, "eval", "--eval-data", "examples/tiny/eval.jsonl", "--eval-every", "1",
                   "--eval-samples", "2", "--eval-max-new-tokens", "6")
    train_lines = [line for line in evald if "loss" in line]
    eval_lines = [line for line in evald if "eval/reverse_kl" in line]
    assert [line["iteration"] for line in plain] == [1, 2]
    assert [line["iteration"] for line in eval_lines] == [0, 1, 2]  # before training, every 1, (last)
    for a, b in zip(plain, train_lines):  # bit-identical training curves
        for key in ("loss", "kl", "grad_norm", "log_ratio", "student_logprob"):
            assert a[key] == b[key], (key, a[key], b[key])
        # the tiny config has no EOS: every rollout runs to --rollout-max-new-tokens and is flagged
        assert a["rollout/hit_max_length"] == 1.0 and a["rollout/completion_tokens"] == 8
    for line in eval_lines:
        assert line["eval/reverse_kl"] > 0
        assert line["eval/completion_tokens"] == 6 and line["eval/hit_max_length"] == 1.0
    assert eval_lines[0]["eval/reverse_kl"] != eval_lines[2]["eval/reverse_kl"]  # the student changed


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_evaluator_measures_kl_with_the_runs_loss_backend(backend):
    """--vopd-loss-backend reaches the evaluator's reverse-KL pass (it used to build a LossConfig
    of its own with the default backend); the rest of the run's loss settings do not."""
    from vopd_megatron.eval.runner import eval_loss_config

    run = _run_config(1)
    run.distill.vopd_loss_backend = backend
    run.distill.vopd_loss, run.distill.vopd_ppo_clip = "opd", 0.2
    config = eval_loss_config(run)
    assert config.backend == backend
    assert config.mode == "vopd" and config.ppo_clip is None and config.temperature == TAU
