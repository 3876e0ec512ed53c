"""The distillation step is exact under any TP x PP x DP split (issue: Megatron step).

One set of initial weights (student and a deeper, wider teacher) is written as
a TP1·PP1 dist-checkpoint and loaded, resharded, into every layout. Each
layout runs Megatron's schedule over the same global batch; its finalized
student gradients are written through the same sharded-state-dict machinery
(gradient in place of weight) and read back at TP1·PP1, so every layout's
gradient is compared tensor by tensor with a single-process autograd
computation that uses the plain reference loss.
"""
import random

import pytest
import torch
import torch.distributed as dist

from vopd_megatron.config import ModelArgs, ParallelArgs, RunConfig, TrainArgs
from vopd_megatron.loss import LossConfig, reference_loss
from vopd_megatron.rollout.types import Rollout
from vopd_megatron.training.batch import collate

VOCAB, SEQ, GLOBAL_BATCH = 250, 16, 4


def run_config(tp=1, pp=1, bf16=False, teacher_layers=4, teacher_first_stage=None):
    """Tiny student; a deeper, wider teacher (optionally with `teacher_first_stage`
    layers on the first pipeline stage and the rest on the others)."""
    student = ModelArgs(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
                        seq_length=SEQ, untie_embeddings_and_output_weights=True)
    teacher = ModelArgs(num_layers=teacher_layers, hidden_size=96, num_attention_heads=4, ffn_hidden_size=320,
                        vocab_size=VOCAB, seq_length=SEQ, untie_embeddings_and_output_weights=True,
                        decoder_first_pipeline_num_layers=teacher_first_stage if pp > 1 else None)
    return RunConfig(model=student, teacher=teacher,
                     parallel=ParallelArgs(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                     train=TrainArgs(micro_batch_size=1, global_batch_size=GLOBAL_BATCH, bf16=bf16, lr=1e-3))


def global_batch(seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(GLOBAL_BATCH):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 6))]
        completion = [rng.randrange(VOCAB) for _ in range(rng.randint(3, SEQ + 4 - len(prompt)))]
        out.append(Rollout(prompt, completion))
    return out


