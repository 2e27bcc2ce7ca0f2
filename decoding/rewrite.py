"""The corpus rewrite of Hinted Decoding (Zhang et al., arXiv 2602.12222; docs/methods.md §5, steps 1–3).

Per demonstration: (1) the model answers the plain question k times; a verified-correct answer
is kept as is (source "self"); (2) otherwise m Hinted Decoding attempts; a verified-correct one
is kept (source "hinted"); (3) otherwise the original demonstration is kept (source "original")
or the row is dropped (``fallback``). Kept responses and originals are DDT-scored under the
student context, so a rewrite can be shown to sit closer to the model than the original.

Every answer is sorted into one outcome (``outcome``): ``right``; ``wrong`` (it states a final
answer the checker reads, and that answer is wrong); ``cut`` (no final answer, and the model never
ended its turn: it hit the token limit or the repetition stop); ``no_answer`` (it ended its turn
without a final answer). The counts per stage are in the stats under ``attempts`` (rewrite_stats),
which is where to look when rows fall back to the original.

Options (all off by default, which gives the corpus described above):

- ``keep_verified: n`` keeps up to n distinct verified answers of a question as separate training
  rows (rejection-sampling fine-tuning): the self-answers when the question has any right one,
  else the hinted rewrites. The first row keeps the question's id, the j-th further one gets
  ``<id>#<j>`` and every row a ``copy`` index j (the column exists only when n > 1).
- ``adaptive``: the self-answers are drawn in rounds (keep_verified answers first, then as many
  as already drawn, up to k_self in all) and a question stops drawing once it has keep_verified
  distinct right answers that ended by themselves. Answer j of a row always comes from the
  stream row_seed + j, so the kept responses are exactly those of drawing all k_self at once;
  only the unneeded draws (and their outcomes) are gone.
- ``triage``: the original corpus is DDT-scored first (docs/methods.md §1) and only the rows the
  test flags as off-distribution are rewritten; the others are kept as they are, as source
  ``in_distribution`` (no attempts, their DDT scores reused).

Truncation rule. A kept answer is trained with an end-of-turn token only if the model wrote one.
Among the right answers of a stage, one that ended by itself is preferred. A right answer that
never ended (cut at the limit or by the repetition stop) is kept only up to the end of its final
answer (the rest is unverified text running on) and marked ``response_truncated``, so
``onpolicy_sft.data.encode_row`` appends no end-of-turn token to it in training or scoring.
A right answer that ended by itself keeps all of its text, words after the answer included:
the model wrote them, and its stop, there.

Rows are processed in fixed shards of ``shard_size`` consecutive rows; each finished shard is
written atomically under ``out_dir/shards``. Every random stream is seeded from (seed, row id,
stage, attempt), so a killed run restarted with the same arguments skips the finished shards
and ends with exactly the rows of an uninterrupted run. ``out_dir/manifest.json`` records what
determines the result (the settings, a digest of the data, the model's name and a digest of its
weights) and a resume with anything else is refused, naming what differs; a lock on ``out_dir``
refuses a second concurrent run.

Launched with N processes (``torchrun``, ``accelerate launch``), the shards are dealt round-robin
to the processes, each generating with its own backend; the rows are gathered back in input order
and DDT-scored data-parallel, so every process returns what one process would have, and a run
killed on any process resumes from the shards all of them wrote. The stats record the split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm

from onpolicy_sft import ddt
from onpolicy_sft.data import EXEMPLARS
from onpolicy_sft.distributed import gather_in_order, my_share, process_state
from onpolicy_sft.grading import extract_answer, is_correct
from onpolicy_sft.hint_template import HintTemplate, cut_analysis, hinted_prompt_ids, student_prompt_ids, with_analysis
from onpolicy_sft.models import weights_digest
from onpolicy_sft.rundir import RunLock, check_fingerprint, digest, write_json, write_text

from .rules import eos_ids
from .sampling import HintedDecodingConfig, SamplingConfig

log = logging.getLogger(__name__)

FALLBACKS = ("original", "drop")
SOURCES = ("self", "hinted", "original", "in_distribution")
OUTCOMES = ("right", "wrong", "no_answer", "cut")
STAGES = ("self", "hinted")
TRIAGE_BY = ("off", "p_value", "phi")
# The levels a test flags at by default: the per-row 1% test of docs/methods.md §1, and the mean φ
# below which the DDT authors read a text as out of distribution.
TRIAGE_LEVELS = {"p_value": ddt.REJECT_LEVEL, "phi": -0.1}
# Settings added after corpora were recorded: left out of the fingerprint while at these defaults,
# so that a default run keeps the config_hash (and the resumable runs) it had before them.
ADDED_DEFAULTS = {"triage.by": "off", "triage.level": None, "keep_verified": 1, "adaptive": False,
                  "template.exemplars": True}


@dataclass
class TriageConfig:
    """DDT triage before the rewrite: ``by`` "p_value" flags a row whose p-value is below
    ``level`` (default 0.01), "phi" one whose mean φ is below ``level`` (default −0.1); only
    flagged rows are rewritten. "off": every row is rewritten."""

    by: str = "off"
    level: float | None = None

    def __post_init__(self):
        if self.by not in TRIAGE_BY:
            raise ValueError(f"by: must be one of {TRIAGE_BY}, got {self.by!r}")
        if self.level is None:
            return
        if self.by == "off":
            raise ValueError("level: a level needs a test; set triage.by to p_value or phi")
        if not math.isfinite(self.level) or (self.by == "p_value" and not 0 < self.level < 1):
            raise ValueError(f"level: must be {'in (0, 1)' if self.by == 'p_value' else 'finite'}, got {self.level}")

    @property
    def threshold(self) -> float:
        return TRIAGE_LEVELS[self.by] if self.level is None else self.level


@dataclass
class RewriteConfig:
    """Settings of the corpus rewrite. ``sampling`` drives the k self-answers (its n is replaced by
    k_self and its seed by the per-row seeds); ``hinted`` drives the m hinted attempts and names the
    backend. ``analysis`` turns on the stage-1 analysis prefix (templates.py). ``keep_verified``,
    ``adaptive`` and ``triage``: the module docstring."""

    k_self: int = 4
    m_hinted: int = 4
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=512))
    hinted: HintedDecodingConfig = field(default_factory=HintedDecodingConfig)
    template: HintTemplate = field(default_factory=HintTemplate)
    analysis: bool = False
    analysis_max_new_tokens: int = 160
    fallback: str = "original"
    shard_size: int = 16
    seed: int = 0
    verify_timeout: float = 5.0
    score: bool = True
    score_batch_tokens: int = 4096
    model_name: str = ""  # provenance only; default: the model's name_or_path
    progress: bool = True
    keep_verified: int = 1
    adaptive: bool = False
    triage: TriageConfig = field(default_factory=TriageConfig)

    def __post_init__(self):
        if self.k_self < 0 or self.m_hinted < 0:
            raise ValueError(f"RewriteConfig.k_self and m_hinted must be >= 0, got {self.k_self} and {self.m_hinted}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"RewriteConfig.fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.shard_size < 1:
            raise ValueError(f"RewriteConfig.shard_size must be >= 1, got {self.shard_size}")
        if self.keep_verified < 1:
            raise ValueError(f"keep_verified: must be >= 1, got {self.keep_verified}")

    def settings(self) -> dict:
        """Every setting that changes the rows, flattened ("hinted.beta": 3.0), so that a refused
        resume names the field that changed. Not the progress display or the provenance label."""
        flat: dict = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                flat[prefix] = value

        walk("", {k: v for k, v in dataclasses.asdict(self).items() if k not in ("progress", "model_name")})
        return without_added_defaults(flat)

    def fingerprint(self) -> str:
        """A short hash of ``settings()``."""
        return digest(self.settings())


def without_added_defaults(flat: dict, prefix: str = "") -> dict:
    """``flat`` (dotted names under ``prefix``) less the ADDED_DEFAULTS settings at their defaults."""
    missing = object()
    return {k: v for k, v in flat.items()
            if not (k.startswith(prefix) and ADDED_DEFAULTS.get(k[len(prefix):], missing) == v)}


def row_seed(seed: int, row_id: str, stage: str) -> int:
    """A 62-bit seed for one row and stage, independent of batching, order and resumption."""
    hashed = hashlib.sha256(f"{seed}\x00{row_id}\x00{stage}".encode()).digest()
    return int.from_bytes(hashed[:8], "little") >> 2


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


def outcome(text: str, answer: str, cut: bool, timeout: float = 5.0) -> str:
    """One of OUTCOMES for an answer; ``cut``: the model never ended its turn."""
    if is_correct(text, answer, timeout=timeout):
        return "right"
    if extract_answer(text) is not None:
        return "wrong"
    return "cut" if cut else "no_answer"


def _picks(texts: list[str], cuts: list[bool], outcomes: list[str], n: int = 1) -> list[tuple[str, bool]]:
    """Up to n distinct answers to keep of one stage, each with whether it is truncated: the right
    answers that ended by themselves in order, then right ones cut after their final answer
    (module docstring). Distinct as kept: two answers equal once cut count once."""
    right = [i for i, o in enumerate(outcomes) if o == "right"]
    ended = [(texts[i], False) for i in right if not cuts[i]]
    cut = [(texts[i][: answer_end(texts[i])].rstrip(), True) for i in right if cuts[i]]
    picked, seen = [], set()
    for text, truncated in ended + cut:
        if text not in seen and len(picked) < n:
            seen.add(text)
            picked.append((text, truncated))
    return picked


def _good(answers: list[tuple[str, bool]], outcomes: list[str]) -> int:
    """How many distinct right answers that ended by themselves there are: what adaptive sampling waits for."""
    return len({text for (text, cut), o in zip(answers, outcomes) if o == "right" and not cut})


def _question_id(row: dict) -> str:
    return row["id"].rsplit("#", 1)[0] if row.get("copy") else row["id"]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _dataset_fingerprint(rows: list[dict]) -> str:
    hashed = hashlib.sha256()
    for r in rows:
        fields = [r["id"], r["prompt"], r["response"], r["answer"], r["system"]]
        hashed.update(json.dumps(fields + ([r["exemplars"]] if r["exemplars"] else [])).encode())
    return hashed.hexdigest()[:16]


def _normalise_rows(dataset) -> list[dict]:
    missing = {"prompt", "response", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"rewrite_corpus needs columns prompt, response, answer; missing {sorted(missing)}")
    rows = []
    for i, r in enumerate(dataset):
        rows.append({
            "id": str(r["id"]) if r.get("id") is not None else str(i),
            "prompt": r["prompt"], "response": r["response"], "answer": str(r["answer"]),
            "system": r.get("system") or "", "exemplars": r.get("exemplars") or [],
        })
    if len({r["id"] for r in rows}) != len(rows):
        raise ValueError("rewrite_corpus needs unique row ids (column 'id'): they seed each row's sampling")
    return rows


class _Rewriter:
    def __init__(self, model, tokenizer, backend, config: RewriteConfig):
        self.model, self.tok, self.backend, self.cfg = model, tokenizer, backend, config
        self.model_name = config.model_name or str(getattr(model, "name_or_path", "") or "")
        self.config_hash = config.fingerprint()
        self.stops = eos_ids(model, tokenizer)
        # Set by triage(): the ids kept as they are, and every original's ddt_original_ scores.
        self.in_distribution: set[str] = set()
        self.original_scores: dict[str, dict] = {}

    def _cut(self, ids: list[int]) -> bool:
        return not ids or ids[-1] not in self.stops

    def _draw(self, student, seeds: list[int], n: int) -> list[list[tuple[str, bool]]]:
        """n self-answers per prompt; answer j of a prompt comes from the stream seeds[i] + j."""
        sampling = dataclasses.replace(self.cfg.sampling, n=n)
        outs = self.backend.sample(student, sampling, seeds=seeds)
        return [[(_decode(self.tok, ids), self._cut(ids)) for ids in per_row] for per_row in outs]

    def _self_answers(self, rows, student):
        """(answers, outcomes) per row: k_self answers at once, or, ``adaptive``, drawn in rounds."""
        seeds = [row_seed(self.cfg.seed, r["id"], "self") for r in rows]
        if not self.cfg.adaptive:
            answers = self._draw(student, seeds, self.cfg.k_self) if self.cfg.k_self else [[] for _ in rows]
            return answers, [self._outcomes(a, r["answer"]) for a, r in zip(answers, rows)]
        k, need = self.cfg.k_self, self.cfg.keep_verified
        answers, outcomes = [[] for _ in rows], [[] for _ in rows]
        while True:
            # keep_verified answers first, then as many as drawn so far (doubling), up to k in all
            sizes = {i: min(k - len(answers[i]), max(need, len(answers[i]))) for i in range(len(rows))
                     if len(answers[i]) < k and _good(answers[i], outcomes[i]) < need}
            if not sizes:
                return answers, outcomes
            for size in sorted(set(sizes.values())):
                group = [i for i, s in sizes.items() if s == size]
                drawn = self._draw([student[i] for i in group], [seeds[i] + len(answers[i]) for i in group], size)
                for i, new in zip(group, drawn):
                    answers[i] += new
                    outcomes[i] += self._outcomes(new, rows[i]["answer"])

    def _hinted_prompts(self, rows) -> list[list[int]]:
        template = self.cfg.template
        plain = [hinted_prompt_ids(self.tok, template, r["prompt"], r["response"], exemplars=r["exemplars"])
                 for r in rows]
        if not self.cfg.analysis:
            return plain
        asked = [hinted_prompt_ids(self.tok, template, r["prompt"], r["response"], analysis=True,
                                   exemplars=r["exemplars"]) for r in rows]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=self.cfg.analysis_max_new_tokens, stop=[template.analysis_marker])
        prompts = []
        for ask, fallback, out in zip(asked, plain, self.backend.sample(asked, greedy)):
            analysis = cut_analysis(self.tok.decode(out[0], skip_special_tokens=True), template.analysis_marker)
            # Without its marker the analysis cannot be cut where the solution starts: use the plain hint.
            prompts.append(with_analysis(self.tok, ask, analysis) if analysis is not None else fallback)
        return prompts

    def _hinted_answers(self, rows, student):
        m = self.cfg.m_hinted
        if m == 0 or not rows:
            return [[] for _ in rows]
        hinted = self._hinted_prompts(rows)
        pairs_h = [h for h in hinted for _ in range(m)]
        pairs_s = [s for s in student for _ in range(m)]
        seeds = [row_seed(self.cfg.seed, r["id"], "hinted") + a for r in rows for a in range(m)]
        outs = self.backend.two_stream(pairs_h, pairs_s, self.cfg.hinted, self.tok, seeds=seeds)
        answers = [(_decode(self.tok, ids), self._cut(ids)) for ids in outs]
        return [answers[i * m : (i + 1) * m] for i in range(len(rows))]

    def _outcomes(self, answers, reference: str) -> list[str]:
        return [outcome(text, reference, cut, self.cfg.verify_timeout) for text, cut in answers]

    def shard(self, rows: list[dict]) -> list[dict]:
        """The rows of one shard, unscored, in question order: per question its kept rewrites (up
        to keep_verified rows), its original, or, triaged in distribution, the row as it is."""
        todo = [r for r in rows if r["id"] not in self.in_distribution]
        made = dict(zip([r["id"] for r in todo], self._rewrite(todo)))
        return [row for r in rows for row in (made[r["id"]] if r["id"] in made else [self._as_is(r)])]

    def _rewrite(self, rows: list[dict]) -> list[list[dict]]:
        if not rows:
            return []
        student = [student_prompt_ids(self.tok, r["prompt"], r["system"], r["exemplars"]) for r in rows]
        self_answers, self_outcomes = self._self_answers(rows, student)
        need = [i for i, o in enumerate(self_outcomes) if "right" not in o]
        hinted_answers = dict(zip(need, self._hinted_answers([rows[i] for i in need], [student[i] for i in need])))
        return [self._question_rows(r, self_answers[i], self_outcomes[i], hinted_answers.get(i, []))
                for i, r in enumerate(rows)]

    def _question_rows(self, r: dict, answers, outcomes: list[str], hinted) -> list[dict]:
        cfg = self.cfg
        hinted_outcomes = self._outcomes(hinted, r["answer"])
        base = dict(r, original_response=r["response"], attempts=len(answers) + len(hinted),
                    n_self_correct=outcomes.count("right"), n_hinted_correct=hinted_outcomes.count("right"),
                    self_outcomes=outcomes, hinted_outcomes=hinted_outcomes, kept=True)
        n = cfg.keep_verified
        mine = _picks([t for t, _ in answers], [c for _, c in answers], outcomes, n)
        source, picked = ("self", mine) if mine else ("hinted", _picks([t for t, _ in hinted], [c for _, c in hinted],
                                                                        hinted_outcomes, n))
        if not picked:
            return [self._finish(dict(base, source="original", response_truncated=False, kept=cfg.fallback == "original",
                                      verified=is_correct(r["response"], r["answer"], cfg.verify_timeout)), 0)]
        return [self._finish(dict(base, response=text, response_truncated=truncated, source=source, verified=True), j)
                for j, (text, truncated) in enumerate(picked)]

    def _as_is(self, r: dict) -> dict:
        """A row the triage found in distribution: kept as it is, with nothing attempted."""
        return self._finish(dict(r, original_response=r["response"], attempts=0, n_self_correct=0, n_hinted_correct=0,
                                 self_outcomes=[], hinted_outcomes=[], kept=True, source="in_distribution",
                                 response_truncated=False,
                                 verified=is_correct(r["response"], r["answer"], self.cfg.verify_timeout)), 0)

    def _finish(self, row: dict, copy: int) -> dict:
        """Provenance, and with keep_verified > 1 the copy index (the j-th further row: id ``<id>#<j>``)."""
        row.update(model=self.model_name, config_hash=self.config_hash, seed=self.cfg.seed)
        if self.cfg.keep_verified > 1:
            row.update(id=f"{row['id']}#{copy}" if copy else row["id"], copy=copy)
        return row

    def triage(self, rows: list[dict]) -> None:
        """DDT-score the originals once and keep the ids the test does not flag (collective: ddt.score
        deals its batches out under several processes and gathers them back)."""
        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "system", "exemplars", "response")}
                                for r in rows]).cast_column("exemplars", EXEMPLARS)
        scored = ddt.score(self.model, self.tok, ds, batch_tokens=self.cfg.score_batch_tokens, progress=False)
        flagged = ddt.off_distribution(scored, self.cfg.triage.by, self.cfg.triage.threshold)
        self.in_distribution = {r["id"] for r, off in zip(rows, flagged) if not off}
        names = [c for c in scored.column_names if c.startswith("ddt_")]
        columns = {name: scored[name] for name in names}
        self.original_scores = {r["id"]: {"ddt_original_" + name[4:]: columns[name][i] for name in names}
                                for i, r in enumerate(rows)}

    def _score_column(self, rows: list[dict], column: str, prefix: str) -> None:
        # Score a bare copy: score() replaces every existing ddt_ column, ddt_original_ included.
        columns = ("prompt", "system", "exemplars", "response", "response_truncated", "original_response")
        ds = Dataset.from_list([{k: r[k] for k in columns} for r in rows]).cast_column("exemplars", EXEMPLARS)
        scored = ddt.score(self.model, self.tok, ds, response_column=column, batch_tokens=self.cfg.score_batch_tokens,
                           progress=False)
        for name in scored.column_names:
            if name.startswith("ddt_"):
                for row, value in zip(rows, scored[name]):
                    row[prefix + name[4:]] = value

    def score(self, rows: list[dict]) -> list[dict]:
        """Add the ddt_ scores of the kept response and the ddt_original_ scores of the original.
        After triage the originals' scores are reused, and an in-distribution row's response is its
        original. Collective under several processes (every process holds the same rows)."""
        if not self.original_scores:
            self._score_column(rows, "original_response", "ddt_original_")
            self._score_column(rows, "response", "ddt_")
            return rows
        for row in rows:
            row.update(self.original_scores[_question_id(row)])
        fresh = [r for r in rows if r["source"] != "in_distribution"]
        if fresh:
            self._score_column(fresh, "response", "ddt_")
        for row in rows:
            if row["source"] == "in_distribution":
                row.update({"ddt_" + k[len("ddt_original_"):]: v for k, v in self.original_scores[row["id"]].items()})
        return rows


