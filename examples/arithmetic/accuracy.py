"""Task accuracy of a checkpoint on held-out problems: does the boxed answer equal a + b?

Used by prepare.py to check the teacher and the warmed-up student before any
distillation (during distillation, vopd-train's held-out evaluation reports
accuracy). Samples with the project's in-process sampler, one process, CPU:

    python examples/arithmetic/accuracy.py --config examples/arithmetic/config.yaml \
        --which teacher --load runs/arithmetic/teacher [--temperature 1.0 | --greedy]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text`, or None."""
    found = BOXED.findall(text)
    return found[-1] if found else None


def accuracy(texts: list[str], answers: list[str]) -> float:
    return sum(boxed_answer(t) == a for t, a in zip(texts, answers)) / max(len(answers), 1)


def checkpoint_accuracy(run, load_dir: str, problems: list[dict], temperature: float, greedy: bool,
                        max_new_tokens: int, seed: int = 0) -> tuple[float, list[str]]:
    """Accuracy of the model `run.model` describes, loaded from `load_dir`, and its completions.

    Needs an initialised default process group and Megatron parallel state.
    """
    import torch
    from megatron.core import parallel_state

    from vopd_megatron.data import load_tokenizer
    from vopd_megatron.model.builder import build_gpt_stage
    from vopd_megatron.rollout import RolloutSampler, SamplingConfig
    from vopd_megatron.training.checkpoint import load_model_weights

    model = build_gpt_stage(run.model, run.parallel, run.train, parallel_state.is_pipeline_first_stage(),
                            parallel_state.is_pipeline_last_stage())
    load_model_weights(load_dir, [model])
    tok = load_tokenizer(run.data.tokenizer_model)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=1 if greedy else 0, eos_id=run.data.eos_id, max_batch_size=len(problems))
    prompts = [tok.encode(p["problem"], add_special_tokens=False) for p in problems]
    with torch.no_grad():
        outs = RolloutSampler([model], sampling, run.model.vocab_size).generate(prompts, seed=seed)
    texts = [tok._hf.decode(o.completion_ids, skip_special_tokens=True) for o in outs]
    return accuracy(texts, [p["answer"] for p in problems]), texts


def main(argv=None):
    ap = argparse.ArgumentParser(add_help=True, allow_abbrev=False)
    ap.add_argument("--which", choices=["student", "teacher"], default="student")
    ap.add_argument("--heldout", default=str(Path(__file__).parent / "data" / "heldout.jsonl"))
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--max-problems", type=int, default=200)
    own, rest = ap.parse_known_args(argv)

    import dataclasses

    from vopd_megatron.config import parse_config
    from vopd_megatron.training.setup import initialize_parallel
    from vopd_megatron.training.train import init_distributed

    run, _ = parse_config(rest)
    if own.which == "teacher":
        run = dataclasses.replace(run, model=run.teacher)
    init_distributed()
    initialize_parallel(run)
    problems = [json.loads(line) for line in Path(own.heldout).read_text().splitlines()][: own.max_problems]
    acc, texts = checkpoint_accuracy(run, run.checkpoint.load, problems, own.temperature, own.greedy,
                                     run.data.rollout_max_new_tokens)
    mode = "greedy" if own.greedy else f"T={own.temperature}"
    print(f"accuracy {acc:.3f} ({mode}, {len(problems)} held-out problems); e.g. "
          f"{problems[0]['problem']}{texts[0]}")
    return acc


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
