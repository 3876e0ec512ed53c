"""Where a run's rollouts come from: sampled on-policy from the student, or read from a file."""
from __future__ import annotations

from ..rollout.sampler import RolloutSampler
from ..rollout.sampling import SamplingConfig
from ..rollout.source import OnPolicyRolloutSource
from .inputs import RunInputs, run_eos_id


def rollout_sampling_config(run, tokenizer) -> SamplingConfig:
    """How training rollouts are sampled: at the loss temperature, with the
    --rollout-* limits and filters, EOS and stop strings."""
    d = run.data
    return SamplingConfig(
        max_new_tokens=d.rollout_max_new_tokens, temperature=run.distill.vopd_temperature,
        top_k=d.rollout_top_k, top_p=d.rollout_top_p, eos_id=run_eos_id(run, tokenizer),
        max_batch_size=d.rollout_batch_size, stop_strings=run.data_stop_strings(),
    )


def rollout_source(run, models, inputs: RunInputs):
    """On-policy sampling from the student (--prompt-data) or a rollout file (--rollout-data)."""
    if inputs.rollout_file is not None:
        return inputs.rollout_file
    sampler = RolloutSampler(models.student, rollout_sampling_config(run, inputs.tokenizer), run.model.vocab_size,
                             loss_mode=run.distill.vopd_loss, tokenizer=inputs.tokenizer)
    return OnPolicyRolloutSource(sampler, inputs.prompts, seed=run.train.seed, sources=inputs.prompt_rows)
