"""The loss through Megatron's own pipeline schedule (`forward_step` contract).

A vocab-parallel output layer `logits = x @ W[:, shard]` stands in for the
model, so that the comparison isolates the loss contract: Megatron's
no-pipelining schedule with `calculate_per_token_loss=True` and any split of
the batch into microbatches must give gradient sums that, divided by the
global token count, equal the reference token-mean gradient.
"""
import pytest
import torch
import torch.distributed as dist

from vopd_megatron.loss import LossConfig, reference_loss, summarize_metrics

VOCAB, PADDED, HIDDEN, SEQ, BATCH = 250, 256, 16, 5, 4


class VocabParallelHead(torch.nn.Module):
    def __init__(self, weight_shard, config):
        from megatron.core.enums import ModelType

        super().__init__()
        self.weight = torch.nn.Parameter(weight_shard.clone())  # [h, V/tp]
        self.config = config
        self.model_type = ModelType.encoder_or_decoder

    def forward(self, x):
        return x @ self.weight  # [b, s, V/tp]

    def set_input_tensor(self, tensor):  # part of Megatron's model interface
        pass


def global_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(HIDDEN, PADDED, generator=g, dtype=torch.float64) / HIDDEN**0.5
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=g, dtype=torch.float64)
    teacher = torch.randn(BATCH, SEQ, PADDED, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).double()
    mask[0] = 0  # a sequence with no completion token
    return w, x, teacher, labels, mask


def schedule_case(tp, num_microbatches, config):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from vopd_megatron.megatron.loss_adapter import make_loss_func

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        rank = parallel_state.get_tensor_model_parallel_rank()
        w, x, teacher, labels, mask = global_problem()
        part = PADDED // tp
        cols = slice(rank * part, (rank + 1) * part)
        mcfg = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4,
                                 tensor_model_parallel_size=tp, calculate_per_token_loss=True,
                                 pipeline_dtype=torch.float32)
        model = VocabParallelHead(w[:, cols].float(), mcfg)
        mb = BATCH // num_microbatches
        batches = iter([
            (x[i * mb : (i + 1) * mb].float(), teacher[i * mb : (i + 1) * mb, :, cols].float(),
             labels[i * mb : (i + 1) * mb], mask[i * mb : (i + 1) * mb])
            for i in range(num_microbatches)
        ])

        def forward_step(data_iterator, model):
            xb, tb, lb, mb_mask = next(data_iterator)
            return model(xb), make_loss_func(teacher_logits=tb, labels=lb, loss_mask=mb_mask,
                                             config=config, vocab_size=VOCAB)

        metrics = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[model],
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=mb, forward_only=False,
        )
        total_tokens = sum(int(m["loss"][1]) for m in metrics)
        grad = model.weight.grad.double() / total_tokens
        gathered = [torch.empty_like(grad) for _ in range(tp)]
        dist.all_gather(gathered, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat(gathered, -1), summarize_metrics(metrics)
    finally:
        parallel_state.destroy_model_parallel()


def reference_gradient(config):
    w, x, teacher, labels, mask = global_problem()
    w = w.clone().requires_grad_()
    loss_sum, num_tokens, metrics = reference_loss(x @ w, teacher, labels, mask, config, vocab_size=VOCAB)
    (loss_sum / num_tokens).backward()
    return w.grad, summarize_metrics(metrics)


@pytest.mark.parametrize("mode", ["vopd", "vopd_opt", "full_kl", "topk_kl"])
def test_schedule_gives_global_token_mean_for_any_microbatch_split(gloo_pools, mode):
    config = LossConfig(mode=mode, top_k=4)
    ref_grad, ref_metrics = reference_gradient(config)
    pool = gloo_pools(2)
    for tp, microbatches in ((2, 1), (2, 2), (2, 4), (1, 2)):
        grad, metrics = pool.run(schedule_case, tp, microbatches, config)[0]
        err = float((grad - ref_grad).abs().max() / ref_grad.abs().max())
        assert err < 1e-5, (tp, microbatches, err)
        assert metrics["kl"] == pytest.approx(ref_metrics["kl"], rel=1e-5)
