"""The per-step gradient-variance diagnostic (variance/* metrics) against a plain computation.

The plain computation does not use the loss code: log-softmax of the float64
logits, r = log p(a) - log q(a), K = sum_v p_v (log p_v - log q_v), then the
masked means of r^2 and (r - K)^2. The diagnostic must match it from the
reference loss, from the vocab-parallel loss at TP2 over gloo, and when the
batch's metrics are summed over several microbatches.
"""
import pytest
import torch
import torch.distributed as dist

from vopd_megatron.loss import LossConfig, reference_loss, summarize_metrics, vocab_parallel_opd_loss

VOCAB, SHAPE = 37, (5, 4)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*SHAPE, VOCAB, generator=g, dtype=torch.float64) * 3
    u = z + torch.randn(*SHAPE, VOCAB, generator=g, dtype=torch.float64) * 1.5
    a = torch.multinomial(torch.softmax(z.view(-1, VOCAB), -1), 1, generator=g).view(SHAPE)
    mask = (torch.rand(SHAPE, generator=g) > 0.3).double()
    return z, u, a, mask


def plain(z, u, a, mask, baseline_mode):
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(u, -1)
    r = (logp - logq).gather(-1, a[..., None])[..., 0]
    k = (logp.exp() * (logp - logq)).sum(-1)
    b = {"opd": torch.zeros_like(k), "vopd": k}[baseline_mode]
    mean = lambda x: float((x * mask).sum() / mask.sum())  # noqa: E731
    return {"variance/opd_signal": mean(r**2), "variance/vopd_signal": mean((r - k) ** 2),
            "variance/mode_signal": mean((r - b) ** 2)}


@pytest.mark.parametrize("mode", ["opd", "vopd"])
def test_reference_diagnostic_matches_plain(mode):
    z, u, a, mask = inputs()
    _, _, metrics = reference_loss(z.clone().requires_grad_(), u, a, mask, LossConfig(mode=mode))
    got = summarize_metrics(metrics)
    want = plain(z, u, a, mask, mode)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert got["variance/ratio"] == pytest.approx(want["variance/vopd_signal"] / want["variance/opd_signal"])


def test_microbatches_combine_exactly():
    z, u, a, mask = inputs(1)
    cfg = LossConfig(mode="vopd")
    parts = [reference_loss(z[i : i + 2], u[i : i + 2], a[i : i + 2], mask[i : i + 2], cfg)[2] for i in (0, 2, 4)]
    got, want = summarize_metrics(parts), plain(z, u, a, mask, "vopd")
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def _tp2_case(cfg, z, u, a, mask):
    """One rank of TP2: its vocab shard (V=37 padded to 38 with a garbage column),
    two microbatches summarized together."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    part = VOCAB // tp + 1
    pad = SHAPE + (part * tp - VOCAB,)
    zp = torch.cat([z, torch.full(pad, 40.0, dtype=z.dtype)], -1)
    up = torch.cat([u, torch.full(pad, -40.0, dtype=u.dtype)], -1)
    zs = zp[..., rank * part : (rank + 1) * part].float().contiguous()  # [5, 4, 19]
    us = up[..., rank * part : (rank + 1) * part].float().contiguous()
    metrics = [vocab_parallel_opd_loss(zs[s], us[s], a[s], mask[s], cfg, vocab_size=VOCAB, group=dist.group.WORLD)[2]
               for s in (slice(0, 3), slice(3, 5))]
    return summarize_metrics(metrics)


@pytest.mark.parametrize("cfg", [LossConfig(mode="opd"), LossConfig(mode="vopd_topk", top_k=4)], ids=["opd", "topk"])
def test_tp2_diagnostic_matches_plain(gloo_pools, cfg):
    z, u, a, mask = inputs(2)
    z, u = z.float().double(), u.float().double()  # the ranks see exactly these fp32 values
    want = plain(z, u, a, mask, "opd")
    results = gloo_pools(2).run(_tp2_case, cfg, z, u, a, mask)
    for got in results:
        for key in ("variance/opd_signal", "variance/vopd_signal"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
        assert got["variance/ratio"] == pytest.approx(
            want["variance/vopd_signal"] / want["variance/opd_signal"], rel=1e-5)
    if cfg.mode == "opd":
        assert results[0]["variance/mode_signal"] == pytest.approx(want["variance/opd_signal"], rel=1e-5)


def test_exact_variance_summary_is_the_trace_of_the_covariance():
    from vopd_megatron.training.variance import variance_summary

    g = torch.Generator().manual_seed(3)
    grads = torch.randn(6, 10, generator=g, dtype=torch.float64) * torch.arange(1, 11)  # [R, P]
    got = variance_summary(grads)
    assert got["total_variance"] == pytest.approx(float(torch.cov(grads.T).trace()), rel=1e-12)
    assert got["mean_grad_sq_norm"] == pytest.approx(float(grads.mean(0).square().sum()), rel=1e-12)


def test_exact_variance_cli_measures_top_k_modes(tmp_path):
    """`grad_variance` as the quickstart calls it: a top-k --vopd-loss with --vopd-top-k (which the
    front end validates together) and a mix of top-k and full modes in --modes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "variance.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vopd_megatron.training.grad_variance", "--config", "examples/tiny/config.yaml",
         "--vopd-loss", "vopd_topk", "--vopd-top-k", "4", "--micro-batch-size", "4", "--rollout-max-new-tokens",
         "6", "--resamples", "2", "--prompts", "4", "--modes", "opd,vopd_topk,full_kl", "--out", str(out)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())["modes"]
    assert set(result) == {"opd", "vopd_topk", "full_kl"}
    for mode, s in result.items():
        assert s["total_variance"] > 0 and s["ratio_to_opd"] == pytest.approx(
            s["total_variance"] / result["opd"]["total_variance"]), mode