def my_microbatches(run, world_size):
    """This DP rank's microbatches of the global batch."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = global_batch()[rank * GLOBAL_BATCH // dp : (rank + 1) * GLOBAL_BATCH // dp]
    mbs = run.train.micro_batch_size
    return [collate(mine[i : i + mbs], SEQ) for i in range(0, len(mine), mbs)]


def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return m


def _setup(run):
    from vopd_megatron.runtime.startup import initialize_parallel
    from vopd_megatron.training.setup import build_models

    return build_models(run, initialize_parallel(run))


def _teardown():
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def make_initial_weights(student_dir, teacher_dir, **teacher):
    """TP1·PP1: save the student's and the teacher's initial weights."""
    from megatron.core import dist_checkpointing

    run = run_config(**teacher)
    models = _setup(run)
    try:
        dist_checkpointing.save(_unwrap(models.student[0]).sharded_state_dict(), student_dir)
        dist_checkpointing.save(_unwrap(models.teacher).sharded_state_dict(), teacher_dir)
    finally:
        _teardown()


def _load(module, ckpt_dir):
    from megatron.core import dist_checkpointing

    module = _unwrap(module)
    module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), ckpt_dir))


def layout_gradients(tp, pp, student_dir, teacher_dir, grad_dir, mode, **teacher):
    """One layout: load the weights, run the schedule, save grads as weights.

    The same step then runs again with the output layers fused into the loss
    (--vopd-fused-output); returns this rank's largest difference between the
    two finalized gradients, parameter by parameter (the saved ones are the
    logits path's, which the caller compares with the reference)."""
    from megatron.core import dist_checkpointing

    from vopd_megatron.training.step import forward_backward, wire_megatron_hooks

    run = run_config(tp, pp, **teacher)
    models = _setup(run)
    try:
        _load(models.student[0], student_dir)
        _load(models.teacher, teacher_dir)
        wire_megatron_hooks(models)
        microbatches = my_microbatches(run, dist.get_world_size())
        forward_backward(models, microbatches, run, LossConfig(mode=mode, top_k=5))
        student = _unwrap(models.student[0])
        logits_path = {n: p.main_grad.detach().clone() for n, p in student.named_parameters()}
        models.stages[0].fused_output = True
        forward_backward(models, microbatches, run, LossConfig(mode=mode, top_k=5))
        fused_diff = max(float((p.main_grad - logits_path[n]).abs().max()) for n, p in student.named_parameters())
        with torch.no_grad():
            for n, p in student.named_parameters():
                p.copy_(logits_path[n])
        dist_checkpointing.save(student.sharded_state_dict(), grad_dir)  # collective: every rank
        return fused_diff
    finally:
        _teardown()


def read_full(ckpt_dir):
    """TP1·PP1 view of a student checkpoint: {name: tensor}."""
    run = run_config()
    models = _setup(run)
    try:
        _load(models.student[0], ckpt_dir)
        return {n: p.detach().clone() for n, p in _unwrap(models.student[0]).named_parameters()}
    finally:
        _teardown()


def reference_gradients(student_dir, teacher_dir, mode, **teacher):
    """Single process, plain autograd and the float64 reference loss over the whole batch."""
    from vopd_megatron.model.masks import causal_mask

    run = run_config(**teacher)
    models = _setup(run)
    try:
        _load(models.student[0], student_dir)
        _load(models.teacher, teacher_dir)
        student, teacher = _unwrap(models.student[0]), _unwrap(models.teacher)
        batch = collate(global_batch(), SEQ)
        mask = causal_mask(SEQ, "cpu")
        with torch.no_grad():
            t_logits = teacher(batch["tokens"], batch["position_ids"], mask)
        s_logits = student(batch["tokens"], batch["position_ids"], mask)
        loss_sum, num_tokens, _ = reference_loss(
            s_logits.double(), t_logits.double(), batch["labels"], batch["loss_mask"],
            LossConfig(mode=mode, top_k=5), vocab_size=VOCAB)
        (loss_sum / num_tokens).backward()
        # DDP's backward hooks accumulate into main_grad (DP = 1: nothing to reduce).
        return {n: p.main_grad.detach().clone() for n, p in student.named_parameters()}
    finally:
        _teardown()


LAYOUTS = [  # (world size, tp, pp): TP1·PP1·DP1, TP2, PP2, DP2, TP2·PP2
    (1, 1, 1), (2, 2, 1), (2, 1, 2), (2, 1, 1), (4, 2, 2),
]


def check_layouts(gloo_pools, tmp_path, mode, layouts, **teacher):
    """Every layout's finalized student gradient equals the single-process reference."""
    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    student_dir.mkdir(), teacher_dir.mkdir()
    one = gloo_pools(1)
    one.run(make_initial_weights, str(student_dir), str(teacher_dir), **teacher)
    ref = one.run(reference_gradients, str(student_dir), str(teacher_dir), mode, **teacher)[0]
    scale = max(float(g.abs().max()) for g in ref.values())
    for world, tp, pp in layouts:
        grad_dir = tmp_path / f"grad_w{world}_tp{tp}_pp{pp}"
        grad_dir.mkdir()
        fused_diffs = gloo_pools(world).run(layout_gradients, tp, pp, str(student_dir), str(teacher_dir),
                                            str(grad_dir), mode, **teacher)
        # --vopd-fused-output: the same finalized gradients as the logits path, on every rank.
        assert max(fused_diffs) / scale < 2e-5, f"TP{tp} PP{pp} world {world}: fused output differs by {fused_diffs}"
        got = one.run(read_full, str(grad_dir))[0]
        assert got.keys() == ref.keys()
        for name, g in ref.items():
            err = float((got[name].double() - g.double()).abs().max()) / scale
            # fp32 model and statistics vs a float64 loss on the same fp32 logits.
            assert err < 2e-5, f"TP{tp} PP{pp} world {world} {teacher}: {name} error {err:.2e}"


@pytest.mark.parametrize("mode", ["vopd", "full_kl"])
def test_student_gradients_identical_across_layouts(gloo_pools, tmp_path, mode):
    check_layouts(gloo_pools, tmp_path, mode, LAYOUTS)


def teacher_stays_frozen(tp, pp, use_distributed_optimizer):
    """Two real optimizer steps; the teacher's tensors before and after, and its grads."""
    from vopd_megatron.runtime.context import ParallelContext
    from vopd_megatron.training.setup import build_optimizer
    from vopd_megatron.training.step import train_step, wire_megatron_hooks

    run = run_config(tp, pp)
    run.parallel.use_distributed_optimizer = use_distributed_optimizer
    models = _setup(run)
    try:
        optimizer, scheduler = build_optimizer(run, models.student)
        wire_megatron_hooks(models)
        before = {n: p.detach().clone() for n, p in models.teacher.named_parameters()}
        student_before = {n: p.detach().clone() for n, p in _unwrap(models.student[0]).named_parameters()}
        results = [train_step(models, optimizer, scheduler, my_microbatches(run, dist.get_world_size()), run,
                              LossConfig(mode="vopd"), ParallelContext.from_megatron()) for _ in range(2)]
        teacher_same = all(torch.equal(p, before[n]) for n, p in models.teacher.named_parameters())
        teacher_grads = [n for n, p in models.teacher.named_parameters()
                         if p.grad is not None or getattr(p, "main_grad", None) is not None or p.requires_grad]
        student_moved = any(not torch.equal(p, student_before[n])
                            for n, p in _unwrap(models.student[0]).named_parameters())
        return teacher_same, teacher_grads, student_moved, [r.metrics["kl"] for r in results]
    finally:
        _teardown()


@pytest.mark.parametrize("tp,pp,distopt", [(2, 1, False), (1, 2, True)])
def test_teacher_is_bit_identical_and_gets_no_gradient(gloo_pools, tp, pp, distopt):
    for same, grads, moved, kls in gloo_pools(2).run(teacher_stays_frozen, tp, pp, distopt):
        assert same, "teacher parameters changed"
        assert grads == [], f"teacher parameters with gradients / requires_grad: {grads[:3]}"
        assert moved, "the student did not train (the check above would be vacuous)"
        assert all(k == k and k > 0 for k in kls)
