"""Grading: the final answer of a solution or a response, and whether it equals the reference.

One leaf module used by data loading (reference answers from demonstrations), the corpus
rewrite (verification), preference pairs and evaluation, so all of them read answers by the
same rules.

The final answer is the last ``\\boxed{...}`` of the text (nested braces allowed), else the
number after a GSM8K-style ``#### ``, else there is none (and the response is wrong). Simple
answers (integers, decimals, fractions, with thousands separators and units stripped) are
compared exactly here. Anything else goes to math-verify, which parses LaTeX and compares
symbolically, in a separate worker process that is killed when a check overruns its time
limit: sympy can spend minutes inside one C call (a power tower, a huge factorial) where no
signal-based timeout fires, and model text is never passed to ``eval``.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import threading
from fractions import Fraction

# Every form in which a response states its final answer. Hinted Decoding's answer guard watches
# for these same markers, so whatever is graded was written by the student stream alone.
ANSWER_MARKERS = ("\\boxed", "\\fbox", "####")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]+)")


def last_boxed(text: str) -> str | None:
    """The content of the last terminated ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces);
    an unterminated box (a truncated answer) is passed over for the one before it."""
    for match in reversed(list(_BOXED.finditer(text))):
        start = match.end()
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def hashes_answer(text: str) -> str | None:
    """What follows the last GSM8K-style ``#### `` marker, to the end of its line."""
    found = _HASHES.findall(text)
    return (found[-1].strip() or None) if found else None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a solution or a response: its last box, else its ``#### `` answer, else None.
    The data loaders take reference answers from demonstrations by the same rules."""
    if not text:
        return None
    boxed = last_boxed(text)
    return boxed if boxed is not None else hashes_answer(text)


_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")
# Letters after a number that are mathematics, not a unit: "2pi" is not 2.
_MATH_WORDS = {"pi", "sqrt", "ln", "log", "exp", "sin", "cos", "tan", "cdot", "times", "frac", "infty"}
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def _plain_number(answer: str) -> Fraction | None:
    """The exact value of a simple numeric answer ("1,234", "-3.5", "$12", "7 apples", "3/4",
    "\\frac{3}{4}", "50\\%"), or None when the answer is anything richer."""
    s = _UNIT_TEXT.sub("", answer)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").replace("\\!", "")
    s = s.replace("\\,", "").replace("{,}", ",").strip().rstrip(".")
    frac = re.fullmatch(r"(-?)\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}", s)
    if frac:
        num, den = _plain_number(frac.group(2)), _plain_number(frac.group(3))
        if num is None or den is None or den == 0:
            return None
        return -num / den if frac.group(1) else num / den
    slash = re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", s)
    if slash:
        return None if int(slash.group(2)) == 0 else Fraction(int(slash.group(1)), int(slash.group(2)))
    # A number followed only by a unit word or two ("12 dollars", "5 cm"): the number counts.
    m = re.fullmatch(rf"({_NUMBER.pattern})((?:\s*[A-Za-z]{{2,}}\.?){{0,2}})", s)
    if not m or set(re.findall(r"[A-Za-z]+", m.group(2).lower())) & _MATH_WORDS:
        return None
    return Fraction(m.group(1).replace(",", ""))


def _normalise(answer: str) -> str:
    return re.sub(r"\s+", "", _UNIT_TEXT.sub("", answer)).replace("\\left", "").replace("\\right", "")


def _worker(conn) -> None:
    # Runs in its own process, in its main thread, so math-verify's own signal timeouts work
    # for ordinary slowness; the parent's kill covers the rest.
    from math_verify import parse, verify

    while True:
        try:
            gold, pred, seconds = conn.recv()
        except EOFError:
            return
        try:
            limit = max(1, int(seconds))
            g = parse(f"${gold}$", parsing_timeout=limit)
            p = parse(f"${pred}$", parsing_timeout=limit)
            ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=limit))
        except Exception:
            ok = False
        conn.send(ok)


class _Checker:
    """One long-lived math-verify worker process, restarted after it is killed for overrunning."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process that holds torch threads or an engine
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True, name="math-verify")
        self.proc.start()
        child.close()
        self.conn = parent

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        self.proc = self.conn = None

    def check(self, gold: str, pred: str, timeout: float) -> bool:
        with self.lock:
            if self.proc is None or not self.proc.is_alive():
                self._start()
                # The first call also pays the worker's start-up (importing sympy): not the check's fault.
                timeout = timeout + 30.0
            self.conn.send((gold, pred, timeout))
            if self.conn.poll(timeout):
                try:
                    return bool(self.conn.recv())
                except EOFError:
                    self._kill()
                    return False
            self._kill()
            return False


_checker = _Checker()


def is_correct(text: str | None, reference_answer: str, timeout: float = 5.0) -> bool:
    """Whether the final answer of `text` equals `reference_answer` (itself a bare answer, or a
    full solution with a box or ``#### N``). Each symbolic check runs under `timeout` seconds
    (after the first call's worker start-up); an overrun counts as wrong."""
    pred = extract_answer(text)
    if pred is None:
        return False
    gold = extract_answer(reference_answer) or str(reference_answer).strip()
    if not gold:
        return False
    if _normalise(pred) == _normalise(gold):
        return True
    a, b = _plain_number(pred), _plain_number(gold)
    if a is not None and b is not None:
        return a == b
    if len(pred) > 2000:  # no answer to a math problem is this long; do not feed it to sympy
        return False
    return _checker.check(gold, pred, timeout)
