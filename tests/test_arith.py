"""The embedded arithmetic dataset: determinism, disjoint splits, answers recomputed independently."""

from __future__ import annotations

import re
from collections import Counter
from statistics import mean

import pytest

from onpolicy_sft import arith
from onpolicy_sft.arith import arithmetic_splits, general_prompts

LINE = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def evaluate_solution(response: str) -> tuple[int, list[int]]:
    """Check a calculator-style solution line by line (a tiny parser, no eval).

    Returns (final answer, operands that must come from the question). Each line's left operand
    is the previous line's result, except on the first line.
    """
    *lines, final = response.split("\n")
    assert final.startswith("#### ") and 1 <= len(lines) <= 4, response
    previous, given = None, []
    for k, line in enumerate(lines):
        m = LINE.match(line)
        assert m, f"not a calculator line: {line!r}"
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if op == "/":
            assert b > 0 and a % b == 0, line  # integer division only
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else None}[op]
        assert value == c and c > 0, f"wrong or non-positive step: {line!r}"
        if k == 0:
            given.append(a)
        else:
            assert a == previous, f"line {line!r} does not continue from {previous}"
        given.append(b)
        previous = c
    assert int(final[5:]) == previous
    return previous, given


@pytest.fixture(scope="module")
def splits():
    return arithmetic_splits(seed=0, n_train=300, n_test=150, n_test_hard=150)


def test_schema_and_answers_recomputed_from_solution_lines(splits):
    for name, ds in splits.items():
        assert ds.column_names == ["id", "prompt", "response", "answer", "system", "exemplars"]
        for row in ds:
            value, given = evaluate_solution(row["response"])
            assert row["answer"] == str(value)
            assert row["prompt"].endswith(" " + arith.BOXED_INSTRUCTION) and "\\boxed{}" in row["prompt"]
            numbers = [int(x) for x in re.findall(r"\d+", row["prompt"])]
            assert sorted(given) == sorted(numbers), row["prompt"]  # every operand is stated, nothing else
            assert row["system"] == ""


def test_deterministic_by_seed_and_prefix_stable(splits):
    again = arithmetic_splits(seed=0, n_train=300, n_test=150, n_test_hard=150)
    for name in splits:
        assert splits[name].to_list() == again[name].to_list()
    other = arithmetic_splits(seed=1, n_train=300, n_test=150, n_test_hard=150)
    assert set(other["test"]["prompt"]) != set(splits["test"]["prompt"])
    # evaluation rows do not depend on the other sizes; the first k rows of a split are fixed
    small = arithmetic_splits(seed=0, n_train=10, n_test=40, n_test_hard=20)
    assert small["test"]["id"] == splits["test"]["id"][:40]
    assert small["test_hard"]["id"] == splits["test_hard"]["id"][:20]


def test_splits_are_disjoint_with_unique_ids(splits):
    prompts = {name: set(ds["prompt"]) for name, ds in splits.items()}
    assert all(len(prompts[n]) == len(splits[n]) for n in splits)
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["test_hard"]
    assert not prompts["test"] & prompts["test_hard"]
    ids = [i for ds in splits.values() for i in ds["id"]]
    assert len(set(ids)) == len(ids)


def test_at_least_20_templates_all_used_with_1_to_4_operations():
    assert len(arith.STORIES) >= 20
    easy = arith.generate(0, 600, "easy", stream="t")
    hard = arith.generate(0, 300, "hard", stream="t")
    assert {p.template for p in easy} == set(range(len(arith.STORIES)))
    assert {p.n_ops for p in easy + hard} == {1, 2, 3, 4}


def test_test_hard_is_harder(splits):
    def steps(ds):
        return [len(r.split("\n")) - 1 for r in ds["response"]]

    def largest(ds):
        return [max(int(x) for x in re.findall(r"\d+", r)) for r in ds["response"]]

    assert min(steps(splits["test_hard"])) > mean(steps(splits["test"])) and min(steps(splits["test_hard"])) >= 3
    assert mean(largest(splits["test_hard"])) > 3 * mean(largest(splits["test"]))


def test_general_prompts_have_no_math():
    prompts = general_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    assert not any(re.search(r"\d|[+*/=]", p) for p in prompts)


def _ops(ds) -> dict[int, int]:
    return dict(Counter(len(r.split("\n")) - 1 for r in ds["response"]))


def test_fixed_seed_gives_the_documented_split_sizes_and_level_mix():
    """The numbers in arith's docstring and results/arith_calibration.md: the main job's sizes and the defaults."""
    job = arithmetic_splits(seed=0, n_train=40, n_test=48, n_test_hard=24)
    assert {name: len(ds) for name, ds in job.items()} == {"train": 40, "test": 48, "test_hard": 24}
    assert _ops(job["train"]) == {1: 27, 2: 13}
    assert _ops(job["test"]) == {1: 31, 2: 14, 3: 3} and _ops(job["test_hard"]) == {3: 15, 4: 9}
    full = arithmetic_splits(seed=0)
    assert {name: len(ds) for name, ds in full.items()} == {"train": 1000, "test": 200, "test_hard": 200}
    assert _ops(full["train"]) == {1: 744, 2: 256}
    assert _ops(full["test"]) == {1: 127, 2: 52, 3: 21} and _ops(full["test_hard"]) == {3: 113, 4: 87}
    # the evaluation splits are the easy and hard levels' own streams, whatever the train level
    assert full["test"]["prompt"] == [p.prompt for p in arith.generate(0, 200, "easy", stream="test")]
