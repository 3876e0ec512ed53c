"""On-policy distillation with a control-variate baseline (vOPD) for Megatron-Core."""
