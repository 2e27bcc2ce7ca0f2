"""What the corpus rewrite (onpolicy_sft/rewrite.py) records of its answers: where a final answer
ends, which right answers a question keeps, and the run's counts per source and per outcome."""

from __future__ import annotations

import re

SOURCES = ("self", "hinted", "original", "in_distribution")
OUTCOMES = ("right", "wrong", "no_answer", "cut")
ATTEMPTS = ("self", "hinted")  # the two kinds of answer a question is attempted with, in order


def answer_end(text: str) -> int | None:
    """Where the final answer that ``onpolicy_sft.grading.extract_answer`` reads ends in ``text``:
    after the closing brace of the last terminated box, else at the end of the last ``#### ``
    line; None when there is no final answer. One pass over the braces (a stack), so a
    repetitive text full of unterminated boxes costs linear time."""
    closes, stack = {}, []
    for brace in re.finditer(r"[{}]", text):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            closes[stack.pop()] = brace.start()
    for box in reversed([m.end() - 1 for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]):
        if box in closes:
            return closes[box] + 1
    hashes = list(re.finditer(r"####\s*[^\n]+", text))
    return hashes[-1].end() if hashes else None


def pick_answers(texts: list[str], cuts: list[bool], outcomes: list[str], n: int = 1) -> list[tuple[str, bool]]:
    """Up to n distinct answers to keep of one attempt, each with whether it is truncated: the right
    answers that ended by themselves in order, then right ones cut after their final answer
    (the truncation rule of onpolicy_sft/rewrite.py). Distinct as kept: two answers equal once
    cut count once."""
    right = [i for i, o in enumerate(outcomes) if o == "right"]
    ended = [(texts[i], False) for i in right if not cuts[i]]
    cut = [(texts[i][: answer_end(texts[i])].rstrip(), True) for i in right if cuts[i]]
    picked, seen = [], set()
    for text, truncated in ended + cut:
        if text not in seen and len(picked) < n:
            seen.add(text)
            picked.append((text, truncated))
    return picked


def ended_right(answers: list[tuple[str, bool]], outcomes: list[str]) -> int:
    """How many distinct right answers that ended by themselves there are: what adaptive sampling waits for."""
    return len({text for (text, cut), o in zip(answers, outcomes) if o == "right" and not cut})


def rows_per_source(rows: list[dict]) -> dict[str, int]:
    return {s: sum(r["source"] == s for r in rows) for s in SOURCES}


def _attempt_counts(outcome_lists: list[list[str]]) -> dict:
    answers = [o for outcomes in outcome_lists for o in outcomes]
    return {
        "rows": sum(bool(outcomes) for outcomes in outcome_lists),
        "answers": len(answers),
        **{o: answers.count(o) for o in OUTCOMES},
        "rows_right": sum("right" in outcomes for outcomes in outcome_lists),
    }


def rewrite_stats(rows: list[dict], fallback: str = "original") -> dict:
    """The run's record: rows per source, acceptance rates, the outcome counts of each attempt, and
    mean φ of the originals and of the kept responses.

    ``attempts`` = {"self": S, "hinted": S} where S counts that attempt's answers: ``rows`` (rows that
    reached it), ``answers``, one count per outcome (``right``, ``wrong``, ``no_answer``,
    ``cut``; they add up to ``answers``) and ``rows_right`` (rows with at least one right answer).
    ``truncated_kept``: kept rewrites cut after their final answer (``response_truncated``).
    ``rows`` counts questions; ``per_source`` the rows each source gave (with keep_verified > 1 a
    question gives several), ``questions_per_source`` the questions, ``training_rows`` the rows kept.
    """
    questions = [r for r in rows if not r.get("copy")]
    n = len(questions)
    per_question = rows_per_source(questions)
    accepted = per_question["self"] + per_question["hinted"]
    tried_hinted = sum(r["source"] in ("hinted", "original") for r in questions)
    stats = {
        "rows": n,
        "per_source": rows_per_source(rows),
        "questions_per_source": per_question,
        "training_rows": sum(r["kept"] for r in rows),
        "dropped": sum(not r["kept"] for r in rows),
        "acceptance_rate": accepted / n if n else 0.0,
        "hinted_acceptance_rate": per_question["hinted"] / tried_hinted if tried_hinted else 0.0,
        "fallback": fallback,
        "attempts": {kind: _attempt_counts([r[f"{kind}_outcomes"] for r in questions]) for kind in ATTEMPTS},
        "truncated_kept": sum(bool(r["response_truncated"]) for r in rows if r["kept"]),
    }

    def mean(values):
        values = [v for v in values if v is not None and v == v]
        return sum(values) / len(values) if values else None

    if rows and "ddt_phi_mean" in rows[0]:
        kept = [r for r in rows if r["kept"]]
        rewritten = [r for r in rows if r["source"] in ("self", "hinted")]
        stats.update(
            phi_before=mean(r["ddt_original_phi_mean"] for r in questions),
            phi_after=mean(r["ddt_phi_mean"] for r in kept),
            phi_before_rewritten=mean(r["ddt_original_phi_mean"] for r in rewritten if not r.get("copy")),
            phi_after_rewritten=mean(r["ddt_phi_mean"] for r in rewritten),
        )
    return stats
