"""Training that cannot go on stops, naming the iteration and the data rows.

A non-finite loss or gradient norm means the next optimizer step (or the one
just taken) writes NaN or inf into the weights, and the next save would store
them: instead the run stops with a `TrainingFault`, one `error: ...` line and
exit status 1, and no checkpoint of that iteration is written (the last one
saved stays the newest). Two places detect it:

- the loss itself, on the last pipeline stage (`check_inputs`): non-finite
  student or teacher logits on a completion token raise
  `NonFiniteLogitsError` with the flat token rows; `naming_rows` maps them to
  the microbatch's rollouts (`Rollout.source`, e.g. `rollouts.jsonl:12`);
- after the optimizer step, on every rank alike: `check_step` looks at the
  global batch's loss and Megatron's gradient norm (the same value on every
  rank), and names the batch's rows. A step the fp16 loss scaler skipped is
  not a fault (the scaler lowers the scale and goes on). With `--clip-grad 0`
  Megatron computes no gradient norm: a non-finite gradient then shows up
  as non-finite logits at the next iteration, and a save in between would
  already hold it (keep gradient clipping on, as Megatron-LM does by default).

`at_iteration` prefixes the iteration to any of these.
"""
from __future__ import annotations

import contextlib
import math

import torch.distributed as dist

from ..errors import TrainingFault
from ..loss.per_token import NonFiniteLogitsError


def rows_text(sources: list, limit: int = 4) -> str:
    """`a.jsonl:3, a.jsonl:9 (+5 more)` from rollout sources (None: unknown)."""
    named = list(dict.fromkeys(s if s is not None else "<unknown row>" for s in sources))
    more = f" (+{len(named) - limit} more)" if len(named) > limit else ""
    return ", ".join(named[:limit]) + more


def naming_rows(loss_func, sources: list | None, seq_length: int):
    """Wrap a Megatron `loss_func` so that non-finite logits name the data rows:
    token row i of a [b, s] microbatch is sequence i // s."""

    def call(output_tensor):
        try:
            return loss_func(output_tensor)
        except NonFiniteLogitsError as exc:
            if not sources:
                raise
            rows = [sources[i // seq_length] for i in exc.token_rows if i // seq_length < len(sources)]
            raise TrainingFault(f"{exc}; data row(s) {rows_text(rows)}") from exc

    return call


def check_step(result, rollouts: list, grad_norm_known: bool = True, dp_group=None) -> None:
    """TrainingFault (the same on every rank) unless the step's loss and gradient
    norm are finite. `result`: a StepResult-like object with metrics, grad_norm,
    skipped; `rollouts`: this rank's share of the batch; dp_group: the
    data-parallel group, whose ranks hold the rest (their rows are gathered only
    to name them in the message, which every rank reaches together);
    grad_norm_known: False when the optimizer computed no norm (--clip-grad 0)."""
    if getattr(result, "skipped", False):
        return
    values = [("loss", result.metrics.get("loss", 0.0) if result.metrics else 0.0)]
    if grad_norm_known:
        values.append(("gradient norm", result.grad_norm))
    bad = [f"{name} {value}" for name, value in values if not math.isfinite(value)]
    if bad:
        sources = [r.source for r in rollouts]
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            pieces = [None] * dist.get_world_size(dp_group)
            dist.all_gather_object(pieces, sources, group=dp_group)
            sources = [s for piece in pieces for s in piece]
        raise TrainingFault(
            f"non-finite {' and '.join(bad)} in the global batch of data row(s) "
            f"{rows_text(sources)}; stopped before saving (lower the learning rate, "
            "check the data and the teacher; the last saved checkpoint is unaffected)", same_on_all_ranks=True)


@contextlib.contextmanager
def at_iteration(iteration: int):
    """Training faults raised inside are re-raised naming the iteration."""
    try:
        yield
    except (TrainingFault, NonFiniteLogitsError) as exc:
        raise TrainingFault(f"iteration {iteration}: {exc}",
                            same_on_all_ranks=getattr(exc, "same_on_all_ranks", False)) from exc
