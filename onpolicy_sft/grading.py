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

The worker is a fresh interpreter running ``python -m onpolicy_sft.grading``, not a
multiprocessing child: a spawned child re-imports the caller's ``__main__``, which re-runs a
user's script that has no ``if __name__ == "__main__":`` guard. Nothing here reads ``__main__``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

# The forms in which a response states its final answer. Hinted Decoding's answer guard watches
# for the same ones (decoding.rules.ANSWER_MARKERS): a form added here is added there too.
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_HASHES = re.compile(r"####\s*([^\n]+)")


def last_boxed(text: str) -> str | None:
    """The content of the last terminated ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces);
    an unterminated box (a truncated answer) is passed over for the one before it.

    Linear in the length of the text: every brace is matched once, in one pass with a stack, and
    the boxes are then looked up from the last one back (a text of many unterminated boxes, as a
    repetitive generation writes, would cost a scan to the end per box otherwise).
    """
    boxes = [m.end() - 1 for m in _BOXED.finditer(text)]  # the index of each box's opening brace
    if not boxes:
        return None
    closing = {}
    opened = []
    for brace in _BRACE.finditer(text):
        if brace.group() == "{":
            opened.append(brace.start())
        elif opened:
            closing[opened.pop()] = brace.start()
    for start in reversed(boxes):
        if start in closing:
            return text[start + 1 : closing[start]].strip()
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
    if sum(c.isdigit() for c in s) > _MAX_DIGITS:
        return None
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


class GraderUnavailableError(RuntimeError):
    """The math-verify worker cannot run (math-verify missing or broken): no answer can be checked."""


def _serve() -> None:
    """The worker's loop: one JSON request ``[gold, pred, seconds]`` per line on stdin, one JSON
    ``true``/``false`` per line on stdout, after a first line saying whether math-verify works.

    It runs in its main thread, so math-verify's own signal timeouts work for ordinary slowness;
    the parent's kill covers the rest.
    """
    # Keep the protocol on a private copy of stdout: whatever a library prints goes to stderr.
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def send(message) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    try:
        from math_verify import parse, verify

        # One known equality, before any answer: a broken install (say, an antlr4 runtime of another
        # version, which fails only when LaTeX is parsed) is reported instead of grading every answer
        # wrong, and the parser's first-use cost is paid here rather than inside a check's time limit.
        if not verify(parse("$\\sqrt{8}$"), parse("$2\\sqrt{2}$")):
            raise RuntimeError("it does not find that \\sqrt{8} equals 2\\sqrt{2}")
    except Exception as exc:
        send({"error": f"{type(exc).__name__}: {exc}"})
        return
    send({"ready": True})
    for line in sys.stdin:
        gold, pred, seconds = json.loads(line)
        try:
            limit = max(1, int(seconds))
            g = parse(f"${gold}$", parsing_timeout=limit)
            p = parse(f"${pred}$", parsing_timeout=limit)
            ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=limit))
        except Exception:
            ok = False
        send(ok)


def _pump(stream, replies: queue.Queue) -> None:
    """Move the worker's reply lines into a queue (None at its end), so that waiting on a reply
    can time out on every platform."""
    with stream:  # closed here, by its only reader, once the worker has gone
        for line in stream:
            replies.put(line)
    replies.put(None)


class _Checker:
    """One long-lived math-verify worker process, restarted after it is killed for overrunning."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.replies = None

    def _start(self) -> None:
        # The worker imports this very file, so it must find the same package as the caller.
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onpolicy_sft.grading"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            text=True, encoding="utf-8", start_new_session=True)  # a Ctrl-C meant for the caller does not reach it
        self.replies = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, self.replies), daemon=True,
                         name="math-verify-replies").start()
        try:
            first = self.replies.get(timeout=_START_SECONDS)
        except queue.Empty:
            first = None
            problem = f"did not start within {_START_SECONDS:.0f} s"
        else:
            problem = f"exited with status {self.proc.wait()} before it was ready" if first is None else ""
        status = json.loads(first) if first else {}
        if not status.get("ready"):
            self.close()
            why = f"finds math-verify broken ({status['error']})" if "error" in status else problem
            raise GraderUnavailableError(
                f"the answer checker's worker process ({sys.executable} -m onpolicy_sft.grading) {why}. Symbolic "
                "answers cannot be graded; reinstall it in this environment: pip install --force-reinstall math-verify")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            with contextlib.suppress(OSError):  # a request it never read may still sit in the buffer
                self.proc.stdin.close()
        self.proc = self.replies = None

    def check(self, gold: str, pred: str, timeout: float) -> bool:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.close()
                self._start()
            try:
                self.proc.stdin.write(json.dumps([gold, pred, timeout]) + "\n")
                self.proc.stdin.flush()
                line = self.replies.get(timeout=timeout)
            except (OSError, queue.Empty):  # died under the question, or overran: wrong, and a fresh worker next
                line = None
            if line is None:
                self.close()
                return False
            return json.loads(line) is True


# Python refuses int() of longer digit strings at its lowest settable limit (sys.set_int_max_str_digits);
# such answers go to math-verify, whose worker catches that.
_MAX_DIGITS = 640
# No answer to a math problem is this long; it is not fed to a parser.
_MAX_ANSWER_CHARS = 2000
# Importing sympy and math-verify, on a loaded machine.
_START_SECONDS = 120.0
_checker = _Checker()
atexit.register(_checker.close)


def is_correct(text: str | None, reference_answer: str, timeout: float = 5.0) -> bool:
    """Whether the final answer of `text` equals `reference_answer` (itself a bare answer, or a
    full solution with a box or ``#### N``). Each symbolic check runs under `timeout` seconds;
    an overrun counts as wrong. It never raises on what a model wrote; it raises
    ``GraderUnavailableError`` when math-verify itself cannot run."""
    pred = extract_answer(text)
    if pred is None:
        return False
    gold = extract_answer(reference_answer) or str(reference_answer).strip()
    if not gold:
        return False
    if _normalise(pred) == _normalise(gold):
        return True
    if len(pred) > _MAX_ANSWER_CHARS or len(gold) > _MAX_ANSWER_CHARS:
        return False
    a, b = _plain_number(pred), _plain_number(gold)
    if a is not None and b is not None:
        return a == b
    return _checker.check(gold, pred, timeout)


if __name__ == "__main__":
    _serve()
