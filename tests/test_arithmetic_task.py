"""The arithmetic testbed's generator: disjoint splits, correct worked solutions, answers the grader reads."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "arithmetic" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_splits_are_disjoint_and_deterministic():
    task = _load("task")
    a, b = task.make_splits(n_sft=3000, n_prompts=500, n_eval=200), task.make_splits(n_sft=3000, n_prompts=500,
                                                                                       n_eval=200)
    assert a == b
    sets = {k: set(v) for k, v in a.items()}
    assert all(len(sets[k]) == len(a[k]) for k in a)  # no duplicates inside a split
    assert not sets["heldout"] & sets["prompts"] and not sets["heldout"] & sets["sft"]
    assert not sets["prompts"] & sets["sft"]


def test_worked_solutions_are_right():
    task, acc = _load("task"), _load("accuracy")
    for x, y in task.make_splits(n_sft=300, n_prompts=10, n_eval=10)["sft"]:
        sol = task.solution(x, y)
        assert acc.boxed_answer(sol) == str(x + y)
        digits_x, digits_y = str(x)[::-1], str(y)[::-1]
        carry = 0
        for i, step in enumerate(sol.split(";")[:-1]):  # "a+b(+1)=s", units first
            terms, total = step.split("=")
            parts = [int(t) for t in terms.split("+")]
            want_x = int(digits_x[i]) if i < len(digits_x) else 0
            want_y = int(digits_y[i]) if i < len(digits_y) else 0
            assert parts == [want_x, want_y] + ([1] if carry else [])
            assert int(total) == sum(parts)
            carry = int(total) // 10
        assert re.fullmatch(r"[0-9+=;\\boxed{}]+", sol)


def test_accuracy_grader():
    acc = _load("accuracy")
    assert acc.accuracy(["1+2=3;\\boxed{3}", "\\boxed{4}", "no answer"], ["3", "5", "1"]) == 1 / 3
