"""`vopd-sft`: supervised fine-tuning of a Megatron GPT on prompt/completion text.

What it is for: producing a teacher (and a warmed-up student) that `vopd-train`
loads directly, `--teacher-load DIR` and `--load DIR --finetune`, with the same
model builder, the same checkpoint writer and the same flags. It is
deliberately small: Megatron's pipeline schedule over microbatches, Megatron's
vocab-parallel cross entropy on the completion tokens (the prompt is context
only), Megatron's optimizer and LR schedule, a checkpoint at the end.

Data: JSONL rows `{"prompt": text, "completion": text}`, tokenized with
`--tokenizer-model`; the EOS id (`--eos-id`, else the tokenizer's) is appended
to every completion so the model learns to stop. Rows are visited in a seeded
per-epoch shuffle; each iteration takes `--global-batch-size` of them, split
over data-parallel ranks like `vopd-train`.

`--load DIR` starts from a checkpoint's weights (a fresh optimizer and LR
schedule): a recipe in stages. `--lr-decay-iters` longer than `--train-iters`
stops partway along a longer schedule.

Normalisation is Megatron's `calculate_per_token_loss`: the loss function
returns `(sum of token losses, completion tokens)`, and `finalize_model_grads`
divides the summed gradients by the global token count, so the gradient is the
token mean over the whole batch for any TP/DP/microbatch split.

    vopd-sft --config examples/arithmetic/config.yaml --which teacher --sft-data data/sft.jsonl \\
             --train-iters 400 --save runs/teacher --save-interval 400
    torchrun --nproc-per-node 2 -m vopd_megatron.training.sft ... --tensor-model-parallel-size 2
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ..data.prompts import prompt_ids, read_records
from ..errors import DataError, UserError, entry_point, reading_inputs
from ..progress import Progress, echo
from ..rollout.types import Rollout
from .setup import scheduler_increment


def load_sft_rows(path, tokenizer, eos_id: int | None, seq_length: int,
                  use_chat_template: bool = False) -> list[Rollout]:
    """Tokenized (prompt, completion + EOS) pairs from JSONL / Parquet records;
    a row longer than seq_length + 1, or with nothing to train on, is an error.

    The prompt is tokenized exactly as vopd-train tokenizes a prompt (and
    evaluation a problem): the tokenizer's own special tokens (a BOS) kept, the
    chat template applied with --apply-chat-template, so a model trained here
    sees its prompts in the form distillation and evaluation give them. The
    completion continues it: no special tokens of its own, EOS appended."""
    rows = []
    for where, rec in read_records(path, "SFT data file"):
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                got = "missing" if key not in rec else f"got {type(rec[key]).__name__ if rec[key] is not None else 'null'}"
                raise DataError(f"{where}: needs a text field {key!r} ({got})")
        _, prompt = prompt_ids(where, rec, tokenizer, "prompt", use_chat_template)
        completion = tokenizer.encode(rec["completion"], add_special_tokens=False)
        completion += [eos_id] if eos_id is not None else []
        if not prompt:
            raise DataError(f"{where}: field 'prompt' is empty after tokenization (a completion needs a context)")
        if not completion:
            raise DataError(f"{where}: field 'completion' is empty and there is no EOS id to append "
                            "(--eos-id): the row has no token to train on")
        if len(prompt) + len(completion) > seq_length + 1:
            raise DataError(f"{where}: {len(prompt) + len(completion)} tokens do not fit "
                            f"--seq-length {seq_length} (+1)")
        rows.append(Rollout(prompt, completion, source=where))
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


class ShuffledRows:
    """Rows in a seeded per-epoch shuffle; `take(n)` is identical on every rank."""

    def __init__(self, rows: list, seed: int):
        self.rows, self.seed, self.consumed = rows, seed, 0
        self._epoch, self._order = -1, None

    def take(self, n: int) -> list:
        out = []
        for i in range(self.consumed, self.consumed + n):
            epoch, k = divmod(i, len(self.rows))
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(len(self.rows), generator=g)
            out.append(self.rows[int(self._order[k])])
        self.consumed += n
        return out


def sft_loss_func(labels: torch.Tensor, loss_mask: torch.Tensor, logits: torch.Tensor):
    """Megatron's contract `(loss_sum, num_tokens, metrics)` for token-level cross entropy.

    labels, loss_mask: [b, s]; logits: [b, s, V_padded/tp] this rank's vocab shard.
    Megatron's vocab-parallel cross entropy runs over the padded vocabulary, as
    Megatron-LM's own pretraining loss does (padded columns learn to be unlikely).
    """
    from megatron.core import tensor_parallel

    # Megatron's CE overwrites fp32 logits in place (MEGATRON_ON_CPU.md): nothing reads them after.
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)  # [b, s]
    mask = loss_mask.float()
    loss_sum = (losses * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}


def _forward_step(mask, data_iterator, model):
    mb = next(data_iterator)
    logits = model(mb["tokens"], mb["position_ids"], mask)  # [b, s, V/tp] (last stage)
    return logits, partial(sft_loss_func, mb["labels"], mb["loss_mask"])


def build_student(run):
    """This rank's DDP-wrapped model (the run's `--num-layers` ... shape), optimizer, scheduler."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    from ..config.megatron_args import ddp_config
    from ..model.builder import build_gpt_stage, transformer_config
    from .setup import build_optimizer

    cfg = transformer_config(run.model, run.parallel, run.train)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    model = build_gpt_stage(run.model, run.parallel, run.train, parallel_state.is_pipeline_first_stage(),
                            parallel_state.is_pipeline_last_stage(), config=cfg).to(device)
    ddp = DistributedDataParallel(cfg, ddp_config(run.model, run.parallel, run.train), model)
    cfg.no_sync_func = ddp.no_sync
    cfg.grad_sync_func = None
    cfg.finalize_model_grads_func = lambda _m, *a, **kw: finalize_model_grads([ddp], *a, **kw)
    optimizer, scheduler = build_optimizer(run, [ddp])
    return ddp, optimizer, scheduler


