"""The attention mask of a causal language model, as Megatron-Core's GPTModel takes it."""
from __future__ import annotations

import torch


def causal_mask(seq_length: int, device) -> torch.Tensor:
    """[1, 1, s, s] bool, True where attention is masked (Megatron's convention)."""
    return torch.triu(torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device), 1)
