"""Our loss inside a Megatron-LM training script: `megatron.training.pretrain` with the vOPD loss.

A user who already trains with Megatron-LM's `pretrain_gpt.py` keeps their
launch script, their flags and Megatron-LM's training loop (data loaders,
optimizer, LR schedule, checkpoints, logging); only two things change:

1. the model provider also builds a frozen **teacher** on the same ranks (any
   depth and width, same vocabulary), loaded read-only from `--teacher-load`
   (a torch_dist checkpoint of Megatron-LM, vopd-train or vopd-convert);
2. `forward_step` returns the student's vocab-parallel logits together with
   our `loss_func` (`vopd_megatron.megatron.loss_adapter.make_loss_func`),
   bound to the teacher's logits for the same microbatch.

The schedule then calls `loss_func(student_logits) -> (loss_sum, num_tokens,
metrics)`; with `--calculate-per-token-loss` Megatron-LM divides by the global
token count (DESIGN §4). Metrics (`loss`, `kl`, ...) are `[sum, count]` pairs,
which Megatron-LM's logger averages over tokens.

Data. On-policy distillation scores completions the student sampled; sampling
is vopd-train's job. Here the batches come from a dataset provider like any
Megatron-LM job: `SyntheticRollouts` (random tokens, the second half of each
sequence is the "completion") runs without downloads; put your own rollout
dataset in its place. Pipeline parallelism is not wired (PP = 1): the teacher's
activations would have to travel with the student's between stages, which
vopd-train does and `pretrain`'s schedule does not.

    # CPU, 2 processes (TP2), gloo:
    torchrun --nproc-per-node 2 examples/pretrain_with_vopd_loss.py --cpu \\
        --tensor-model-parallel-size 2 --num-layers 2 --hidden-size 64 --num-attention-heads 4 \\
        --seq-length 32 --max-position-embeddings 32 --vocab-size 250 --micro-batch-size 2 \\
        --global-batch-size 4 --train-iters 3 --lr 1e-4 --calculate-per-token-loss \\
        --eval-interval 1000 --eval-iters 0 --teacher-num-layers 3 --teacher-hidden-size 96 --vopd-loss vopd
    # GPUs: the same without --cpu, with your usual Megatron-LM flags.
    # Resume a vopd-train (or Megatron-LM) checkpoint, taking the model shape from it:
    #   ... --load runs/x/checkpoints --use-checkpoint-args --teacher-load ckpt/teacher ...

Tested (tests/test_checkpoint_megatron.py): on CPU at TP2 it resumes a
vopd-train checkpoint with `--use-checkpoint-args --no-load-rng`, trains on, and
its first logged loss equals the plain reference loss of the same weights and
batch. Not run on a GPU here.
"""
from __future__ import annotations

import os
import sys

import torch

_TEACHER = []  # the frozen teacher chunk, built once by `model_provider`


def add_vopd_args(parser):
    """Our flags, through Megatron-LM's extra-arguments hook."""
    g = parser.add_argument_group("vopd (example)")
    g.add_argument("--cpu", action="store_true",
                   help="run Megatron-LM's training loop on CPU with gloo (vopd_megatron.megatron.cpu_compat)")
    g.add_argument("--teacher-load", default=None, help="teacher checkpoint (torch_dist; read-only)")
    g.add_argument("--teacher-num-layers", type=int, default=None, help="default: the student's")
    g.add_argument("--teacher-hidden-size", type=int, default=None, help="default: the student's")
    g.add_argument("--teacher-num-attention-heads", type=int, default=None, help="default: the student's")
    g.add_argument("--teacher-ffn-hidden-size", type=int, default=None, help="default: 4 x teacher hidden")
    g.add_argument("--vopd-loss", default="vopd", help="opd | vopd | vopd_topk | vopd_opt | full_kl | topk_kl")
    g.add_argument("--vopd-top-k", type=int, default=None)
    g.add_argument("--vopd-temperature", type=float, default=1.0)
    g.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic rollouts")
    return parser


# --- data ---------------------------------------------------------------------------------------


