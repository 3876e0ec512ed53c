"""The Megatron training side: data, step, checkpoints, logging, the entry point."""
