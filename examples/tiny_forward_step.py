"""The loss inside Megatron's pipeline schedule, with real GPTModels, on CPU or GPU.

A tiny student GPTModel and a larger frozen teacher (deeper and wider, same
vocabulary) are built on the same tensor-parallel ranks. Each step runs
Megatron's `get_forward_backward_func()` with a `forward_step` that returns
the student's vocab-parallel logits and `make_loss_func(...)` bound to the
teacher's logits for the same microbatch; then a plain Adam step. Tokens are
random and the "completion" is the second half of each sequence: this shows
the wiring, the full on-policy loop comes with the training entry point.

    torchrun --nproc-per-node 2 examples/tiny_forward_step.py   # TP=2, CPU (gloo) or GPU (nccl)
"""
import os

import torch
import torch.distributed as dist


def build_gpt(num_layers, hidden, heads, vocab_padded, seq, tp, seed):
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads,
        tensor_model_parallel_size=tp, use_cpu_initialization=True,
        calculate_per_token_loss=True, pipeline_dtype=torch.float32,
    )
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=vocab_padded,
                    max_sequence_length=seq, position_embedding_type="rope")


def main():
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from vopd_megatron.loss import LossConfig, summarize_metrics
    from vopd_megatron.megatron import cpu_compat
    from vopd_megatron.megatron.loss_adapter import make_loss_func

    cpu_compat.enable()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    vocab, seq, micro_batch, microbatches = 250, 32, 2, 2
    vocab_padded = 128 * tp * -(-vocab // (128 * tp))  # Megatron's padding
    student = build_gpt(2, 64, 4, vocab_padded, seq, tp, seed=1).to(device)
    teacher = build_gpt(3, 96, 4, vocab_padded, seq, tp, seed=2).to(device).eval().requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    config = LossConfig(mode="vopd")
    causal = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device), 1)  # True = masked
    positions = torch.arange(seq, device=device).unsqueeze(0)

    def forward_step(data_iterator, model):
        tokens, labels, mask = next(data_iterator)
        with torch.no_grad():
            teacher_logits = teacher(tokens, positions, causal)  # [b, s, V/tp], no activations kept
        student_logits = model(tokens, positions, causal)  # [b, s, V/tp]
        return student_logits, make_loss_func(teacher_logits=teacher_logits, labels=labels,
                                              loss_mask=mask, config=config, vocab_size=vocab)

    g = torch.Generator().manual_seed(0)  # same batch on every TP rank
    for step in range(5):
        batches = []
        for _ in range(microbatches):
            tokens = torch.randint(0, vocab, (micro_batch, seq + 1), generator=g).to(device)
            mask = torch.zeros(micro_batch, seq, device=device)
            mask[:, seq // 2 :] = 1.0
            batches.append((tokens[:, :-1], tokens[:, 1:], mask))
        opt.zero_grad()
        metrics = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[student],
            num_microbatches=microbatches, seq_length=seq, micro_batch_size=micro_batch,
            forward_only=False,
        )
        tokens_total = sum(int(m["loss"][1]) for m in metrics)
        for p in student.parameters():  # the global token mean (Megatron's finalize_model_grads does this)
            if p.grad is not None:
                p.grad /= tokens_total
        opt.step()
        s = summarize_metrics(metrics)
        if dist.get_rank() == 0:
            print(f"step {step}: reverse KL {s['kl']:.4f}  r {s['log_ratio']:.4f}  "
                  f"baseline explained variance {s['baseline_explained_variance']:.3f}", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
