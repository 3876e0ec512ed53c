"""Vocab-parallel loss == reference, values and gradients, in spawned gloo ranks.

Every rank builds the same global logits from a seed, pads the vocabulary the
way Megatron does (a multiple of `divisible * tp`), keeps its own `V/tp`
columns, and runs the vocab-parallel loss over its tensor-parallel group. The
parent gathers the gradient shards and compares them with the float64
reference on the unpadded logits.
"""
import math

import pytest
import torch
import torch.distributed as dist

from vopd_megatron.loss import LOSS_MODES, LossConfig, reference_loss, summarize_metrics, vocab_parallel_opd_loss

WORLD = 4

# Normalised error max|x - ref| / max(|ref|, floor) allowed, per input dtype.
# bf16: the statistics are fp32 on the exact bf16 values, but the gradient is
# written in bf16 (8 bits of mantissa: relative step 2^-8 = 3.9e-3).
TOLERANCE = {
    torch.float32: {"value": 2e-5, "grad": 2e-5},
    torch.bfloat16: {"value": 2e-5, "grad": 8e-3},
}


def padded_vocab(vocab, tp, divisible=128):
    """Megatron's padding: the next multiple of divisible * tp."""
    step = divisible * tp
    return int(math.ceil(vocab / step) * step)


def make_inputs(seed, shape, vocab, scale=3.0, distance=1.0, extreme=False):
    """Global float64 student/teacher logits [*shape, vocab], targets, mask."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale
    u = z + torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * distance
    if extreme:  # a few logits of +-1e4 in both models
        flat_z, flat_u = z.view(-1, vocab), u.view(-1, vocab)
        flat_z[0, 5], flat_u[0, 7] = 1e4, -1e4
        flat_z[1, 3], flat_u[1, 3] = -1e4, 1e4
        flat_z[2, 9], flat_u[2, 9] = 1e4, 1e4
    targets = torch.multinomial(torch.softmax(z.view(-1, vocab), -1), 1, generator=g).view(shape)
    mask = (torch.rand(shape, generator=g) > 0.2).double()
    mask.view(-1, shape[-1])[1] = 0  # one whole row of tokens masked
    return z, u, targets, mask


def tp_group(tp):
    """This rank's tensor-parallel group of size tp. Every rank makes every
    group (new_group is collective); the pool destroys them after the case."""
    mine = None
    for start in range(0, dist.get_world_size(), tp):
        g = dist.new_group(list(range(start, start + tp)))
        if start <= dist.get_rank() < start + tp:
            mine = g
    return mine


def shard(full, tp, rank, vocab_padded, fill=0.0):
    """Megatron-style padding to vocab_padded columns, then rank's slice."""
    pad = vocab_padded - full.shape[-1]
    full = torch.cat([full, full.new_full(full.shape[:-1] + (pad,), fill)], -1)
    part = vocab_padded // tp
    return full[..., rank * part : (rank + 1) * part].contiguous()


