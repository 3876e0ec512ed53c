"""The thin layer that touches Megatron-Core: CPU compatibility and adapters."""
