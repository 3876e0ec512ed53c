"""What every bad-input test checks besides the message: nothing heavy was built,
and no file outside the run's own output changed.

- `no_process_group` (fixture): `torch.distributed.init_process_group` fails the
  test if called. Every entry point creates its process group before it builds a
  model, so an error that arrives without tripping it came before any model,
  optimizer or checkpoint load: the cheap, checkable signal of "before any work".
- `TreeSnapshot`: size, mtime and sha256 of every file under some roots; `assert
  snapshot.unchanged()` after the command (and lists what did change).
- `user_error(main, argv)`: runs an entry point's `main` in process and returns
  its one-line `error: ...` message; a SystemExit carrying a message is exit
  status 1 (Python prints it to stderr), which the subprocess tests confirm.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch.distributed as dist


@pytest.fixture
def no_process_group(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a process group was created: the error came after the build started")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    yield
    assert not dist.is_initialized()


class TreeSnapshot:
    """Every file under `roots` (recursively): {path: (size, mtime_ns, sha256)}."""

    def __init__(self, *roots):
        self.roots = [Path(r) for r in roots]
        self.before = self.take()

    def take(self) -> dict:
        out = {}
        for root in self.roots:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                out[dirpath] = ("dir",)
                for name in sorted(filenames):
                    p = os.path.join(dirpath, name)
                    st = os.stat(p)
                    with open(p, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                    out[p] = (st.st_size, st.st_mtime_ns, digest)
        return out

    def changes(self) -> list[str]:
        after = self.take()
        return sorted(p for p in self.before.keys() | after.keys() if self.before.get(p) != after.get(p))

    def unchanged(self) -> bool:
        changes = self.changes()
        assert not changes, f"files changed: {changes[:10]}"
        return True


def user_error(main, argv) -> str:
    """The one-line `error: ...` of `main(argv)` (which must exit with a message)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = info.value.code
    assert isinstance(message, str), f"exit status {message!r}, expected a message (status 1)"
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in message
    return message
