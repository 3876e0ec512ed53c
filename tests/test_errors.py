"""Bad input fails early with an error that names the problem."""
import pytest
import torch

from vopd_megatron.loss import LossConfig, vocab_parallel_opd_loss


def inputs(n=4, v=16):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, v, generator=g)
    u = torch.randn(n, 2, v, generator=g)
    return z, u, torch.randint(0, v, (n, 2), generator=g), torch.ones(n, 2)


def test_valid_call_passes():
    z, u, a, m = inputs()
    loss_sum, num_tokens, _ = vocab_parallel_opd_loss(z, u, a, m, LossConfig())
    assert torch.isfinite(loss_sum) and int(num_tokens) == 8


def test_shape_mismatch_between_student_and_teacher():
    z, u, a, m = inputs()
    with pytest.raises(ValueError, match="student and teacher logit shards differ in shape"):
        vocab_parallel_opd_loss(z, u[..., :15], a, m, LossConfig())


@pytest.mark.parametrize("bad", [16, 99, -1])
def test_target_outside_true_vocab(bad):
    z, u, a, m = inputs()
    a[1, 0] = bad
    with pytest.raises(ValueError, match=rf"target ids \[{bad}\] outside the true vocabulary \[0, 16\)"):
        vocab_parallel_opd_loss(z, u, a, m, LossConfig())


def test_target_at_or_past_true_vocab_inside_padding():
    z, u, a, m = inputs()
    a[0, 0] = 14  # a padded column: the true vocabulary is 14
    with pytest.raises(ValueError, match="outside the true vocabulary"):
        vocab_parallel_opd_loss(z, u, a, m, LossConfig(), vocab_size=14)


def test_masked_targets_are_not_checked():
    z, u, a, m = inputs()
    a[0, 0], m[0, 0] = -100, 0  # Megatron-style ignore index on a masked token
    vocab_parallel_opd_loss(z, u, a, m, LossConfig())


def test_true_vocab_larger_than_padded():
    z, u, a, m = inputs()
    with pytest.raises(ValueError, match=r"true vocab size 17 must be in \[1, 16\]"):
        vocab_parallel_opd_loss(z, u, a, m, LossConfig(), vocab_size=17)


@pytest.mark.parametrize("name", ["mask", "targets"])
def test_wrong_shape_of_mask_or_targets(name):
    z, u, a, m = inputs()
    if name == "mask":
        m = m.t()
    else:
        a = a[:, :1]
    with pytest.raises(ValueError, match=("loss_mask" if name == "mask" else "targets") + " has shape"):
        vocab_parallel_opd_loss(z, u, a, m, LossConfig())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_teacher_on_real_columns(value):
    z, u, a, m = inputs()
    u[2, 1, 5] = value
    with pytest.raises(ValueError, match="non-finite teacher logits on real vocabulary columns"):
        vocab_parallel_opd_loss(z, u, a, m, LossConfig(mode="full_kl"))


def test_non_finite_teacher_on_padded_columns_is_fine():
    z, u, a, m = inputs()
    u[..., 14:] = float("nan")
    a = a.clamp(max=13)
    loss_sum, _, _ = vocab_parallel_opd_loss(z, u, a, m, LossConfig(), vocab_size=14)
    assert torch.isfinite(loss_sum)


def test_missing_side_inputs():
    z, u, a, m = inputs()
    with pytest.raises(ValueError, match="needs behavior_logprobs"):
        vocab_parallel_opd_loss(z, u, a, m, LossConfig(rollout_correction="truncate"))
    with pytest.raises(ValueError, match="ppo_clip needs old_logprobs"):
        vocab_parallel_opd_loss(z, u, a, m, LossConfig(ppo_clip=0.2))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "reinforce"}, "unknown loss mode 'reinforce'"),
        ({"mode": "vopd_topk"}, "needs top_k"),
        ({"mode": "topk_kl", "top_k": 0}, "top_k must be a positive integer"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"rollout_correction": "clip"}, "unknown rollout_correction"),
        ({"ppo_clip": 1.5}, "ppo_clip must be in"),
        ({"mode": "full_kl", "ppo_clip": 0.2}, "ppo_clip applies to sampled modes"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)
