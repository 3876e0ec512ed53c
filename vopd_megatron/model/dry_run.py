"""`vopd-train --dry-run`: validate a layout and estimate its memory per GPU, without a GPU.

`dry_run_report` validates the RunConfig for the world size, then, stage by
stage, counts the parameters on tensor-parallel rank 0 of the stage twice --
by Megatron's formula and by building both models on the meta device
(model/param_count.py) -- and estimates the memory each GPU of the stage
needs (model/memory_estimate.py, where the formulas are explained).
`format_report` prints the per-stage table and whether the fullest stage fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, RunConfig
from ..config.megatron_args import megatron_transformer_config
from .memory_estimate import formulas, stage_memory
from .param_count import meta_builds, meta_counts, stage_param_count

GiB = 1 << 30


@dataclass
class StageReport:
    """One pipeline stage, as seen by tensor-parallel rank 0 of it; memory in bytes."""

    stage: int
    student_layers: int
    teacher_layers: int
    student_params: int
    """Parameters on this GPU, trainable (meta-built count)."""
    teacher_params: int
    """Parameters on this GPU, frozen (meta-built count)."""
    student_params_formula: int
    teacher_params_formula: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


@dataclass
class DryRunReport:
    world_size: int
    num_nodes: int | None
    tp: int
    pp: int
    dp: int
    num_microbatches: int
    micro_batch_size: int
    seq_length: int
    stages: list[StageReport]
    student_total_params: int
    """Whole model, every parameter once (the tied output copy of the last stage not counted)."""
    teacher_total_params: int
    formulas: list[str] = field(default_factory=list)
    """The memory formulas with this run's constants filled in."""
    notes: list[str] = field(default_factory=list)

    @property
    def formula_matches(self) -> bool:
        return all(s.student_params == s.student_params_formula and s.teacher_params == s.teacher_params_formula
                   for s in self.stages)

    @property
    def peak(self) -> StageReport:
        return max(self.stages, key=lambda s: s.total)

    def fits(self, gpu_memory_gb: float) -> bool:
        """The fullest stage's estimate is within `gpu_memory_gb` GiB."""
        return self.peak.total <= gpu_memory_gb * GiB


def dry_run_report(config: RunConfig, world_size: int, num_nodes: int | None = None, *,
                   flash_attention: bool = True) -> DryRunReport:
    """Validate `config` for `world_size` GPUs and estimate memory per GPU, stage by stage.

    No process group is needed, no GPU is touched, no weight is allocated.
    num_nodes: nodes of the run, to check that tensor-parallel groups stay inside one.
    flash_attention: the run uses fused attention (Transformer Engine on a GPU);
        False counts the [a, s, s] scores of Megatron's local core attention.
    """
    config.validate(world_size)
    p, t = config.parallel, config.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp, micro = config.data_parallel_size(world_size), config.num_microbatches(world_size)
    notes = _layout_notes(config, world_size, num_nodes)
    stages, student_total, teacher_total = [], 0, 0
    with meta_builds():
        # Without Megatron's pseudo-free, a stage keeps each sent tensor until its backward.
        keeps_sent = not megatron_transformer_config(config.model, p, t).deallocate_pipeline_outputs
        s_layers, t_layers = config.model.pipeline_stage_layers(pp), config.teacher.pipeline_stage_layers(pp)
        for stage in range(pp):
            s_local, s_full = meta_counts(config.model, config, stage)
            t_local, t_full = meta_counts(config.teacher, config, stage)
            student_total, teacher_total = student_total + s_full, teacher_total + t_full
            mem = stage_memory(config, stage, s_local, t_local, dp, micro, flash_attention, keeps_sent)
            stages.append(StageReport(
                stage, s_layers[stage], t_layers[stage], s_local, t_local,
                stage_param_count(config.model, tp, pp, stage), stage_param_count(config.teacher, tp, pp, stage),
                **mem,
            ))
    return DryRunReport(world_size, num_nodes, tp, pp, dp, micro, t.micro_batch_size, config.model.seq_length,
                        stages, student_total, teacher_total, formulas(config, dp, flash_attention, keeps_sent),
                        notes)


def _layout_notes(config: RunConfig, world_size: int, num_nodes: int | None) -> list[str]:
    tp = config.parallel.tensor_model_parallel_size
    if num_nodes is None:
        return []
    if num_nodes < 1 or world_size % num_nodes:
        raise ConfigError(f"world size {world_size} is not a multiple of --num-nodes {num_nodes}")
    per_node = world_size // num_nodes
    if per_node % tp:
        return [f"TP {tp} groups span nodes ({per_node} GPUs per node): tensor-parallel traffic leaves NVLink"]
    return []


# --- report --------------------------------------------------------------------------------


def format_report(report: DryRunReport, gpu_memory_gb: float = 80.0) -> str:
    """The per-stage table `vopd-train --dry-run` prints; `gpu_memory_gb` in GiB for the verdict."""
    r = report
    nodes = f" on {r.num_nodes} nodes x {r.world_size // r.num_nodes} GPUs" if r.num_nodes else ""
    lines = [
        f"layout: {r.world_size} GPUs{nodes} = TP {r.tp} x PP {r.pp} x DP {r.dp}; "
        f"{r.num_microbatches} microbatches of {r.micro_batch_size} x {r.seq_length} tokens per DP rank",
        f"{'stage':>5} {'layers S/T':>10} {'params S/GPU':>15} {'params T/GPU':>15} | {'GiB/GPU:':<8}"
        f"{'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'logits':>7} {'total':>7}",
    ]
    for s in r.stages:
        gib = [x / GiB for x in (s.weights, s.grads, s.optimizer, s.activations, s.logits, s.total)]
        lines.append(
            f"{s.stage:>5} {f'{s.student_layers}/{s.teacher_layers}':>10} {s.student_params:>15,} "
            f"{s.teacher_params:>15,} | {'':<8}" + " ".join(f"{x:>{w}.1f}" for x, w in zip(gib, (8, 7, 7, 7, 7, 7)))
        )
    check = "matches" if r.formula_matches else "DIFFERS from"
    peak = r.peak
    verdict = "fits" if r.fits(gpu_memory_gb) else "does NOT fit"
    lines += [
        f"totals: student {r.student_total_params:,} params ({r.student_total_params / 1e9:.2f} B, trainable), "
        f"teacher {r.teacher_total_params:,} ({r.teacher_total_params / 1e9:.2f} B, frozen)",
        f"parameter formula {check} the meta-device build on every stage",
        f"peak: stage {peak.stage} needs {peak.total / GiB:.1f} GiB of {gpu_memory_gb:g} GiB per GPU: {verdict}"
        " (CUDA context, NCCL buffers and fragmentation not included)",
    ]
    lines += ["memory per GPU, bytes:"] + [f"  {f}" for f in r.formulas]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
