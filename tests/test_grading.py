"""Answer extraction and the math-aware checker, including its time limit."""

import threading
import time

import pytest

from onpolicy_sft.grading import extract_answer, is_correct


@pytest.mark.parametrize("text, want", [
    ("so \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{x^{2}+\\{1\\}}", "x^{2}+\\{1\\}"),
    ("calc 3+4=7\n#### 7", "7"),
    ("#### 1,234 \n", "1,234"),
    ("\\boxed{5} and later #### 9", "5"),   # a box wins over the GSM8K marker
    ("\\boxed{12} then an unterminated \\boxed{3", "12"),
    ("\\boxed{unbalanced", None),
    ("\\boxed{1} then \\fbox{7}", "7"),
    ("a \\boxed {x^{2}+\\frac{1}{3}} b", "x^{2}+\\frac{1}{3}"),
    ("#### 5\nthen prose", "5"),
    ("The answer is 42.", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("text, reference, want", [
    ("\\boxed{42}", "42", True),
    ("\\boxed{41}", "42", False),
    ("The answer is 42.", "42", False),          # no boxed answer
    ("#### 42", "42", True),
    ("\\boxed{1,234}", "1234", True),            # thousands separator
    ("\\boxed{1{,}234}", "1234", True),
    ("\\boxed{12 \\text{ dollars}}", "12", True),  # units
    ("\\boxed{\\$12}", "12", True),
    ("\\boxed{5 cm}", "5", True),
    ("\\boxed{2pi}", "2", False),                # letters that are mathematics are not a unit
    ("\\boxed{0.5}", "\\frac{1}{2}", True),      # fractions
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("\\boxed{-\\frac{6}{8}}", "-0.75", True),
    ("\\boxed{\\frac{1}{3}}", "0.33", False),
    ("\\boxed{42}", "Solution ... \\boxed{42}", True),  # a reference given as a full solution
    ("\\boxed{7}", "calc 3+4=7\n#### 7", True),
])
def test_is_correct_simple(text, reference, want):
    assert is_correct(text, reference) is want


@pytest.mark.parametrize("text, reference, want", [
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{x^2+1}", "(x+1)^2", False),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", True),
])
def test_is_correct_symbolic(text, reference, want):
    assert is_correct(text, reference) is want


def test_huge_expression_respects_the_time_limit():
    is_correct("\\boxed{1}", "2\\sqrt{2}")  # start the worker outside the timed part
    huge = "\\boxed{9^{9^{9^{9^{9}}}} - 1}"
    start = time.monotonic()
    assert is_correct(huge, "2", timeout=1.0) is False
    assert time.monotonic() - start < 6.0
    # The checker comes back for the next question after killing its worker.
    assert is_correct("\\boxed{\\sqrt{8}}", "2\\sqrt{2}")


def test_works_off_the_main_thread():
    got = []
    t = threading.Thread(target=lambda: got.append(is_correct("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", timeout=5.0)))
    t.start()
    t.join(60)
    assert got == [True]


def test_model_text_is_never_evaluated(tmp_path):
    flag = tmp_path / "pwned"
    text = f"\\boxed{{__import__('pathlib').Path('{flag}').write_text('x')}}"
    assert is_correct(text, "1") is False
    assert not flag.exists()
