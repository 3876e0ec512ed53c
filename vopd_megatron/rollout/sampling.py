"""Sampling configuration and stop logic: what both backends and the front end share.

A leaf of the rollout package: the backends (`engine.py`, `loop.py`) and the
front end (`sampler.py`) import it, it imports none of them.

- `SamplingConfig`: how completions are sampled, validated on construction.
- `policy_logits`: the sampled distribution is `softmax(z / tau)` over the
  *true* vocabulary (Megatron pads V; padded columns are set to -inf), fp32.
  The returned log-probs are `log mu(a)` of exactly that distribution, at the
  temperature the loss uses (`LossConfig.temperature`), so they can feed the
  rollout correction of DESIGN §2. (With top-k/top-p the draw is filtered but
  the log-prob is still the unfiltered one, as in Megatron.)
- `truncate`: a completion ends after its first EOS, stop sequence or stop
  string (matched on the decoded text; the token that completes it and all
  before it are kept); one with neither within `max_new_tokens` is kept whole and
  flagged `hit_max_length`. `with_stop_string_hints` adds each stop string's
  own encoding to the token stop sequences, so generation can end early.
- `mix_seed`: the seeds of the sampler's generators, from integers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

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
