"""In-process rollouts on the student's own weights (DESIGN §1 step 1, §4).

`RolloutSampler(student_chunks, SamplingConfig(...), vocab_size).generate(prompts, seed)`
returns one `Completion` per prompt. It runs on the training module itself
(the DDP wrapper is stripped, the parameters are the same tensors): there is
no weight copy to refresh after an optimizer step.

Two backends sit under one front end, so everything that decides *what* is
sampled and *what* is returned is shared:

- `"engine"` (default): Megatron-Core's static-batch `TextGenerationController`
  + `GPTInferenceWrapper` with a KV cache (`engine.py`). Works on CPU with
  `cpu_compat`; the dynamic engine needs flash_attn and is not used.
- `"loop"`: a plain loop of full forwards, no KV cache (`loop.py`). The
  reference the engine is tested against, and a fallback where the engine
  cannot run. Unfiltered sampling only.

Shared by both:

- `policy_logits` (the sampled distribution and its log-probs) and `truncate`
  (where a completion ends), with `SamplingConfig`, in `sampling.py`.
- Seeding: one `torch.Generator` per static batch, seeded from `(seed, index
  of the batch's first prompt)` on every TP rank (so a batch's draws do not
  depend on when an earlier batch stopped). The logits are gathered over the
  TP group (bitwise identical on its ranks), so every TP rank draws the same
  tokens. All ranks of a TP group must call
  `generate` with the same prompts and seed (the forward has collectives).
- `_generation_state`: eval mode while generating, every module's training
  flag restored afterwards, Megatron 0.19's process-global `InferenceMode`
  unset (MEGATRON_ON_CPU.md trap 5), the global RNG untouched, the KV cache
  dropped (and the CUDA cache emptied) when the call returns.

Pipeline parallelism (PP > 1): engine backend only (Megatron's controller pipeline path, see engine.py).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..loss.config import SAMPLED_MODES
from .sampling import Completion, SamplingConfig, mix_seed, truncate, with_stop_string_hints


def _strip_ddp(module):
    """The module under Megatron's (or torch's) DDP wrapper; Float16Module stays (it casts)."""
    from megatron.core.distributed import DistributedDataParallel

    while isinstance(module, (DistributedDataParallel, torch.nn.parallel.DistributedDataParallel)):
        module = module.module
    return module


def _inference_mode_flag():
    """Megatron 0.19's process-global InferenceMode class, or None (0.16 has none)."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return None
    return InferenceMode


@contextlib.contextmanager
def _generation_state(model: torch.nn.Module, inference_mode: bool):
    """Eval mode and no autograd inside; training flags, InferenceMode and the RNG restored after."""
    flags = [(m, m.training) for m in model.modules()]
    flag = _inference_mode_flag()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    try:
        if flag is not None and inference_mode:
            flag.set_active()
        with torch.no_grad():
            yield
    finally:
        if flag is not None:
            flag.unset_active()  # trap 5: a training forward asserts while it is set
        for m, training in flags:
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
            torch.cuda.empty_cache()  # the KV cache was freed with its context


def warn_if_biased(config: SamplingConfig, loss_mode: str | None) -> None:
    """Loud warning (warnings.warn + print on rank 0): filtered sampling biases the sampled losses."""
    if not (config.filtered and loss_mode in SAMPLED_MODES):
        return
    message = (
        f"[vopd] WARNING: rollouts sampled with top_k={config.top_k}, top_p={config.top_p} but the "
        f"loss {loss_mode!r} is a score-function estimator of the UNFILTERED policy's gradient "
        "(DESIGN §2): with filtered sampling it is biased. Use top_k=0, top_p=0.0."
    )
    warnings.warn(message, stacklevel=3)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


class RolloutSampler:
    """Samples completions from the student's current weights (this rank's model chunk).

    model_chunks: the student as training sees it (`Models.student`: a list
        with one DDP-wrapped GPTModel stage), or a bare module.
    vocab_size: the true vocabulary size (columns past it are Megatron padding).
    loss_mode: the training loss mode; filtered sampling with a sampled mode warns.
    """

    def __init__(self, model_chunks, config: SamplingConfig, vocab_size: int, loss_mode: str | None = None,
                 tokenizer=None):
        chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        if len(chunks) != 1:
            raise NotImplementedError("rollouts with virtual pipeline stages (several model chunks) "
                                      "are not supported")
        from megatron.core import parallel_state

        if config.backend == "loop" and parallel_state.model_parallel_is_initialized() and \
                parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("the 'loop' backend supports PP=1 only; the engine backend handles PP > 1")
        self.model = _strip_ddp(chunks[0])
        self.decode = None
        if config.stop_strings:
            if tokenizer is None:
                raise ValueError("stop strings need a tokenizer (set --tokenizer-model)")
            self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
            config = with_stop_string_hints(config, tokenizer)
        self.config = config
        self.vocab_size = int(vocab_size)
        from megatron.core.utils import unwrap_model

        self.max_sequence_length = getattr(unwrap_model(self.model), "max_sequence_length", None)
        warn_if_biased(config, loss_mode)

    def _validate(self, prompts: list[list[int]]) -> None:
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty (a completion needs a context)")
            if any(not 0 <= t < self.vocab_size for t in p):
                raise ValueError(f"prompt {i} has a token id outside the vocabulary [0, {self.vocab_size})")
            total = len(p) + self.config.max_new_tokens
            if self.max_sequence_length is not None and total > self.max_sequence_length:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {self.config.max_new_tokens} "
                                 f"exceed the model's max_sequence_length {self.max_sequence_length}")

    def generate(self, prompts: list[list[int]], seed: int, on_batch=None) -> list[Completion]:
        """One completion per prompt, deterministic given the weights, prompts, seed and batch size.

        on_batch: called with the number of prompts of each static batch once it is done (progress)."""
        self._validate(prompts)
        if not prompts:
            return []
        cfg = self.config
        use_engine = cfg.backend == "engine"
        if use_engine:
            from .engine import engine_generate as backend
        else:
            from .loop import loop_generate as backend
        generator_device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        generator = torch.Generator(device=generator_device)
        raw = []
        with _generation_state(self.model, inference_mode=use_engine):
            for start in range(0, len(prompts), cfg.max_batch_size):
                generator.manual_seed(mix_seed(seed, start))
                batch = [list(p) for p in prompts[start : start + cfg.max_batch_size]]
                raw += backend(self.model, batch, cfg, self.vocab_size, generator)
                if on_batch is not None:
                    on_batch(len(batch))
        return [truncate(ids, lps, cfg, self.decode) for ids, lps in raw]
