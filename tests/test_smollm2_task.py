"""The SmolLM2 example's generated questions: disjoint splits, every family in both, answers the grader accepts."""
import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _task():
    spec = importlib.util.spec_from_file_location("smollm2_task", ROOT / "examples" / "smollm2" / "task.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _solve(question: str) -> int:
    """An independent reading of each question's arithmetic (not the generator's)."""
    nums = [int(x) for x in re.findall(r"\d+", question)]
    if "weeks" in question:
        return 7 * nums[0]
    if "dozen" in question:
        return 12 * nums[0]
    assert len(nums) == 2 and ("+" in question or "plus" in question or "buys" in question), question
    return nums[0] + nums[1]


def test_splits_are_disjoint_deterministic_and_cover_every_family(tmp_path):
    task = _task()
    a, b = task.make_splits(), task.make_splits()
    assert a == b
    held, prompts = {p["question"] for p in a["heldout"]}, {p["question"] for p in a["prompts"]}
    assert len(held) == len(a["heldout"]) and len(prompts) == len(a["prompts"])
    assert not held & prompts
    for split in a.values():
        assert {p["family"] for p in split} == set(task.FAMILIES)
    assert task.make_splits(seed=1)["heldout"] != a["heldout"]
    files = task.write_data(tmp_path)
    rows = [json.loads(line) for line in files["heldout"].read_text().splitlines()]
    assert [r["problem"] for r in rows] == [p["question"] for p in a["heldout"]]


def test_answers_are_right_and_graded_as_such():
    from vopd_megatron.eval.grading import grade_problem

    task = _task()
    for p in task.make_splits()["heldout"]:
        assert p["question"].endswith(task.SUFFIX)
        assert int(p["answer"]) == _solve(p["question"])
        right, wrong = f"The answer is {p['answer']}.", f"The answer is {int(p['answer']) + 1}."
        assert grade_problem([right, wrong], p["answer"]).correct == [True, False]