def bit_equal(a, b):
    """Bitwise equality (NaN padding included)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def run_parallel(tp, dtype, config, inputs, vocab, vocab_padded, extra=None):
    """One rank: vocab-parallel loss on its shard. Returns values, grad shard, checks."""
    group = tp_group(tp)
    rank = dist.get_rank(group)
    z_full, u_full, targets, mask = inputs
    # Padded columns hold garbage on purpose: they must be ignored.
    z = shard(z_full.to(dtype), tp, rank, vocab_padded, fill=50.0).requires_grad_()
    u = shard(u_full.to(dtype), tp, rank, vocab_padded, fill=float("nan"))
    z_before, u_before = z.detach().clone(), u.clone()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, num_tokens, metrics = vocab_parallel_opd_loss(
            z, u, targets, mask, config, vocab_size=vocab, group=group, **(extra or {}))
    loss_sum.backward()
    return {
        "loss_sum": loss_sum.detach().double(),
        "num_tokens": int(num_tokens),
        "metrics": summarize_metrics(metrics),
        "grad": z.grad.double(),
        "inputs_unchanged": bit_equal(z.detach(), z_before) and bit_equal(u, u_before),
        "saved_bytes": sum(saved),
        "shard_bytes": z.numel() * z.element_size(),
    }


def reference(config, inputs, vocab, extra=None):
    z, u, targets, mask = inputs
    zz = z.clone().requires_grad_()
    loss_sum, num_tokens, metrics = reference_loss(zz, u, targets, mask, config, **(extra or {}))
    loss_sum.backward()
    return loss_sum.detach(), int(num_tokens), summarize_metrics(metrics), zz.grad


def normalised_error(x, ref, floor=1e-6):
    return float((x - ref).abs().max() / max(float(ref.abs().max()), floor))


def check_case(pool, tp, dtype, config, vocab, shape=(6, 3), seed=0, extreme=False, extra_fn=None, divisible=128,
               tol=None, errors=None):
    """Run one case on every TP group of the pool and compare with the reference.

    errors: optional dict that receives the largest normalised value and
    gradient errors seen (for reporting).
    """
    inputs = make_inputs(seed, shape, vocab, extreme=extreme)
    z, u = inputs[0].to(dtype).double(), inputs[1].to(dtype).double()
    inputs = (z, u) + inputs[2:]  # the reference sees exactly the values the ranks see
    extra = extra_fn(inputs) if extra_fn else None
    vocab_padded = padded_vocab(vocab, tp, divisible)
    results = pool.run(run_parallel, tp, dtype, config, inputs, vocab, vocab_padded, extra)
    ref_loss, ref_tokens, ref_metrics, ref_grad = reference(config, inputs, vocab, extra)
    tol = tol or TOLERANCE[dtype]
    n_tokens = math.prod(shape)
    for group_start in range(0, len(results), tp):
        group = results[group_start : group_start + tp]
        grad = torch.cat([r["grad"] for r in group], -1)
        assert torch.all(grad[..., vocab:] == 0), "padded columns received gradient"
        err = normalised_error(grad[..., :vocab], ref_grad)
        val_errs = [abs(float(r["loss_sum"] - ref_loss)) / max(abs(float(ref_loss)), 1.0) for r in group]
        if errors is not None:
            errors["grad"] = max(errors.get("grad", 0.0), err)
            errors["value"] = max([errors.get("value", 0.0), *val_errs])
        assert err <= tol["grad"], f"grad error {err:.2e} > {tol['grad']:.0e}"
        for r, val_err in zip(group, val_errs):
            assert r["num_tokens"] == ref_tokens
            assert val_err <= tol["value"], f"loss error {val_err:.2e}"
            for key in ("kl", "log_ratio", "advantage", "student_logprob"):
                assert r["metrics"][key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-4), key
            assert r["inputs_unchanged"], "inputs were modified"
            k = config.top_k if config.top_k else 0
            budget = r["shard_bytes"] + n_tokens * (96 + 24 * k)
            assert r["saved_bytes"] <= budget, f"saved {r['saved_bytes']} B > shard + O(N) = {budget} B"
    return results


@pytest.fixture(scope="module")
def pool(gloo_pools):
    return gloo_pools(WORLD)


def mode_config(mode, **kw):
    return LossConfig(mode=mode, top_k=kw.pop("top_k", 3), opt_baseline_eps=1e-4, **kw)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_matches_reference_on_padded_odd_vocab(pool, tp, dtype, mode):
    check_case(pool, tp, dtype, mode_config(mode, temperature=0.7), vocab=1271, seed=tp)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_extreme_logits(pool, tp, mode):
    # Rows with a +-1e4 teacher logit have log q(a) and K near 1e4: r - b then
    # carries fp32's absolute error of 1e4 * 2^-24 * (a few to ten), i.e. up to
    # ~1e-3, on gradients of order 1. A wrong formula errs by O(1).
    tol = {"value": 1e-3, "grad": 1e-3}
    check_case(pool, tp, torch.float32, mode_config(mode), vocab=1271, extreme=True, seed=10 + tp, tol=tol)


@pytest.mark.parametrize("tp", [1, 4])
@pytest.mark.parametrize("top_k", [384, 500, 5000])  # = local shard at tp4, > shard, > vocab
@pytest.mark.parametrize("mode", ["vopd_topk", "topk_kl"])
def test_topk_larger_than_shard_and_vocab(pool, tp, top_k, mode):
    check_case(pool, tp, torch.float32, mode_config(mode, top_k=top_k), vocab=1271, seed=20)


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_shard_made_only_of_padding(pool, mode):
    # vocab 130 padded to 256 at tp4 (divisible 64): rank 3 owns no real column.
    check_case(pool, 4, torch.float32, mode_config(mode), vocab=130, divisible=64, seed=30)


@pytest.mark.parametrize("correction", ["truncate", "mask"])
@pytest.mark.parametrize("mode", ["vopd", "vopd_opt", "full_kl"])
def test_rollout_correction(pool, correction, mode):
    def extra(inputs):
        z, _, targets, _ = inputs
        logp = (z / 1.0).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        g = torch.Generator().manual_seed(5)
        return {"behavior_logprobs": logp + torch.randn(logp.shape, generator=g, dtype=torch.float64)}

    cfg = mode_config(mode, rollout_correction=correction, rollout_correction_cap=1.5)
    check_case(pool, 2, torch.float32, cfg, vocab=1271, seed=40, extra_fn=extra)


@pytest.mark.parametrize("mode", ["opd", "vopd", "vopd_topk"])
def test_ppo_clip(pool, mode):
    def extra(inputs):
        z, _, targets, _ = inputs
        logp = z.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        g = torch.Generator().manual_seed(6)
        return {"old_logprobs": logp + 0.5 * torch.randn(logp.shape, generator=g, dtype=torch.float64)}

    check_case(pool, 4, torch.float32, mode_config(mode, ppo_clip=0.2), vocab=1271, seed=50, extra_fn=extra)


def megatron_peer(tp, inputs, vocab):
    """-log p(a) from our loss and from megatron-core's vocab-parallel CE, fused and plain."""
    import inspect

    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from vopd_megatron.loss import vocab_parallel_token_terms

    group = tp_group(tp)
    rank = dist.get_rank(group)
    z_full, u_full, targets, mask = inputs
    z, u = shard(z_full.float(), tp, rank, vocab), shard(u_full.float(), tp, rank, vocab)
    terms = vocab_parallel_token_terms(z, u, targets, torch.ones_like(mask), LossConfig(mode="opd"),
                                       vocab_size=vocab, group=group)
    # megatron-core 0.16 reads the TP group from its global state; 0.19 takes it.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        takes_group = "tp_group" in inspect.signature(vocab_parallel_cross_entropy).parameters
        kwargs = {"tp_group": parallel_state.get_tensor_model_parallel_group()} if takes_group else {}
        ce = vocab_parallel_cross_entropy(z.clone(), targets, **kwargs)  # clone: it writes fp32 input
        fused = fused_vocab_parallel_cross_entropy(z.clone(), targets,
                                                   parallel_state.get_tensor_model_parallel_group())
    finally:
        parallel_state.destroy_model_parallel()
    return terms.logp, ce, fused


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logprob_equals_minus_megatron_cross_entropy(pool, tp):
    vocab = 1024  # a multiple of tp: Megatron's CE has no notion of padding
    inputs = make_inputs(60, (8, 2), vocab)
    for logp, ce, fused in pool.run(megatron_peer, tp, inputs, vocab):
        assert torch.allclose(logp, -ce, rtol=1e-5, atol=1e-5)
        assert torch.allclose(logp, -fused, rtol=1e-5, atol=1e-5)
