"""Text-side data: tokenizers and prompt datasets (token ids out).

`load_tokenizer` / `check_compatible` (tokenizer.py) and `load_prompt_dataset`
(prompts.py). The tensor side (rollouts, collation) lives in
`vopd_megatron.training.data`.
"""
from .prompts import load_prompt_dataset
from .tokenizer import Fingerprint, Tokenizer, check_compatible, load_tokenizer

__all__ = ["Fingerprint", "Tokenizer", "check_compatible", "load_prompt_dataset", "load_tokenizer"]
