"""Start-up and the machinery every command shares.

`startup` brings up the process group and Megatron's model-parallel groups and
returns a `ParallelContext` (context.py), which is passed down to whatever
needs to know the layout, instead of each module asking Megatron's global
`parallel_state`. `sharding` is the one rule for splitting a global batch over
data-parallel ranks; `pipeline` runs Megatron's pipeline schedule for every
command (distillation, supervised training, evaluation, the variance tool).
"""
