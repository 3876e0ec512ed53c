"""Bad data files, by class, through the real entry points (in process).

Each case runs `vopd-train`, `vopd-eval` or `vopd-sft`'s `main` on the tiny
config with one bad input and asserts: a one-line `error: ...` (exit status 1)
naming the file, the row (line number) and the field; no process group was
created (so no model either: `guards.no_process_group`); and no input file
changed (`guards.TreeSnapshot` over the inputs and examples/tiny). The tiny
config has --vocab-size 250 and --seq-length 64.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from tests.guards import TreeSnapshot, no_process_group, user_error  # noqa: E402, F401
from vopd_megatron.eval.cli import main as eval_main  # noqa: E402
from vopd_megatron.training.sft import main as sft_main  # noqa: E402
from vopd_megatron.training.train import main as train_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<unk>", "</s>"] + [f"w{i}" for i in range(100)]
GOOD_ROLLOUT = '{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9], "logprobs": [-0.5, -1.25]}'


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "VOPD_DEBUG"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def dirs(tmp_path):
    """(inputs dir, outputs dir): inputs are checked unchanged, outputs are the run's own."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    return inputs, outputs


def base(outputs, *extra):
    """The tiny config without its --prompt-data (cases give theirs, or --rollout-data)."""
    config = outputs.parent / "config.yaml"
    if not config.exists():
        text = (ROOT / "examples/tiny/config.yaml").read_text()
        config.write_text("".join(line for line in text.splitlines(True) if not line.startswith("prompt-data:")))
    return ["--config", str(config), "--save", str(outputs / "ckpt"), "--tensorboard-dir", str(outputs / "tb"),
            *extra]


def word_tokenizer(path: Path, words=WORDS) -> Path:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def check(main, argv, inputs, *expected):
    """Run main on argv; assert the error names every `expected` string and no input changed."""
    snap = TreeSnapshot(inputs, ROOT / "examples" / "tiny")
    message = user_error(main, argv)
    for text in expected:
        assert str(text) in message, f"{text!r} not in {message!r}"
    assert snap.unchanged()
    return message


# --------------------------------------------------------------------- rollout files (--rollout-data)

ROLLOUT_CASES = {
    # id: (lines of the file, extra flags, what the message must say besides file:line)
    "null-prompt-ids": (['{"prompt_ids": null, "completion_ids": [1]}'], [], "'prompt_ids' must be a list of token ids, got null"),
    "string-completion": (['{"prompt_ids": [1], "completion_ids": "1 2 3"}'], [], "'completion_ids' must be a list"),
    "string-id": (['{"prompt_ids": ["1", 2], "completion_ids": [3]}'], [], "'prompt_ids'[0] is '1', a string"),
    "float-id": (['{"prompt_ids": [1, 2], "completion_ids": [3, 4.7]}'], [], "'completion_ids'[1] is 4.7, a float"),
    "integral-float-id": (['{"prompt_ids": [1, 2.0], "completion_ids": [3]}'], [], "a float id would be truncated"),
    "bool-id": (['{"prompt_ids": [1, true], "completion_ids": [3]}'], [], "'prompt_ids'[1] is True, a boolean"),
    "null-id": (['{"prompt_ids": [1], "completion_ids": [null]}'], [], "'completion_ids'[0] is None, null"),
    "id-past-vocab": (['{"prompt_ids": [1], "completion_ids": [2, 250]}'], [], "= 250 is outside the vocabulary [0, 250)"),
    "negative-id": (['{"prompt_ids": [-1], "completion_ids": [2]}'], [], "'prompt_ids'[0] = -1 is outside"),
    "empty-completion": (['{"prompt_ids": [1, 2], "completion_ids": []}'], [], "'completion_ids' is empty"),
    "empty-prompt": (['{"prompt_ids": [], "completion_ids": [3]}'], [], "'prompt_ids' is empty"),
    "prompt-fills-sequence": (['{"prompt_ids": ' + json.dumps([7] * 65) + ', "completion_ids": [3]}'], [],
                              "'prompt_ids' has 65 tokens, which fill --seq-length 64"),
    "nan-logprob": (['{"prompt_ids": [1], "completion_ids": [2, 3], "logprobs": [-0.5, NaN]}'], [],
                    "'logprobs'[1] is nan; log-probs must be finite"),
    "inf-logprob": (['{"prompt_ids": [1], "completion_ids": [2], "logprobs": [-Infinity]}'], [], "'logprobs'[0] is -inf"),
    "positive-logprob": (['{"prompt_ids": [1], "completion_ids": [2], "logprobs": [0.5]}'], [], "= 0.5 is positive"),
    "logprob-count": (['{"prompt_ids": [1], "completion_ids": [2, 3], "logprobs": [-1.0]}'], [], "1 log-probs for 2"),
    "string-logprob": (['{"prompt_ids": [1], "completion_ids": [2], "logprobs": ["-1"]}'], [], "'logprobs'[0] is '-1'"),
    "correction-without-logprobs": (['{"prompt_ids": [1], "completion_ids": [2]}'], ["--vopd-rollout-correction", "truncate"],
                                    "no 'logprobs' field, which --vopd-rollout-correction needs"),
    "misnamed-logprobs": (['{"prompt_ids": [1], "completion_ids": [2], "behavior_logprobs": [-1.0]}'],
                          ["--vopd-rollout-correction", "truncate"], "the record has 'behavior_logprobs': rename it"),
    "not-json": (['{"prompt_ids": [1], "completion_ids": [2'], [], "not valid JSON"),
    "json-list": (['[[1, 2], [3]]'], [], "expected a JSON object, got a list"),
    "missing-completion": (['{"prompt_ids": [1], "completion": [2]}'], [], "missing field 'completion_ids'"),
}


