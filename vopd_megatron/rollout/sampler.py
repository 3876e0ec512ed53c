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

- `policy_logits`: the sampled distribution is `softmax(z / tau)` over the
  *true* vocabulary (Megatron pads V; padded columns are set to -inf), fp32.
  The returned log-probs are `log mu(a)` of exactly that distribution, at the
  temperature the loss uses (`LossConfig.temperature`), so they can feed the
  rollout correction of DESIGN §2. (With top-k/top-p the draw is filtered but
  the log-prob is still the unfiltered one, as in Megatron.)
- Seeding: one `torch.Generator` per static batch, seeded from `(seed, index
  of the batch's first prompt)` on every TP rank (so a batch's draws do not
  depend on when an earlier batch stopped). The logits are gathered over the
  TP group (bitwise identical on its ranks), so every TP rank draws the same
  tokens. All ranks of a TP group must call
  `generate` with the same prompts and seed (the forward has collectives).
- `truncate`: a completion ends after its first EOS, stop sequence or stop
  string (matched on the decoded text; the token that completes it and all
  before it are kept); one with neither within `max_new_tokens` is kept whole and
  flagged `hit_max_length`.
- `_generation_state`: eval mode while generating, every module's training
  flag restored afterwards, Megatron 0.19's process-global `InferenceMode`
  unset (MEGATRON_ON_CPU.md trap 5), the global RNG untouched, the KV cache
  dropped (and the CUDA cache emptied) when the call returns.

Pipeline parallelism (PP > 1): engine backend only (Megatron's controller pipeline path, see engine.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass

import torch

from ..loss.config import SAMPLED_MODES

BACKENDS = ("engine", "loop")
_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK)) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
        h ^= h >> 31
    return h & _MASK


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled; validated on construction."""

    max_new_tokens: int
    """Completion tokens at most; a completion that reaches it is kept and flagged."""

    temperature: float = 1.0
    """Sample from softmax(z / temperature); must equal the loss temperature."""

    top_k: int = 0
    """0: no top-k filtering (the default the OPD/vOPD identities need)."""

    top_p: float = 0.0
    """0.0: no nucleus filtering (the default the OPD/vOPD identities need)."""

    eos_id: int | None = None
    """End-of-sequence id: a completion stops after it (it is kept). None: no EOS."""

    stop_sequences: tuple[tuple[int, ...], ...] = ()
    """Token sequences that also end a completion (kept), matched inside the completion only."""

    stop_strings: tuple[str, ...] = ()
    """Text that ends a completion, matched on the decoded completion (needs a tokenizer
    in RolloutSampler); the completion is cut after the token that completes the string."""

    max_batch_size: int = 64
    """Prompts per static batch (rows of the KV cache)."""

    backend: str = "engine"
    """"engine" (Megatron's static controller, KV cache) or "loop" (plain forwards)."""

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if self.top_k and self.top_p:
            raise ValueError("top_k and top_p cannot both be set (Megatron's sampler allows one)")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("stop_sequences must not contain an empty sequence")
        if any(not isinstance(s, str) or s == "" for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        if self.backend == "loop" and (self.top_k or self.top_p):
            raise ValueError("the 'loop' backend samples the unfiltered policy only (top_k=0, top_p=0.0)")

    @property
    def filtered(self) -> bool:
        return bool(self.top_k or self.top_p)


@dataclass
class Completion:
    completion_ids: list[int]
    logprobs: list[float]
    """log mu(a) of each completion token: log_softmax(z / tau) over the true vocabulary."""
    hit_max_length: bool
    """No EOS / stop sequence within max_new_tokens: the completion was cut there."""


def policy_logits(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """The sampling distribution's logits: fp32 `z / tau`, padded columns -inf.

    logits: [..., V_padded] gathered over TP, read-only. Returns a new tensor.
    """
    z = logits.float() / temperature  # [..., V_padded]
    if z.shape[-1] > vocab_size:
        z[..., vocab_size:] = float("-inf")
    return z


def stop_position(ids: list[int], eos_id: int | None, stop_sequences) -> int | None:
    """Index of the last token of the first EOS / stop sequence in `ids`, or None."""
    for t in range(len(ids)):
        if eos_id is not None and ids[t] == eos_id:
            return t
        for seq in stop_sequences:
            if t + 1 >= len(seq) and tuple(ids[t + 1 - len(seq) : t + 1]) == tuple(seq):
                return t
    return None


def stop_string_position(ids: list[int], decode, stop_strings) -> int | None:
    """Index of the token that completes the first stop string in `decode(ids)`, or None.

    The text of a token prefix grows with the prefix, so the first prefix whose
    text contains a stop string is found by bisection: O(log n) decodes of
    prefixes rather than one per token."""
    if not stop_strings or not ids:
        return None

    def contains(n: int) -> bool:
        text = decode(ids[:n])
        return any(s in text for s in stop_strings)

    if not contains(len(ids)):
        return None
    lo, hi = 1, len(ids)  # contains(hi) holds; find the smallest such n
    while lo < hi:
        mid = (lo + hi) // 2
        if contains(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def truncate(ids: list[int], logprobs: list[float], config: SamplingConfig, decode=None) -> Completion:
    """Cut a raw completion after its first EOS / stop sequence / stop string, or at max_new_tokens.

    decode: token ids -> text, needed when `config.stop_strings` is set."""
    ids, logprobs = list(ids)[: config.max_new_tokens], list(logprobs)[: config.max_new_tokens]
    if len(ids) != len(logprobs):
        raise RuntimeError(f"backend returned {len(ids)} tokens but {len(logprobs)} log-probs")
    end = stop_position(ids, config.eos_id, config.stop_sequences)
    if config.stop_strings:
        if decode is None:
            raise ValueError("stop_strings need a decode function (a tokenizer)")
        text_end = stop_string_position(ids if end is None else ids[: end + 1], decode, config.stop_strings)
        if text_end is not None:
            end = text_end
    if end is not None:
        return Completion(ids[: end + 1], logprobs[: end + 1], hit_max_length=False)
    if len(ids) != config.max_new_tokens:
        raise RuntimeError(f"backend stopped after {len(ids)} < {config.max_new_tokens} tokens "
                           "without an EOS or stop sequence")
    return Completion(ids, logprobs, hit_max_length=True)


def with_stop_string_hints(config: SamplingConfig, tokenizer) -> SamplingConfig:
    """`config` whose token stop sequences also hold each stop string's own encoding.

    The engine can only stop on tokens. The canonical encoding of a stop string
    lets generation end early when the model writes the string the usual way;
    the same text written with other tokens (or inside a larger token) is still
    found by `truncate`'s text match, only generation runs on to EOS or the limit
    first. Correctness rests on the text match alone."""
    hints = []
    for text in config.stop_strings:
        ids = tuple(tokenizer.encode(text, add_special_tokens=False))
        if ids and tokenizer.decode(list(ids), skip_special_tokens=False).find(text) >= 0:
            hints.append(ids)  # only encodings whose text really contains the string
    extra = tuple(h for h in dict.fromkeys(hints) if h not in config.stop_sequences)
    return dataclasses.replace(config, stop_sequences=config.stop_sequences + extra)


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
