"""The OPD / vOPD loss family: reference, vocab-parallel implementation, API."""
from .api import vocab_parallel_opd_loss, vocab_parallel_token_terms
from .config import LOSS_MODES, SAMPLED_MODES, TOPK_MODES, LossConfig
from .reference import reference_loss, reference_token_terms
from .terms import TokenTerms, reduce_token_terms, summarize_metrics

__all__ = [
    "LOSS_MODES", "SAMPLED_MODES", "TOPK_MODES", "LossConfig", "TokenTerms",
    "reduce_token_terms", "reference_loss", "reference_token_terms",
    "summarize_metrics", "vocab_parallel_opd_loss", "vocab_parallel_token_terms",
]