@pytest.mark.parametrize("case", list(ROLLOUT_CASES))
def test_bad_rollout_row(dirs, no_process_group, case):
    inputs, outputs = dirs
    lines, flags, says = ROLLOUT_CASES[case]
    path = inputs / "rollouts.jsonl"
    path.write_text("\n".join([GOOD_ROLLOUT, *lines]) + "\n")  # the bad row is line 2
    check(train_main, base(outputs, "--rollout-data", str(path), *flags), inputs, f"{path}:2", says)


def test_misnamed_logprob_fields_are_reported(tmp_path):
    # Without rollout correction the log-probs are optional, so a file that names them
    # otherwise is not an error, but they would go unread: the source lists such fields.
    from vopd_megatron.rollout.file_source import JsonlRolloutSource

    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt_ids": [1], "completion_ids": [2], "behavior_logprobs": [-1.0], "text": "x"}\n'
                    '{"prompt_ids": [1], "completion_ids": [2], "log_probs": [-1.0]}\n'
                    '{"prompt_ids": [1], "completion_ids": [2], "logprobs": [-1.0]}\n')
    source = JsonlRolloutSource(path, vocab_size=10)
    assert source.misnamed_logprobs == {"behavior_logprobs", "log_probs"}
    assert [r.logprobs is None for r in source.rollouts] == [True, True, False]


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "binary"])
def test_bad_rollout_file(dirs, no_process_group, case):
    inputs, outputs = dirs
    path = inputs / "rollouts.jsonl"
    says = {"missing": "does not exist", "directory": "is a directory; expected a file",
            "empty": "has no rollouts", "binary": "not UTF-8"}[case]
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_text("\n\n")
    elif case == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    check(train_main, base(outputs, "--rollout-data", str(path)), inputs, str(path), says)


# --------------------------------------------------------------------- prompt files (--prompt-data)

PROMPT_CASES = {
    "float-id": ('{"prompt_ids": [1, 2.5]}', "'prompt_ids'[1] is 2.5, a float"),
    "null-id": ('{"prompt_ids": [1, null]}', "'prompt_ids'[1] is None, null"),
    "id-past-vocab": ('{"prompt_ids": [1, 999]}', "= 999 is outside the vocabulary [0, 250)"),
    "empty-ids": ('{"prompt_ids": []}', "is empty"),
    "null-prompt": ('{"prompt": null}', "field 'prompt' is neither a string"),
    "number-prompt": ('{"prompt": 12}', "got an integer"),
    "null-chat-content": ('{"messages": [{"role": "user", "content": null}]}', "'content' must be text, got null"),
}


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_bad_prompt_row(dirs, no_process_group, case):
    inputs, outputs = dirs
    line, says = PROMPT_CASES[case]
    path = inputs / "prompts.jsonl"
    path.write_text('{"prompt_ids": [3, 4]}\n' + line + "\n")
    check(train_main, base(outputs, "--prompt-data", str(path)), inputs, f"{path}:2", says)


