"""Bad input to vopd-train and vopd-eval gets a one-line error naming the
problem, before any process group or model is built (so in seconds).

Most cases call the entry points' `main(argv)` in process (they exit before
`init_distributed`); one case of each tool runs the real command line and
checks its exit status and stderr."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from vopd_megatron.eval.cli import main as eval_main  # noqa: E402
from vopd_megatron.training.train import main as train_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "examples/tiny/config.yaml"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RANK", raising=False)


def _tokenizer(path: Path, words) -> Path:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _error(main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


WORDS = ["<unk>", "</s>"] + [f"w{i}" for i in range(100)]


def test_vopd_train_bad_prompt_data(tmp_path):
    bad = _jsonl(tmp_path / "p.jsonl", [{"prompt_ids": [1, 2]}, {"text": "w1 w2"}])
    msg = _error(train_main, TINY + ["--prompt-data", str(bad)])
    assert f"{bad}:2: missing prompt field 'prompt'" in msg and "['text']" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert f"prompt file {empty} has no records" in _error(train_main, TINY + ["--prompt-data", str(empty)])
    missing = tmp_path / "nope.jsonl"
    assert f"{missing} does not exist" in _error(train_main, TINY + ["--prompt-data", str(missing)])
    long = _jsonl(tmp_path / "long.jsonl", [{"prompt_ids": list(range(1, 60))}])
    assert "none of its 1 prompts fits in 41 tokens" in _error(train_main, TINY + ["--prompt-data", str(long)])


def test_vopd_train_tokenizer_errors(tmp_path):
    missing = tmp_path / "missing" / "tokenizer.json"
    assert f"tokenizer {missing} does not exist" in _error(train_main, TINY + ["--tokenizer-model", str(missing)])
    student = _tokenizer(tmp_path / "s.json", WORDS)
    teacher = _tokenizer(tmp_path / "t.json", WORDS[:2] + WORDS[2:][::-1])  # same words, other ids
    msg = _error(train_main, TINY + ["--tokenizer-model", str(student), "--teacher-tokenizer-model", str(teacher)])
    assert "incompatible" in msg and "different id -> token tables" in msg
    assert "--rollout-stop needs --tokenizer-model" in _error(train_main, TINY + ["--rollout-stop", "</s>"])
    assert "not a JSON list" in _error(train_main, TINY + ["--tokenizer-model", str(student),
                                                           "--rollout-stop", '["a", ]'])


def test_vopd_train_budget_and_eval_errors(tmp_path):
    assert "--rollout-max-new-tokens 64 must be in [1, --seq-length 64)" in _error(
        train_main, TINY + ["--rollout-max-new-tokens", "64"])
    assert "--eval-every needs --eval-data" in _error(train_main, TINY + ["--eval-every", "2"])
    ev = ["--eval-data", "examples/tiny/eval.jsonl", "--eval-every", "2"]
    assert "--eval-max-new-tokens 70 must be in [1, --seq-length 64)" in _error(
        train_main, TINY + ev + ["--eval-max-new-tokens", "70"])
    assert "--eval-pass-k 3 must be in [1, --eval-samples 2]" in _error(
        train_main, TINY + ev + ["--eval-samples", "2", "--eval-pass-k", "3"])
    no_answer = _jsonl(tmp_path / "e.jsonl", [{"problem": [1, 2], "answer": "3"}, {"problem": [4]}])
    assert f"{no_answer}:2: missing answer field 'answer'" in _error(
        train_main, TINY + ["--eval-data", str(no_answer), "--eval-every", "1"])


def test_vopd_eval_bad_data(tmp_path):
    base = TINY + ["--load", str(tmp_path / "ckpt")]
    no_answer = _jsonl(tmp_path / "e.jsonl", [{"problem": [1, 2], "solution": "3"}])
    msg = _error(eval_main, base + ["--eval-data", str(no_answer)])
    assert "missing answer field 'answer' (set --eval-answer-field)" in msg and "['problem', 'solution']" in msg
    no_problem = _jsonl(tmp_path / "q.jsonl", [{"question": [1, 2], "answer": "3"}])
    assert "missing problem field 'problem' (set --eval-problem-field" in _error(
        eval_main, base + ["--eval-data", str(no_problem)])
    assert _error(eval_main, base + ["--eval-data", str(no_problem), "--eval-problem-field", "question",
                                     "--eval-max-new-tokens", "64"]).endswith("the problem needs room in the sequence")
    text = _jsonl(tmp_path / "t.jsonl", [{"problem": "w1 w2", "answer": "3"}])
    assert "needs a tokenizer (set --tokenizer-model)" in _error(eval_main, base + ["--eval-data", str(text)])
    assert "needs --load" in _error(eval_main, TINY + ["--eval-data", str(text)])


@pytest.mark.parametrize("tool", ["vopd_megatron.training.train", "vopd_megatron.eval.cli"])
def test_command_line_exit_status_and_message(tmp_path, tool):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    flag = "--prompt-data" if tool.endswith("train") else "--eval-data"
    out = subprocess.run([sys.executable, "-m", tool, *TINY, flag, str(empty), "--load", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "RANK"})
    assert out.returncode == 1
    # Exactly one line: Megatron-Core's and torch's import notices about Apex, Transformer
    # Engine and the CUDA runtime, and validate_args' "Overriding default arguments", are not shown.
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: ") and "has no records" in out.stderr


@pytest.mark.parametrize("argv,message", [
    (["--modes", "vopd,nope"], "--modes: unknown loss mode 'nope'"),
    (["--modes", ","], "--modes names no loss mode"),
    (["--tp", "0"], "--tp 0 must be >= 1"),
    (["--vocab", "10", "--tp", "3"], "--vocab 10 must be divisible by --tp 3"),
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--lr", "nan"], "--lr nan must be > 0"),
])
def test_loss_demo_bad_arguments(argv, message, capsys):
    from vopd_megatron.demo import main as demo_main

    with pytest.raises(SystemExit) as info:
        demo_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err.strip().splitlines()[-1], err  # argparse's usage, then its error line


def test_vopd_sft_bad_data(tmp_path):
    from vopd_megatron.training.sft import main as sft_main

    base = ["--config", "examples/tiny/config.yaml", "--tokenizer-model",
            str(_tokenizer(tmp_path / "tok.json", WORDS))]
    missing = tmp_path / "nope.jsonl"
    assert str(missing) in _error(sft_main, base + ["--sft-data", str(missing)])
    no_completion = _jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2"}])
    assert "needs a text field 'completion'" in _error(sft_main, base + ["--sft-data", str(no_completion)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "has no rows" in _error(sft_main, base + ["--sft-data", str(empty)])
    assert "needs --tokenizer-model" in _error(
        sft_main, ["--config", "examples/tiny/config.yaml", "--sft-data", str(empty)])


def _example(path: str, name: str, monkeypatch):
    """An example script as a module (its directory on sys.path, for its sibling imports)."""
    import importlib.util

    file = ROOT / path
    monkeypatch.syspath_prepend(str(file.parent))
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path,argv,status,message", [
    # Refused before the teacher is trained (the mode used to be looked at only after it).
    ("examples/arithmetic/compare_modes.py", ["--modes", "vopd,nope"], 2, "--modes: unknown ['nope']"),
    ("examples/arithmetic/compare_modes.py", ["--jobs", "0"], 2, "--jobs 0 must be >= 1"),
    ("examples/arithmetic/prepare.py", ["--out", "{file}/sub"], 2, "--out {file}/sub: cannot create it"),
    ("examples/smollm2/prepare.py", ["--out", "{file}/sub"], 2, "--out {file}/sub: cannot create it"),
    ("examples/arithmetic/accuracy.py", ["--load", "/nonexistent"], 1, "missing --num-layers"),
])
def test_example_scripts_refuse_bad_arguments(tmp_path, monkeypatch, capsys, path, argv, status, message):
    file = tmp_path / "a-file"
    file.write_text("")
    name = f"example_{Path(path).parent.name}_{Path(path).stem}"
    module = _example(path, name, monkeypatch)
    with pytest.raises(SystemExit) as info:
        module.main([a.replace("{file}", str(file)) for a in argv])
    err = capsys.readouterr().err + (str(info.value.code) if isinstance(info.value.code, str) else "")
    assert (info.value.code if isinstance(info.value.code, int) else 1) == status
    assert message.replace("{file}", str(file)) in err.strip().splitlines()[-1], err
    assert not any(tmp_path.glob("a-file/*"))