def _read_shard(path: Path, rows: int) -> list[dict] | None:
    """The ``rows`` rows of a finished shard, or None when it is cut short or corrupt. Shards are a
    cache of seeded work (a row's sampling depends on its id and the seed alone), so a damaged one
    is generated again, with the same result, rather than stopping the run."""
    try:
        shard = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        problem = None if len(shard) == rows else f"{len(shard)} rows instead of {rows}"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problem = str(err)
    if problem is None:
        return shard
    log.warning("rewrite shard %s is damaged (%s); generating it again", path, problem)
    return None


def _counts(rows: list[dict]) -> dict[str, int]:
    return {s: sum(r["source"] == s for r in rows) for s in SOURCES}


def _fingerprint_inputs(rows: list[dict], config: RewriteConfig, worker: _Rewriter) -> dict:
    return {
        **{f"config.{k}": v for k, v in config.settings().items()},
        "data": _dataset_fingerprint(rows),
        "rows": len(rows),
        "model": worker.model_name,
        "model_weights": weights_digest(worker.model),
    }


def _every_process_ok(error: Exception | None, state) -> None:
    """Raise ``error`` on every process when the main process hit it, instead of leaving the
    others waiting in the next collective."""
    if state.num_processes > 1:
        errors = [e for e in gather_object([None if error is None else (type(error).__name__, str(error))]) if e]
        if errors and error is None:
            raise RuntimeError(f"the main process stopped the rewrite: {errors[0][0]}: {errors[0][1]}")
    if error is not None:
        raise error