@pytest.mark.parametrize("case", ["directory", "corrupt-parquet", "unknown-extension"])
def test_bad_prompt_file(dirs, no_process_group, case):
    inputs, outputs = dirs
    path = {"directory": inputs / "prompts.jsonl", "corrupt-parquet": inputs / "p.parquet",
            "unknown-extension": inputs / "p.txt"}[case]
    says = {"directory": "is a directory; expected a file", "corrupt-parquet": "not a readable Parquet file",
            "unknown-extension": "unknown extension '.txt'"}[case]
    if case == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"PAR1 this is not parquet")
    check(train_main, base(outputs, "--prompt-data", str(path)), inputs, str(path), says)


# --------------------------------------------------------------------- evaluation problems (--eval-data)

EVAL_CASES = {
    "null-answer": ('{"problem": [1, 2], "answer": null}', "answer field 'answer' must be a non-empty string or number, got null"),
    "bool-answer": ('{"problem": [1, 2], "answer": true}', "got a boolean"),
    "list-answer": ('{"problem": [1, 2], "answer": [3]}', "got a list"),
    "nan-answer": ('{"problem": [1, 2], "answer": NaN}', "answer field 'answer' is nan"),
    "blank-answer": ('{"problem": [1, 2], "answer": "  "}', "got a blank string"),
    "float-problem-id": ('{"problem": [1, 2.5], "answer": "3"}', "'problem'[1] is 2.5, a float"),
    "problem-id-past-vocab": ('{"problem": [1, 300], "answer": "3"}', "= 300 is outside the vocabulary"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_bad_eval_problem(dirs, no_process_group, case):
    inputs, outputs = dirs
    line, says = EVAL_CASES[case]
    path = inputs / "eval.jsonl"
    path.write_text('{"problem": [3, 4], "answer": "7"}\n' + line + "\n")
    check(train_main, base(outputs, "--prompt-data", "examples/tiny/prompts.jsonl", "--eval-data", str(path),
                           "--eval-every", "1"), inputs, f"{path}:2", says)


@pytest.mark.parametrize("case", ["file", "under-a-file"])
def test_eval_output_is_checked_before_the_evaluation(dirs, no_process_group, case):
    inputs, outputs = dirs
    blocker = inputs / "results"
    blocker.write_text("an earlier result\n")
    target = blocker if case == "file" else blocker / "run1"
    says = "exists and is not a directory" if case == "file" else f"{blocker} is not a directory"
    check(eval_main, base(outputs, "--load", str(outputs / "ckpt"), "--eval-data", "examples/tiny/eval.jsonl",
                          "--eval-output", str(target)), inputs, f"--eval-output {target}", says)


# --------------------------------------------------------------------- tokenizers (--tokenizer-model)

def make_tokenizer(inputs: Path, case: str) -> tuple[Path, str]:
    """(the --tokenizer-model path of `case`, the file its message must name)."""
    if case == "truncated-json":
        path = inputs / "tokenizer.json"
        path.write_text(word_tokenizer(inputs / "good.json").read_text()[:100])
        return path, path
    if case == "json-not-a-tokenizer":
        path = inputs / "tokenizer.json"
        path.write_text('{"vocab": [1, 2]}')
        return path, path
    if case == "empty-json":
        path = inputs / "tokenizer.json"
        path.write_text("")
        return path, path
    if case == "corrupt-config-in-dir":
        d = inputs / "tok"
        d.mkdir()
        word_tokenizer(d / "tokenizer.json")
        (d / "tokenizer_config.json").write_text('{"model_max_length": 12,')
        return d, d / "tokenizer_config.json"
    if case == "dir-without-tokenizer":
        d = inputs / "tok"
        d.mkdir()
        (d / "vocab.txt").write_text("a\nb\n")
        return d, d
    if case == "garbage-sentencepiece":
        path = inputs / "tokenizer.model"
        path.write_bytes(os.urandom(64))
        return path, path
    if case == "missing":
        return inputs / "nope" / "tokenizer.json", inputs / "nope" / "tokenizer.json"
    if case == "larger-than-vocab":
        path = word_tokenizer(inputs / "big.json", WORDS + [f"x{i}" for i in range(200)])  # 302 tokens > 250
        return path, path
    raise AssertionError(case)


TOKENIZER_SAYS = {
    "truncated-json": "cannot be read as a Hugging Face tokenizer.json",
    "json-not-a-tokenizer": "cannot be read as a Hugging Face tokenizer.json",
    "empty-json": "cannot be read",
    "corrupt-config-in-dir": "is not valid JSON",
    "dir-without-tokenizer": "has none of tokenizer_config.json",
    "garbage-sentencepiece": "is not a sentencepiece model",
    "missing": "does not exist",
    "larger-than-vocab": "has 302 tokens but --vocab-size is 250",
}


# The vocabulary bound is checked on the student's tokenizer; the teacher's must equal it.
@pytest.mark.parametrize("case,flag", [(c, f) for f in ("--tokenizer-model", "--teacher-tokenizer-model")
                                       for c in TOKENIZER_SAYS if (c, f) != ("larger-than-vocab",
                                                                         "--teacher-tokenizer-model")])
def test_bad_tokenizer(dirs, no_process_group, case, flag):
    inputs, outputs = dirs
    path, named = make_tokenizer(inputs, case)
    extra = [] if flag == "--tokenizer-model" else ["--tokenizer-model", str(word_tokenizer(inputs / "s.json"))]
    check(train_main, base(outputs, "--prompt-data", "examples/tiny/prompts.jsonl", flag, str(path), *extra),
          inputs, named, TOKENIZER_SAYS[case])


# --------------------------------------------------------------------- SFT rows (vopd-sft --sft-data)

SFT_CASES = {
    "null-completion": ('{"prompt": "w1 w2", "completion": null}', "needs a text field 'completion' (got null)"),
    "number-prompt": ('{"prompt": 5, "completion": "w3"}', "needs a text field 'prompt' (got int)"),
    "empty-completion-no-eos": ('{"prompt": "w1 w2", "completion": ""}', "field 'completion' is empty"),
    "too-long": (json.dumps({"prompt": " ".join(["w1"] * 60), "completion": " ".join(["w2"] * 10)}),
                 "70 tokens do not fit --seq-length 64"),
    "not-json": ('{"prompt": "w1", ', "not valid JSON"),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_bad_sft_row(dirs, no_process_group, case):
    inputs, outputs = dirs
    line, says = SFT_CASES[case]
    path = inputs / "sft.jsonl"
    path.write_text('{"prompt": "w1 w2", "completion": "w3"}\n' + line + "\n")
    tok = word_tokenizer(inputs / "tokenizer.json")
    check(sft_main, base(outputs, "--tokenizer-model", str(tok), "--sft-data", str(path)), inputs, f"{path}:2", says)


@pytest.mark.parametrize("case", ["directory", "tokenizer-larger-than-vocab"])
def test_bad_sft_inputs(dirs, no_process_group, case):
    inputs, outputs = dirs
    rows = inputs / "sft.jsonl"
    if case == "directory":
        rows.mkdir()
        tok, named, says = word_tokenizer(inputs / "tokenizer.json"), rows, "is a directory; expected a file"
    else:
        rows.write_text('{"prompt": "w1", "completion": "w2"}\n')
        tok = word_tokenizer(inputs / "big.json", WORDS + [f"x{i}" for i in range(200)])
        named, says = tok, "has 302 tokens but --vocab-size is 250"
    check(sft_main, base(outputs, "--tokenizer-model", str(tok), "--sft-data", str(rows)), inputs, named, says)


# --------------------------------------------------------------------- the real command line

def test_command_line_status_and_one_line(tmp_path):
    # What the in-process cases imply, checked once on the real process: exit
    # status 1, the error as the last stderr line, no traceback; and with
    # VOPD_DEBUG=1 the traceback of the same error.
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"prompt_ids": [1], "completion_ids": [2.5]}\n')
    cmd = [sys.executable, "-m", "vopd_megatron.training.train", *base(tmp_path, "--rollout-data", str(path))]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "VOPD_DEBUG")}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (f"error: {path}:1: field 'completion_ids'[0] is 2.5, a float; "
                                                  "token ids are integers (a float id would be truncated)")
    assert "Traceback" not in out.stderr
    debug = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "VOPD_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DataError" in debug.stderr
