"""The reference losses against the math of DESIGN §2, by exact enumeration.

For a vocabulary of at most 16 the expectation over the sampled token is a
finite sum, so unbiasedness and per-state variance are checked exactly
(float64), not by Monte Carlo.
"""
import pytest
import torch
import torch.nn.functional as F

from vopd_megatron.loss import LossConfig, reference_loss, reference_token_terms, summarize_metrics
from vopd_megatron.loss.reference import optimal_baseline
from vopd_megatron.loss.variance import estimator_variance, sampled_baselines

SAMPLED = ("opd", "vopd", "vopd_topk", "vopd_opt")


def random_state(vocab, scale, distance, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(vocab, generator=g, dtype=torch.float64) * scale
    u = z + torch.randn(vocab, generator=g, dtype=torch.float64) * distance
    return z, u


def per_token_gradients(z, u, config, vocab_size=None):
    """Gradient of the token loss wrt z for every possible sampled token: [V, Vp]."""
    vocab = z.shape[-1] if vocab_size is None else vocab_size
    grads = []
    for a in range(vocab):
        zz = z.clone().requires_grad_()
        terms = reference_token_terms(zz[None], u[None], torch.tensor([a]), torch.ones(1), config,
                                      vocab_size=vocab_size)
        terms.token_loss.sum().backward()
        grads.append(zz.grad)
    return torch.stack(grads)


def full_kl_gradient(z, u, config, vocab_size=None):
    zz = z.clone().requires_grad_()
    terms = reference_token_terms(zz[None], u[None], torch.tensor([0]), torch.ones(1),
                                  LossConfig(mode="full_kl", temperature=config.temperature),
                                  vocab_size=vocab_size)
    terms.token_loss.sum().backward()
    return zz.grad


STATES = [(v, s, d, seed) for v in (2, 5, 16) for s in (1.0, 6.0) for d in (0.5, 3.0) for seed in (0, 1)]


@pytest.mark.parametrize("vocab,scale,distance,seed", STATES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_modes_are_unbiased_and_variance_matches_closed_form(vocab, scale, distance, seed, temperature):
    z, u = random_state(vocab, scale, distance, seed)
    target = full_kl_gradient(z, u, LossConfig(temperature=temperature))
    p = torch.softmax(z / temperature, -1)
    logp, logq = (z / temperature).log_softmax(-1), (u / temperature).log_softmax(-1)
    baselines = sampled_baselines(logp, logq, top_k=3)
    variances = {}
    for mode in SAMPLED:
        g = per_token_gradients(z, u, LossConfig(mode=mode, top_k=3, temperature=temperature))  # [V, V]
        mean = (p[:, None] * g).sum(0)
        assert torch.allclose(mean, target, rtol=0, atol=1e-10), (mode, (mean - target).abs().max())
        enumerated = (p * ((g - mean) ** 2).sum(-1)).sum()
        # The closed form is for the gradient wrt tempered logits: d/dz = (1/tau) d/d(z/tau).
        closed = estimator_variance(logp, logq, baselines[mode]) / temperature**2
        assert torch.allclose(enumerated, closed, rtol=1e-9, atol=1e-12), (mode, enumerated, closed)
        variances[mode] = closed
    for mode in SAMPLED:
        assert variances["vopd_opt"] <= variances[mode] * (1 + 1e-12) + 1e-15, (mode, variances)


def test_topk_kl_is_biased():
    z, u = random_state(16, 2.0, 2.0, seed=3)
    full = full_kl_gradient(z, u, LossConfig())
    zz = z.clone().requires_grad_()
    reference_token_terms(zz[None], u[None], torch.tensor([0]), torch.ones(1),
                          LossConfig(mode="topk_kl", top_k=4)).token_loss.sum().backward()
    assert (zz.grad - full).abs().max() > 1e-3
    # Outside the top-k set it gives no gradient at all, unlike the true one.
    outside = z.argsort()[:12]
    assert torch.all(zz.grad[outside] == 0) and (full[outside].abs() > 0).all()


def test_optimal_baseline_is_the_minimiser_and_vopd_can_raise_variance():
    """b* minimises the quadratic Var(b); and on some peaked states the KL
    baseline is worse than no baseline (why vopd_opt exists)."""
    worse = 0
    for seed in range(200):
        z, u = random_state(16, 6.0, 3.0, seed)
        logp, logq = z.log_softmax(-1), u.log_softmax(-1)
        b = optimal_baseline(logp, logq, 1e-12)
        v0 = estimator_variance(logp, logq, b)
        for db in (-1e-3, 1e-3, -1.0, 1.0):
            assert estimator_variance(logp, logq, b + db) >= v0
        worse += bool(estimator_variance(logp, logq, sampled_baselines(logp, logq)["vopd"])
                      > estimator_variance(logp, logq, torch.zeros(())))
    assert worse > 0


def test_attached_advantage_changes_the_gradient():
    """Leaving r attached adds a score term; the loss must detach it."""
    z, u = random_state(8, 2.0, 1.0, seed=4)
    a = 3
    zz = z.clone().requires_grad_()
    reference_token_terms(zz[None], u[None], torch.tensor([a]), torch.ones(1),
                          LossConfig(mode="opd")).token_loss.sum().backward()
    p = torch.softmax(z, -1)
    r_a = (z.log_softmax(-1) - u.log_softmax(-1))[a]
    expected = r_a * (F.one_hot(torch.tensor(a), 8).double() - p)
    assert torch.allclose(zz.grad, expected, atol=1e-12)
    zz2 = z.clone().requires_grad_()
    logp = zz2.log_softmax(-1)
    ((logp[a] - u.log_softmax(-1)[a]) * logp[a]).backward()  # r left attached
    assert (zz2.grad - expected).abs().max() > 1e-3


def test_full_kl_matches_torch_kl_div_and_padding_is_excluded():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 7, 40, generator=g, dtype=torch.float64)
    u = torch.randn(4, 7, 40, generator=g, dtype=torch.float64)
    z[..., 33:] = 1e3  # padded columns: must be ignored, however large
    u[..., 33:] = float("nan")
    terms = reference_token_terms(z, u, torch.zeros(4, 7, dtype=torch.long), torch.ones(4, 7),
                                  LossConfig(mode="full_kl", temperature=0.8), vocab_size=33)
    logp, logq = (z[..., :33] / 0.8).log_softmax(-1), (u[..., :33] / 0.8).log_softmax(-1)
    expected = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(terms.kl, expected, atol=1e-12)
    assert torch.allclose(terms.token_loss, expected, atol=1e-12)


def test_contract_and_metrics():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 3, 11, generator=g, dtype=torch.float64)
    u = torch.randn(5, 3, 11, generator=g, dtype=torch.float64)
    a = torch.randint(0, 11, (5, 3), generator=g)
    mask = torch.ones(5, 3)
    mask[0] = 0
    mask[3, 1] = 0
    loss_sum, num_tokens, metrics = reference_loss(z, u, a, mask, LossConfig(mode="vopd"))
    assert num_tokens.dtype == torch.int and int(num_tokens) == 11
    logp, logq = z.log_softmax(-1), u.log_softmax(-1)
    r = (logp - logq).gather(-1, a[..., None]).squeeze(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    keep = mask.bool()
    lp_a = logp.gather(-1, a[..., None]).squeeze(-1)
    assert torch.allclose(loss_sum, ((r - kl) * lp_a)[keep].sum())
    s = summarize_metrics(metrics)
    assert s["log_ratio"] == pytest.approx(float(r[keep].mean()), rel=1e-6)
    assert s["kl"] == pytest.approx(float(kl[keep].mean()), rel=1e-6)
    assert s["advantage"] == pytest.approx(float((kl - r)[keep].mean()), rel=1e-6)
    ev = 1 - (r - kl)[keep].var(unbiased=False) / r[keep].var(unbiased=False)
    assert s["baseline_explained_variance"] == pytest.approx(float(ev), rel=1e-5, abs=1e-6)
    # Two microbatches summarise to the statistics of their union.
    m1, m2 = mask.clone(), mask.clone()
    m1[2:] = 0
    m2[:2] = 0
    parts = [reference_loss(z, u, a, m, LossConfig(mode="vopd"))[2] for m in (m1, m2)]
    s12 = summarize_metrics(parts)
    for key in s:
        assert s12[key] == pytest.approx(s[key], rel=1e-6, abs=1e-9)


def test_rollout_correction_and_ppo_clip():
    g = torch.Generator().manual_seed(7)
    n = 40
    z = torch.randn(n, 9, generator=g, dtype=torch.float64)
    u = torch.randn(n, 9, generator=g, dtype=torch.float64)
    a = torch.randint(0, 9, (n,), generator=g)
    lp_a = z.log_softmax(-1).gather(-1, a[:, None]).squeeze(-1)
    behavior = lp_a + torch.linspace(-2.0, 1.0, n, dtype=torch.float64)
    cap = 2.0
    ratio = torch.exp(lp_a - behavior)
    plain = reference_token_terms(z, u, a, torch.ones(n), LossConfig(mode="vopd"))
    trunc = reference_token_terms(z, u, a, torch.ones(n), LossConfig(mode="vopd", rollout_correction="truncate",
                                  rollout_correction_cap=cap), behavior_logprobs=behavior)
    assert torch.allclose(trunc.token_loss, plain.token_loss * ratio.clamp(max=cap))
    masked = reference_token_terms(z, u, a, torch.ones(n), LossConfig(mode="vopd", rollout_correction="mask",
                                   rollout_correction_cap=cap), behavior_logprobs=behavior)
    assert torch.equal(masked.mask, (ratio <= cap).double())
    # PPO: at ratio 1 the gradient is the plain one; far outside the clip it vanishes.
    cfg = LossConfig(mode="vopd", ppo_clip=0.2)
    grads = []
    for old in (lp_a.detach(), lp_a.detach() - 5.0, lp_a.detach() + 5.0):
        zz = z.clone().requires_grad_()
        reference_token_terms(zz, u, a, torch.ones(n), cfg, old_logprobs=old).token_loss.sum().backward()
        grads.append(zz.grad)
    zz = z.clone().requires_grad_()
    reference_token_terms(zz, u, a, torch.ones(n), LossConfig(mode="vopd")).token_loss.sum().backward()
    assert torch.allclose(grads[0], zz.grad, atol=1e-12)
    cost = plain.log_ratio - plain.baseline
    assert (cost > 0).any() and (cost < 0).any()
    # Ratio e^5 >> 1 + eps: clipped (no gradient) where the advantage -cost is
    # positive; ratio e^-5: clipped where it is negative. PPO never clips a
    # term that makes the objective worse.
    assert torch.all(grads[1][cost < 0] == 0) and torch.all(grads[2][cost > 0] == 0)
    assert grads[1][cost > 0].abs().sum() > 0 and grads[2][cost < 0].abs().sum() > 0


def test_rollout_logprob_gap_metric():
    """With behaviour log-probs, the metrics report the trainer/engine gap mean(log p(a) - log mu(a))."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64)
    u = torch.randn(5, 7, generator=g, dtype=torch.float64)
    a = torch.randint(0, 7, (5,), generator=g)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    lp_a = z.log_softmax(-1).gather(-1, a[:, None]).squeeze(-1)
    behavior = lp_a + torch.tensor([0.1, -0.3, 5.0, 0.25, 0.0], dtype=torch.float64)  # 5.0 is masked
    s = summarize_metrics(reference_loss(z, u, a, mask, LossConfig(), behavior_logprobs=behavior)[2])
    # Metrics are fp32 sums: compare at fp32 precision.
    assert s["rollout_logprob_gap"] == pytest.approx((-0.1 + 0.3 - 0.25 - 0.0) / 4, abs=1e-6)
    assert s["rollout_logprob_abs_gap"] == pytest.approx((0.1 + 0.3 + 0.25 + 0.0) / 4, abs=1e-6)
    assert "rollout_logprob_gap" not in summarize_metrics(reference_loss(z, u, a, mask, LossConfig())[2])
