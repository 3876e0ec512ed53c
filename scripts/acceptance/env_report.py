"""The acceptance run's environment and dependency checks (scripts/gpu_acceptance.sh).

    python scripts/acceptance/env_report.py env  --note NOTE.txt      # versions -> stdout, one-line note
    python scripts/acceptance/env_report.py deps --note NOTE.txt [--closure]

`env` prints what a figure depends on: GPU, driver, CUDA, torch, Triton,
megatron-core, Transformer Engine, NCCL. `deps` imports every module the
stages import (so a missing wheel fails here, in seconds, not in the middle of
a stage); with `--closure` (the CPU rehearsal) it also maps each imported
module to the distribution that owns it and checks that each is on the device
image (image_packages.txt) or carried (wheels.txt), and that each carried pin
matches the version installed here, the one CI tests.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: What the stages import: vopd-train and its parts, the benchmarks, and every
#: test module (`pytest -m gpu tests` collects them all before selecting).
STAGE_MODULES = [
    "vopd_megatron.training.train", "vopd_megatron.training.step", "vopd_megatron.training.setup",
    "vopd_megatron.training.checkpoint", "vopd_megatron.training.logging", "vopd_megatron.rollout.engine",
    "vopd_megatron.rollout.source", "vopd_megatron.loss.triton_kernels", "vopd_megatron.model.dry_run",
    "megatron.core.fusions.fused_cross_entropy", "megatron.core.dist_checkpointing", "torch.utils.tensorboard",
    "psutil", "pytest", "bench_loss", "bench_teacher", "tile_sweep",
]


#: Imported here, but only behind `pytest.importorskip` or a lazy import the
#: stages never reach: math-verify (vopd-eval's grader; tests/test_eval_cli.py
#: skips without it), gguf (SmolLM2's GGUF reader; tests/test_smollm2.py skips
#: without it; accelerate comes with it).
OPTIONAL = {"math-verify", "gguf", "accelerate"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> list[str]:
    """Non-comment lines of a list file."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def pins(path: Path = HERE / "wheels.txt") -> dict[str, str]:
    """{normalised name: version} of the carried wheels."""
    out = {}
    for line in read_names(path):
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise SystemExit(f"error: {path}: {line!r} is not NAME==VERSION")
        out[normalise(name)] = version
    return out


