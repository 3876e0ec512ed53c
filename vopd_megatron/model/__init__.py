"""Model construction from Megatron-LM-named configuration."""
