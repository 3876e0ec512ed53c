"""Where converters write: a new directory, built aside and moved in place at the end.

A converter never modifies a directory it did not create. Its output is
written into a staging directory next to `--out`
(`.<name>.vopd-convert-<pid>`), and only a finished conversion is moved to
`--out`:

- `--out` missing or empty: the staging directory becomes `--out`;
- `--out` not empty: refused (`ConversionError` listing what is there: a
  converted checkpoint's iteration directory and tracker would otherwise
  replace a training run's), unless `overwrite=True`, in which case the old
  directory is removed only after the new one is complete (both exist on
  disk for a moment); a failed conversion leaves the old directory as it was;
- `--out` equal to, inside, or containing the input: refused even with
  overwrite (the input would be destroyed while, or after, being read).

A failed conversion removes its staging directory: nothing is left behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil

from .hf_config import ConversionError


def _inside(a: str, b: str) -> bool:
    """Whether path a is b or lies under it (after resolving links)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_output_dir(out: str, source: str, overwrite: bool) -> None:
    """ConversionError unless converting `source` into `out` is allowed (module docstring)."""
    if _inside(out, source) or _inside(source, out):
        raise ConversionError(f"--out {out} and the input {source} overlap: write the conversion elsewhere")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        entries = sorted(os.listdir(out))
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise ConversionError(f"--out {out} is not empty ({shown}); a conversion writes a new directory: "
                              "choose another --out, or pass --overwrite to replace this one")
    parent = os.path.dirname(os.path.abspath(out))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConversionError(f"--out {out}: {existing} is not writable (permission denied)")


@contextlib.contextmanager
def staged_output(out: str, source: str, overwrite: bool = False):
    """Yield a fresh staging directory; on success move it to `out` (replacing an
    old `out` only with `overwrite`), on failure remove it."""
    check_output_dir(out, source, overwrite)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.vopd-convert-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # debris of an earlier run of this very process id
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(out):  # empty, or replaced on request: checked again, it may have changed meanwhile
        if os.listdir(out) and not overwrite:
            shutil.rmtree(staging, ignore_errors=True)
            raise ConversionError(f"--out {out} was written to by someone else during the conversion; "
                                  "nothing was changed")
        shutil.rmtree(out)
    os.replace(staging, out)