def sft_forward_backward(model, microbatches: list[dict], run, forward_only: bool = False) -> list[dict]:
    """Megatron's schedule over this DP rank's microbatches (gradients finalized in the DDP buffers)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..model.masks import causal_mask

    model.zero_grad_buffer()
    seq = run.model.seq_length
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, causal_mask(seq, microbatches[0]["tokens"].device)),
        data_iterator=iter(microbatches), model=[model], num_microbatches=len(microbatches),
        seq_length=seq, micro_batch_size=run.train.micro_batch_size, forward_only=forward_only,
    )


def mean_loss(losses: list[dict]) -> float:
    """Token-mean loss of the global batch (DP-reduced), on the last pipeline stage."""
    from megatron.core import parallel_state

    total = torch.stack([m["lm loss"] for m in losses]).sum(0).double()  # [2]
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0] / total[1])


def _parse(argv):
    """(vopd-sft's own flags, RunConfig); the model, training and checkpoint flags are vopd-train's."""
    from ..config.args import parse_run
    from ..config.megatron_args import FrontEndParser
    from ..config.schema import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = FrontEndParser(prog="vopd-sft", add_help=False, allow_abbrev=False)
    pre.add_argument("--sft-data", required=True, help="JSONL of {\"prompt\": text, \"completion\": text}")
    pre.add_argument("--which", choices=["student", "teacher"], default="student",
                     help="train the model the flags describe (student) or the one "
                          "--teacher-model-config describes (teacher)")

    if "-h" in argv or "--help" in argv:  # vopd-sft's own flags, then the shared model/training flags
        pre.print_help()
        print("\nModel, parallelism, training, checkpoint and logging flags are vopd-train's:\n")
        parse_run(["--help"], tool="sft")
    try:
        own, rest = pre.parse_known_args(argv)
        run = parse_run(rest, tool="sft").run
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if own.which == "teacher":
        run = dataclasses.replace(run, model=run.teacher)
    return own, run


@entry_point
def main(argv=None):
    own, run = _parse(argv)
    from megatron.core import parallel_state

    from .checkpoint import load_model_weights, save_checkpoint
    from .faults import at_iteration, check_step
    from .setup import initialize_parallel
    from .checkpoint_preflight import preflight_weights
    from .train import dp_microbatches, init_distributed, run_eos_id, run_tokenizer

    with reading_inputs():  # bad flags or data: a one-line error before anything is built
        if not run.data.tokenizer_model:
            raise UserError("vopd-sft needs --tokenizer-model (the text is tokenized here)")
        run.validate(int(os.environ.get("WORLD_SIZE", 1)))
        tokenizer = run_tokenizer(run)
        eos = run_eos_id(run, tokenizer)
        rows = ShuffledRows(load_sft_rows(own.sft_data, tokenizer, eos, run.model.seq_length,
                                          run.data.apply_chat_template), run.train.seed)
        preflight_weights(run)  # --load: before any process group

    init_distributed(run.parallel.distributed_timeout_minutes)
    initialize_parallel(run)
    model, optimizer, scheduler = build_student(run)
    if run.checkpoint.load:  # weights only: continue from an earlier stage with a fresh optimizer
        load_model_weights(run.checkpoint.load, [model], fallback=run.checkpoint.checkpoint_fallback)
    device = next(model.parameters()).device
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"[sft] {len(rows.rows)} rows from {own.sft_data}; {run.train.train_iters} iterations "
              f"of {run.train.global_batch_size}", flush=True)
    t0 = time.perf_counter()
    progress = Progress(run.train.train_iters, "[sft]")  # rank 0: a live bar, or a line every 30 s in a log
    for it in range(1, run.train.train_iters + 1):
        batch = rows.take(run.train.global_batch_size)
        microbatches = dp_microbatches(batch, run, device)
        optimizer.zero_grad()
        losses = sft_forward_backward(model, microbatches, run)
        ok, grad_norm, _ = optimizer.step()
        with at_iteration(it):  # a non-finite gradient stops the run before any save
            check_step(SimpleNamespace(metrics=None, skipped=not ok, grad_norm=float(grad_norm or 0.0)), batch,
                       grad_norm_known=grad_norm is not None and run.train.clip_grad > 0)
        scheduler.step(increment=scheduler_increment(run))  # Megatron-LM counts samples
        loss = mean_loss(losses) if losses else None  # a DP collective: every last-stage rank computes it
        progress.update(1, loss=loss)
        if loss is not None and (it % run.logging.log_interval == 0 or it == run.train.train_iters):
            norm = float("nan") if grad_norm is None else float(grad_norm)  # None: --clip-grad 0
            if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
                echo(f"[sft] iter {it:5d} | loss {loss:.4f} | grad norm {norm:.3f} "
                     f"| lr {optimizer.param_groups[0]['lr']:.2e} | {time.perf_counter() - t0:.0f} s")
        ck = run.checkpoint
        if ck.save and (it == run.train.train_iters or (ck.save_interval and it % ck.save_interval == 0)):
            # Weights only (no optimizer): what --teacher-load and --load --finetune read.
            path = save_checkpoint(ck.save, it, [model], None, None, {"iteration": it, "consumed_samples": rows.consumed})
            if rank0:
                echo(f"[sft] saved {path}")
    progress.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
