"""Text-side data: tokenizers and prompt datasets (token ids out).

`load_tokenizer` / `check_compatible` / `check_vocab_fits` (tokenizer.py),
`load_prompt_dataset` (prompts.py), and the per-record checks every data
reader shares (checks.py). Rollouts live in `vopd_megatron.rollout`
(`rollout.types`, `rollout.file_source`), their collation into tensors in
`vopd_megatron.training.batch`.
"""
from .prompts import load_prompt_dataset
from .tokenizer import Fingerprint, Tokenizer, check_compatible, check_vocab_fits, load_tokenizer

__all__ = ["Fingerprint", "Tokenizer", "check_compatible", "check_vocab_fits", "load_prompt_dataset",
           "load_tokenizer"]
