"""In-process rollouts: sample completions from the student's own weights (docs/rollout.md)."""
from .sampler import RolloutSampler
from .sampling import Completion, SamplingConfig, policy_logits, truncate
from .source import OnPolicyRolloutSource

__all__ = ["Completion", "OnPolicyRolloutSource", "RolloutSampler", "SamplingConfig", "policy_logits", "truncate"]
