"""Report what this machine offers vopd_megatron, and check the loss on it.

Prints the Python, torch and megatron-core versions, whether CUDA, Transformer
Engine and Triton are importable (TE is optional; PyPI's `apex` is an
unrelated package and is not looked for), whether the CPU redirections of
`vopd_megatron.megatron.cpu_compat` would be active, and then compares the
vocab-parallel loss with the float64 reference on a small random problem on
the default device (value and gradient). Exits non-zero if they disagree.

    python tools/check_env.py
"""
import importlib
import importlib.util
import platform
import sys

import torch

from vopd_megatron.errors import entry_point


def optional_version(name):
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - report why an optional extra is unusable
        return f"installed but not importable ({type(exc).__name__}: {str(exc)[:80]})"


def loss_parity(device) -> float:
    """Normalised max gradient error of vopd against the float64 reference."""
    from vopd_megatron.loss import LossConfig, reference_loss, vocab_parallel_opd_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 1271, generator=g, dtype=torch.float64) * 3
    u = z + torch.randn(64, 1271, generator=g, dtype=torch.float64)
    a = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(-1)
    m = torch.ones(64)
    cfg = LossConfig(mode="vopd")
    zr = z.clone().requires_grad_()
    reference_loss(zr, u, a, m, cfg)[0].backward()
    zp = z.float().to(device).requires_grad_()
    vocab_parallel_opd_loss(zp, u.float().to(device), a.to(device), m.to(device), cfg)[0].backward()
    return float((zp.grad.double().cpu() - zr.grad).abs().max() / zr.grad.abs().max())


@entry_point
def main():
    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("megatron-core", optional_version("megatron.core")),
        ("CUDA available", str(torch.cuda.is_available())),
        ("triton", optional_version("triton")),
        ("transformer_engine", optional_version("transformer_engine")),
    ]
    if torch.cuda.is_available():
        rows.append(("GPU", torch.cuda.get_device_name()))
    else:
        rows.append(("megatron on CPU", "cpu_compat redirections apply (gloo backend)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    err = loss_parity(device)
    ok = err < 1e-5
    print(f"{'loss parity':<{width}}  vopd gradient vs float64 reference on {device}: "
          f"normalised max error {err:.1e} ({'ok' if ok else 'FAILED'})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