def version_of(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def gpu_lines() -> list[str]:
    import torch

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU 0: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                     f"{p.total_memory / 2**30:.1f} GiB; {torch.cuda.device_count()} device(s)")
        lines.append(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, cuDNN {torch.backends.cudnn.version()}")
        from vopd_megatron.loss import fused_steps

        # The fused output loss's GEMMs: bf16 in, fp32 out (the logit tiles) and fp32
        # accumulated in place (dgrad into dh); without them it falls back to copies.
        lines.append(f"fused output GEMMs: mm(out_dtype=fp32) {fused_steps._cuda_mm_out_dtype()}, "
                     f"addmm(out_dtype=fp32, out=acc) in place {fused_steps._cuda_addmm_out_dtype()}")
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        lines.append("nvidia-smi: " + (q.stdout.strip() or q.stderr.strip()))
    else:
        lines.append("nvidia-smi: not found")
    return lines


def env(note: Path | None) -> int:
    import torch

    lines = [f"python {platform.python_version()} ({sys.executable}), {platform.machine()}, "
             f"{os.cpu_count()} CPUs, {platform.platform()}"]
    lines += gpu_lines()
    try:
        import triton

        lines.append(f"triton {triton.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    except ImportError as exc:
        lines.append(f"triton: not importable ({exc})")
    try:
        import megatron.core

        lines.append(f"megatron-core {megatron.core.__version__} from {Path(megatron.core.__file__).parent}")
    except ImportError as exc:
        lines.append(f"megatron-core: not importable ({exc})")
    te = importlib.util.find_spec("transformer_engine") is not None
    lines.append(f"transformer-engine: {version_of('transformer_engine') if te else 'not installed'}; "
                 f"flash-attn: {version_of('flash_attn')}; apex: {version_of('apex')}")
    disk = shutil.disk_usage("/tmp")
    lines.append(f"/tmp free: {disk.free / 2**30:.0f} GiB")
    print("\n".join(lines))
    if note:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        short = [gpu, f"torch {torch.__version__}", f"triton {version_of('triton')}",
                 f"megatron-core {version_of('megatron-core')}", f"TE {'yes' if te else 'no'}"]
        note.write_text(", ".join(short) + "\n")
    return 0


def owner(module_file: str, roots: list[str], top_to_dists: dict) -> str | None:
    """The distribution that installed `module_file`, from its top-level name under a site directory."""
    for root in roots:
        if module_file.startswith(root + os.sep):
            top = module_file[len(root) + 1:].split(os.sep)[0]
            top = top[:-3] if top.endswith(".py") else top.split(".")[0]
            dists = top_to_dists.get(top)
            return dists[0] if dists else None
    return None


def with_requirements(names: set[str]) -> set[str]:
    """`names` and everything they require (no extras), as installed here."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" not in req.replace('"', "").replace("'", ""):
                todo.append(normalise(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0]))
    return seen


def closure_problems(carried: dict[str, str] | None = None, image_names: list[str] | None = None) -> list[str]:
    """Distributions owning modules imported in this process that are neither on
    the image (with what its packages require) nor carried, and carried pins that
    differ from the versions installed here. Defaults: wheels.txt, image_packages.txt."""
    carried = pins() if carried is None else carried
    image_names = read_names(HERE / "image_packages.txt") if image_names is None else image_names
    image = with_requirements({normalise(n) for n in image_names} | OPTIONAL)
    roots = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")}, key=len, reverse=True)
    top_to_dists = md.packages_distributions()
    used = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        dist = owner(path, roots, top_to_dists) if path else None
        if dist:
            used.setdefault(normalise(dist), name)
    problems = [f"{dist} (imported as {mod}) is not on the device image and not in wheels.txt"
                for dist, mod in sorted(used.items()) if dist not in image | set(carried) | {"vopd-megatron"}]
    for dist, pinned in carried.items():
        here = version_of(dist)
        if here != pinned:
            problems.append(f"wheels.txt pins {dist}=={pinned}, but CI tests {here}")
    print(f"{len(used)} distributions imported by the stages: {', '.join(sorted(used))}")
    return problems


def deps(note: Path | None, closure: bool) -> int:
    import pytest  # here, not at the top: the env subcommand runs without it
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    failed = []
    for name in STAGE_MODULES + [f"tests.{p.stem}" for p in sorted((ROOT / "tests").glob("test_*.py"))]:
        try:
            importlib.import_module(name)
        except pytest.skip.Exception:
            pass  # a test module that skips itself without an optional extra (math_verify): not a stage import
        except Exception as exc:  # noqa: BLE001 - report every missing piece at once
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    problems = [f"cannot import {f}" for f in failed]
    if closure:
        problems += closure_problems()
    versions = {d: version_of(d) for d in pins()}
    print("carried: " + ", ".join(f"{d} {v}" for d, v in versions.items()))
    for p in problems:
        print(f"error: {p}")
    if note:
        text = "; ".join(problems) if problems else (
            "all stage imports resolve; " + ", ".join(f"{d} {v}" for d, v in versions.items()))
        note.write_text(text + "\n")
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["env", "deps"])
    p.add_argument("--note", type=Path, help="write a one-line summary here")
    p.add_argument("--closure", action="store_true", help="deps: also check imports against the image and wheels")
    args = p.parse_args(argv)
    return env(args.note) if args.what == "env" else deps(args.note, args.closure)


if __name__ == "__main__":
    sys.exit(main())
