"""On-policy distillation with a control-variate baseline (vOPD) for Megatron-Core."""
import logging
import re
import warnings

# Notices that Megatron-Core and torch print while being imported, about optional
# components this package does not use: NVIDIA Apex (never a dependency: PyPI's `apex`
# is an unrelated project), Transformer Engine where it is absent (the pure-PyTorch
# path runs instead, docs/training.md), and a CUDA toolkit directory without a CUDA
# runtime. They put a dozen lines in front of every command's output, a one-line
# `error:` included; only these exact notices are dropped.
_IMPORT_NOTICES = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "Only transformer-engine>=1.7.0 supports MoE experts",
    "MimoModelConfig is experimental",
)
for _text in _IMPORT_NOTICES:
    warnings.filterwarnings("ignore", message=re.escape(_text), category=UserWarning)


class _NoCudaRuntimeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())
