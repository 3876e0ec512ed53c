"""The "engine" backend: Megatron-Core's static-batch controller on the training module.

`TextGenerationController.generate_all_output_tokens_static_batch` runs
prefill + KV-cached decode through a `GPTInferenceWrapper` around the very
module training uses. It is called directly rather than through
`StaticInferenceEngine`, whose `generate` only adds a scheduler, a progress bar,
and `torch.random.manual_seed(1234)` on the *global* generator (which would
reset the training RNG streams), and whose 0.19 constructor first tries to build
the dynamic engine (flash_attn) and leaves `InferenceMode` set.

Three behaviours of Megatron's static controller are adjusted, each in one place:

1. Its log-probs are `log_softmax(z)` at temperature 1 over the padded
   vocabulary, and it samples from the padded vocabulary too.
   `_PolicyLogitsWrapper` hands the controller `policy_logits` (z / tau, padded
   columns -inf) and the controller runs at temperature 1, so draws and
   log-probs are both those of softmax(z / tau) over the true vocabulary.
   (top-k / top-p act on z / tau, which is what Megatron does after its own
   division by tau.)
2. It stops on `tokenizer.eod` only (not `termination_id`) and its length
   counter excludes the EOS token, so the EOS and its log-prob would be lost.
   `_RolloutController.update_generation_status` counts the EOS / last stop
   token and also stops on stop sequences; `truncate` in sampling.py has the
   final word either way.
3. Its sampling generator is seeded once from the model config; here it is
   the sampler's generator, seeded per `generate` call.

Pipeline parallelism (PP > 1) uses the controller's own pipeline path: every
stage runs `generate` together, activations go stage to stage by send/recv,
the last stage's policy logits are broadcast to all stages and each stage
draws the same tokens from the same seeded generator (tested against PP = 1
on the same weights: identical tokens and log-probs).

The KV cache lives in a `StaticInferenceContext` built per batch and cleared
when the batch returns.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)

from .sampling import SamplingConfig, policy_logits


class _IdTokenizer:
    """The controller only needs `eod` (stop + padding id) and a detokenizer for its text fields."""

    def __init__(self, eod: int):
        self.eod = eod
        self.bos = None

    def tokenize(self, text):
        raise NotImplementedError("rollout prompts are token ids")

    def detokenize(self, ids, **kwargs) -> str:
        return ""


class _PolicyLogitsWrapper(GPTInferenceWrapper):
    """GPTInferenceWrapper whose logits are the sampling policy's (see module docstring, 1)."""

    temperature: float = 1.0
    true_vocab_size: int = 0

    def run_one_forward_step(self, inference_input, *args, **kwargs):
        logits = super().run_one_forward_step(inference_input, *args, **kwargs)  # [b, s, V_padded]
        if logits is None:  # not the last pipeline stage
            return None
        z = policy_logits(logits, self.temperature, self.true_vocab_size)  # fp32
        if getattr(self, "model_is_pipeline_parallel", False):
            # The controller broadcasts the last stage's logits to every stage in
            # the model's params_dtype (asserted): with bf16 params the policy
            # logits are rounded to bf16 first (all stages still draw the same tokens).
            config = getattr(self, "config", None)
            z = z.to(config.params_dtype if config is not None else logits.dtype)
        return z


class _RolloutController(TextGenerationController):
    """Counts the stopping token and stops on EOS or a stop sequence (module docstring, 2)."""

    eos_id: int | None = None
    stop_sequences: tuple = ()

    def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                 is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
        pos = current_context_end_position
        latest = updated_prompts_tokens[:, pos]  # [b]
        counting = generation_started & ~is_generation_done_tensor  # [b] rows that produced a kept token
        lengths = generated_sequence_lengths + counting  # [b], includes this token
        hit = torch.zeros_like(counting)
        if self.eos_id is not None:
            hit |= latest == self.eos_id
        for seq in self.stop_sequences:
            n = len(seq)
            if pos + 1 >= n:
                window = updated_prompts_tokens[:, pos + 1 - n : pos + 1]  # [b, n]
                target = torch.tensor(seq, dtype=window.dtype, device=window.device)
                hit |= (window == target).all(dim=1) & (lengths >= n)  # inside the completion only
        return is_generation_done_tensor | (hit & counting), lengths.int()


def _wrapper(model, context):
    try:  # megatron-core 0.16: GPTInferenceWrapper(model, InferenceWrapperConfig, context)
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )
    except ImportError:  # 0.17+: the wrapper reads the model's config
        return _PolicyLogitsWrapper(model, context)
    from megatron.core.utils import get_model_config, unwrap_model

    cfg = get_model_config(model)
    inner = unwrap_model(model)
    wrapper_config = InferenceWrapperConfig(
        hidden_size=cfg.hidden_size, inference_batch_times_seqlen_threshold=-1,
        fp32_residual_connection=cfg.fp32_residual_connection, params_dtype=cfg.params_dtype,
        padded_vocab_size=inner.vocab_size,
    )
    return _PolicyLogitsWrapper(model, wrapper_config, context)


def engine_generate(model, prompts: list[list[int]], config: SamplingConfig, vocab_size: int,
                    generator: torch.Generator) -> list[tuple[list[int], list[float]]]:
    """Raw completions (up to max_new_tokens, stop token included) and their log-probs."""
    context = StaticInferenceContext(
        max_batch_size=len(prompts), max_sequence_length=max(map(len, prompts)) + config.max_new_tokens,
    )
    wrapper = _wrapper(model, context)
    wrapper.temperature, wrapper.true_vocab_size = config.temperature, vocab_size
    # eod pads the batch and is the controller's own stop id; -1 is never sampled.
    eod = config.eos_id if config.eos_id is not None else -1
    controller = _RolloutController(inference_wrapped_model=wrapper, tokenizer=_IdTokenizer(eod))
    controller.eos_id, controller.stop_sequences = config.eos_id, config.stop_sequences
    if hasattr(controller, "sampling_rng"):
        controller.sampling_rng = generator
    params = SamplingParams(
        temperature=1.0,  # already applied by the wrapper
        top_k=config.top_k, top_p=float(config.top_p),
        return_log_probs=True, num_tokens_to_generate=config.max_new_tokens,
    )
    requests = OrderedDict(
        (i, InferenceRequest(request_id=i, prompt="", sampling_params=params, prompt_tokens=list(p)))
        for i, p in enumerate(prompts)
    )
    try:
        if hasattr(controller, "sampling_rng"):
            done = controller.generate_all_output_tokens_static_batch(requests)
        else:  # older controllers draw from the global generator: fork it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                done = controller.generate_all_output_tokens_static_batch(requests)
        out = []
        for i in range(len(prompts)):
            r = done[i]
            out.append(([int(t) for t in r.generated_tokens], [float(x) for x in r.generated_log_probs]))
        return out
    finally:
        context.key_value_memory_dict.clear()  # free the KV cache now, not at garbage collection