def rewrite_with_stats(model, tokenizer, dataset, config: RewriteConfig | None = None, *, out_dir=None, backend=None):
    """(rewritten Dataset, run statistics). See rewrite_corpus."""
    config = config or RewriteConfig()
    rows = _normalise_rows(dataset)
    state = process_state()
    with ExitStack() as stack:
        if backend is None:
            from . import make_backend  # the package's __init__ imports this module first: a cycle at the top

            backend = stack.enter_context(make_backend(config.hinted.backend, model, tokenizer))
        worker = _Rewriter(model, tokenizer, backend, config)
        shards_dir = None
        if out_dir is not None:
            out_dir, error = Path(out_dir), None
            shards_dir = out_dir / "shards"
            if state.is_main_process:
                try:
                    stack.enter_context(RunLock(out_dir, "rewrite"))
                    check_fingerprint(out_dir / "manifest.json", _fingerprint_inputs(rows, config, worker), "rewrite")
                    shards_dir.mkdir(parents=True, exist_ok=True)
                except Exception as err:  # noqa: BLE001 -- raised on every process just below
                    error = err
            _every_process_ok(error, state)
        if config.triage.by != "off":
            worker.triage(rows)
        done = _generate(worker, rows, shards_dir, state)
        if config.score and done:
            done = worker.score(done)
        stats = rewrite_stats(done, config.fallback)
        if config.triage.by != "off":
            stats["triage"] = {"by": config.triage.by, "level": config.triage.threshold,
                               "in_distribution": len(worker.in_distribution)}
        stats["processes"] = state.num_processes
        stats["rows_per_process"] = _rows_per_process(len(rows), config.shard_size, state.num_processes)
        kept = [{k: v for k, v in r.items() if k != "kept"} for r in done if r["kept"]]
        if out_dir is not None and state.is_main_process:
            write_json(out_dir / "stats.json", stats)
            write_text(out_dir / "rewritten.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    return (Dataset.from_list(kept).cast_column("exemplars", EXEMPLARS) if kept else Dataset.from_dict({})), stats


def _bounds(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]


def _rows_per_process(n_rows: int, shard_size: int, processes: int) -> list[int]:
    bounds = _bounds(n_rows, shard_size)
    return [sum(stop - start for start, stop in bounds[rank::processes]) for rank in range(processes)]


def _generate(worker: _Rewriter, rows: list[dict], shards_dir: Path | None, state) -> list[dict]:
    """Every shard, this process's share generated (or read back) here, all gathered in order.

    The shards go round by round, one per process each round, and the processes exchange their
    source counts after every round, so that the main process's bar shows the whole run."""
    bounds = _bounds(len(rows), worker.cfg.shard_size)
    mine = my_share(bounds, state)
    bar = tqdm(total=len(rows), desc="rewrite", unit="row",
               disable=not (worker.cfg.progress and state.is_main_process))
    # The bar counts questions (a question can give keep_verified rows) and rows per source;
    # in_distribution appears only where the triage can produce it.
    shown = SOURCES if worker.cfg.triage.by != "off" else SOURCES[:3]
    totals = dict.fromkeys(shown, 0)
    results: list[tuple[int, list[dict]]] = []
    try:
        for turn in range(-(-len(bounds) // state.num_processes)):
            shard: list[dict] = []
            if turn < len(mine):
                index = mine[turn]
                start, stop = bounds[index]
                path = shards_dir / f"shard-{index:05d}.jsonl" if shards_dir else None
                saved = _read_shard(path, stop - start) if path is not None and path.exists() else None
                if saved is not None:
                    shard = saved
                else:
                    shard = worker.shard(rows[start:stop])
                    if path is not None:
                        write_text(path, "".join(json.dumps(r) + "\n" for r in shard))
                results.append((index, shard))
            counts = [(sum(not r.get("copy") for r in shard), _counts(shard))]
            if state.num_processes > 1:
                counts = gather_object(counts)
            for n, per_source in counts:
                bar.update(n)
                for s in shown:
                    totals[s] += per_source[s]
            seen = sum(totals.values())
            if seen:
                bar.set_postfix({**totals, "accepted": f"{(totals['self'] + totals['hinted']) / seen:.0%}"})
    finally:
        bar.close()
    return [r for shard in gather_in_order(results, len(bounds), "rewrite", state) for r in shard]


def rewrite_corpus(model, tokenizer, dataset, config: RewriteConfig | None = None, *, out_dir=None, backend=None):
    """Rewrite a demonstration corpus with the model itself (docs/methods.md §5, steps 1–3).

    `dataset` has columns prompt, response (the reference solution), answer (the reference final
    answer), and optionally id and system. `model` is the transformers model that DDT-scores the
    results; `backend` (a decoding Backend) generates, by default make_backend(config.hinted.backend,
    model, tokenizer). Returns a Dataset with id, prompt, response, response_truncated, answer,
    system, source ("self" | "hinted" | "original" | "in_distribution"), verified, attempts, n_self_correct,
    n_hinted_correct, self_outcomes and hinted_outcomes (one of OUTCOMES per answer),
    original_response, the ddt_ scores of the kept response and the ddt_original_ scores of the
    original, and provenance (model, config_hash, seed). With `out_dir`, shards, manifest.json,
    stats.json and rewritten.jsonl are written there, and a rerun with the same inputs resumes.
    Under N launched processes every process returns the whole corpus.
    """
    return rewrite_with_stats(model, tokenizer, dataset, config, out_dir=out_dir, backend=backend)[0]


def _stage_counts(outcome_lists: list[list[str]]) -> dict:
    answers = [o for outcomes in outcome_lists for o in outcomes]
    return {
        "rows": sum(bool(outcomes) for outcomes in outcome_lists),
        "answers": len(answers),
        **{o: answers.count(o) for o in OUTCOMES},
        "rows_right": sum("right" in outcomes for outcomes in outcome_lists),
    }


def rewrite_stats(rows: list[dict], fallback: str = "original") -> dict:
    """The run's record: rows per source, acceptance rates, the outcome counts of each stage, and
    mean φ of the originals and of the kept responses.

    ``attempts`` = {"self": S, "hinted": S} where S counts that stage's answers: ``rows`` (rows that
    reached the stage), ``answers``, one count per outcome (``right``, ``wrong``, ``no_answer``,
    ``cut``; they add up to ``answers``) and ``rows_right`` (rows with at least one right answer).
    ``truncated_kept``: kept rewrites cut after their final answer (``response_truncated``).
    ``rows`` counts questions; ``per_source`` the rows each source gave (with keep_verified > 1 a
    question gives several), ``questions_per_source`` the questions, ``training_rows`` the rows kept.
    """
    questions = [r for r in rows if not r.get("copy")]
    n = len(questions)
    per_question = _counts(questions)
    accepted = per_question["self"] + per_question["hinted"]
    tried_hinted = sum(r["source"] in ("hinted", "original") for r in questions)
    stats = {
        "rows": n,
        "per_source": _counts(rows),
        "questions_per_source": per_question,
        "training_rows": sum(r["kept"] for r in rows),
        "dropped": sum(not r["kept"] for r in rows),
        "acceptance_rate": accepted / n if n else 0.0,
        "hinted_acceptance_rate": per_question["hinted"] / tried_hinted if tried_hinted else 0.0,
        "fallback": fallback,
        "attempts": {stage: _stage_counts([r[f"{stage}_outcomes"] for r in questions]) for stage in STAGES},
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