class SyntheticRollouts(torch.utils.data.Dataset):
    """Sample i: `seq_length + 1` random tokens drawn from a generator seeded with (seed, i);
    the second half is the completion (loss mask 1), the first half the prompt.
    Deterministic per index, so a resumed run continues with the same samples."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        return synthetic_sample(i, self.seq_length, self.vocab_size, self.seed)


def synthetic_sample(i: int, seq_length: int, vocab_size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    tokens = torch.randint(0, vocab_size, (seq_length + 1,), generator=g)  # [s + 1]
    mask = torch.zeros(seq_length)
    mask[seq_length // 2 :] = 1.0
    return dict(tokens=tokens[:-1], labels=tokens[1:], loss_mask=mask, position_ids=torch.arange(seq_length))


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    from megatron.training import get_args

    args = get_args()
    train = SyntheticRollouts(train_val_test_num_samples[0], args.seq_length, args.vocab_size, args.synthetic_seed)
    return train, None, None


datasets_provider.is_distributed = True  # every rank builds its own (identical) loader: no broadcast


# --- models ---------------------------------------------------------------------------------------


def _layer_spec(args):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec,
    )

    if args.transformer_impl == "transformer_engine" and torch.cuda.is_available():
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)
    return get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm)


def _gpt(args, config, pre_process, post_process, pg_collection=None):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config, _layer_spec(args), vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, pg_collection=pg_collection,
    )


def teacher_config(args):
    """The student's TransformerConfig with the teacher's shape."""
    import dataclasses

    from megatron.training.arguments import core_transformer_config_from_args

    config = core_transformer_config_from_args(args)
    hidden = args.teacher_hidden_size or config.hidden_size
    heads = args.teacher_num_attention_heads or config.num_attention_heads
    return dataclasses.replace(
        config, num_layers=args.teacher_num_layers or config.num_layers, hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=heads if config.num_query_groups == config.num_attention_heads
        else config.num_query_groups, kv_channels=hidden // heads,
        ffn_hidden_size=args.teacher_ffn_hidden_size or 4 * hidden,
    )


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """The student (what Megatron-LM trains, checkpoints and wraps in DDP), and once the teacher."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    if args.pipeline_model_parallel_size != 1:
        raise SystemExit("error: this example runs with --pipeline-model-parallel-size 1 (see its docstring)")
    student = _gpt(args, config or core_transformer_config_from_args(args), pre_process, post_process, pg_collection)
    if not _TEACHER:
        model_parallel_cuda_manual_seed(args.seed + 1)  # the teacher's own init (replaced by --teacher-load)
        t_cfg = teacher_config(args)
        teacher = _gpt(args, t_cfg, pre_process, post_process, pg_collection)
        model_parallel_cuda_manual_seed(args.seed)  # back to the training RNG streams
        if args.bf16 or args.fp16:
            from megatron.core.transformer.module import Float16Module

            teacher = Float16Module(t_cfg, teacher)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        teacher = teacher.to(device).eval().requires_grad_(False)
        if args.teacher_load:
            from vopd_megatron.training.checkpoint import load_model_weights

            load_model_weights(args.teacher_load, [teacher])
        _TEACHER.append(teacher)
    return student


# --- the step -------------------------------------------------------------------------------------


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Student logits and our loss_func bound to the teacher's logits for the same microbatch."""
    from megatron.training import get_args

    from vopd_megatron.loss import LossConfig
    from vopd_megatron.megatron.loss_adapter import make_loss_func

    args = get_args()
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device) for k, v in next(data_iterator).items()}
    with torch.no_grad():  # forward-only: no teacher activations are kept
        teacher_logits = _TEACHER[0](batch["tokens"], batch["position_ids"], None)  # [b, s, V/tp]
    student_logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V/tp]
    config = LossConfig(mode=args.vopd_loss, top_k=args.vopd_top_k, temperature=args.vopd_temperature)
    return student_logits, make_loss_func(teacher_logits=teacher_logits, labels=batch["labels"],
                                          loss_mask=batch["loss_mask"], config=config, vocab_size=args.vocab_size)


def use_prebuilt_dataset_helpers() -> None:
    """megatron-core wheels ship Megatron's dataset index helpers prebuilt (`helpers_cpp`)
    but not their Makefile, and Megatron-LM's initialisation runs `make` anyway and exits.
    Skip that build when the prebuilt module imports (a Megatron-LM checkout has both)."""
    import importlib.util

    from megatron.core.datasets import utils

    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        utils.compile_helpers = lambda: None


def main():
    if "--cpu" in sys.argv:  # before Megatron-LM touches CUDA: explicit, CPU-only redirections
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # as Megatron-LM launch scripts set it
        from vopd_megatron.megatron import cpu_compat

        cpu_compat.enable_training_loop()
        sys.argv += ["--distributed-backend", "gloo", "--no-gradient-accumulation-fusion",
                     "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                     "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
                     "--use-cpu-initialization", "--transformer-impl", "local"]
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    use_prebuilt_dataset_helpers()
    args = parse_and_validate_args(extra_args_provider=add_vopd_args,
                                   args_defaults={"tokenizer_type": "NullTokenizer"})
    pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)


if __name__ == "__main__":  # the guard matters: torch_dist saves start spawned workers
    main()
