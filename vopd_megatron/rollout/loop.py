"""The "loop" backend: sampling with plain full forwards of the model, no KV cache.

Each step runs the model over every row's tokens so far (right-padded; the
causal mask keeps padding out of earlier positions), takes each row's logits at
its last position (gathered over TP by the model's `runtime_gather_output`),
and draws one token per row with `torch.multinomial` from `policy_logits`.
Every TP rank holds the same gathered logits and the same seeded generator, so
all draw the same tokens. Cost is O(n^2) in the completion length: this is the
reference the engine is tested against and a fallback, not the fast path.
"""
from __future__ import annotations

import torch

from ..model.masks import causal_mask
from .sampling import SamplingConfig, policy_logits, stop_position


def loop_generate(model, prompts: list[list[int]], config: SamplingConfig, vocab_size: int,
                  generator: torch.Generator) -> list[tuple[list[int], list[float]]]:
    """Raw completions (up to max_new_tokens, stop token included) and their log-probs."""
    device = generator.device
    b, n = len(prompts), config.max_new_tokens
    prompt_len = torch.tensor([len(p) for p in prompts], device=device)  # [b]
    tokens = torch.zeros(b, int(prompt_len.max()) + n, dtype=torch.long, device=device)  # [b, S]
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, device=device)
    logprobs = torch.zeros(b, n, device=device)  # [b, n]
    generated = torch.zeros(b, dtype=torch.long, device=device)  # [b] tokens kept per row
    done = torch.zeros(b, dtype=torch.bool, device=device)  # [b]
    rows = torch.arange(b, device=device)
    for step in range(n):
        length = prompt_len + step  # [b] current length of each row (done rows keep sampling, unused)
        s = int(length.max())
        positions = torch.arange(s, device=device).expand(b, s)
        logits = model(tokens[:, :s], positions, causal_mask(s, device), runtime_gather_output=True)  # [b, s, Vp]
        z = policy_logits(logits[rows, length - 1], config.temperature, vocab_size)  # [b, Vp]
        sampled = torch.multinomial(z.softmax(dim=-1), 1, generator=generator).view(-1)  # [b]
        tokens[rows, length] = sampled
        logprobs[:, step] = z.log_softmax(dim=-1).gather(1, sampled[:, None]).squeeze(1)
        generated += ~done
        for i in torch.nonzero(~done).view(-1).tolist():
            ids = tokens[i, int(prompt_len[i]) : int(prompt_len[i]) + step + 1].tolist()
            if stop_position(ids[-max([1, *map(len, config.stop_sequences)]):], config.eos_id,
                             config.stop_sequences) is not None:
                done[i] = True
        if bool(done.all()):
            break
    return [
        (tokens[i, int(prompt_len[i]) : int(prompt_len[i] + generated[i])].tolist(),
         logprobs[i, : int(generated[i])].tolist())
        for i in range(b)
    ]
