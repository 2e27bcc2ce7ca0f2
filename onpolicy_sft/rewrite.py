"""The corpus rewrite of Hinted Decoding (Zhang et al., arXiv 2602.12222; docs/methods.md §5, steps 1–3).

Per demonstration: (1) the model answers the plain question k times; a verified-correct answer
is kept as is (source "self"); (2) otherwise m Hinted Decoding attempts; a verified-correct one
is kept (source "hinted"); (3) otherwise the original demonstration is kept (source "original")
or the row is dropped (``fallback``). Kept responses and originals are DDT-scored under the
student context, so a rewrite can be shown to sit closer to the model than the original.

Every answer is sorted into one outcome (``outcome``): ``right``; ``wrong`` (it states a final
answer the checker reads, and that answer is wrong); ``cut`` (no final answer, and the model never
ended its turn: it hit the token limit or the repetition stop); ``no_answer`` (it ended its turn
without a final answer). The counts per attempt kind (``rewrite_record.ATTEMPTS``) are in the
stats under ``attempts`` (``rewrite_record.rewrite_stats``), which is where to look when rows fall
back to the original.

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
Among the right answers of an attempt kind, one that ended by itself is preferred. A right answer
that never ended (cut at the limit or by the repetition stop) is kept only up to the end of its
final answer (the rest is unverified text running on) and marked ``response_truncated``, so
``onpolicy_sft.encoding.encode_row`` appends no end-of-turn token to it in training or scoring.
A right answer that ended by itself keeps all of its text, words after the answer included:
the model wrote them, and its stop, there.

Rows are processed in fixed shards of ``shard_size`` consecutive rows (``run.map_shards``); each
finished shard is saved atomically under ``out_dir/shards``. Every random stream is seeded from
(seed, row id, attempt kind, attempt), so a killed run restarted with the same arguments reads the
finished shards back and ends with exactly the rows of an uninterrupted run.
``out_dir/fingerprint.json`` records what determines the result (the settings, a digest of the
data, the model's name and a digest of its weights) and a resume with anything else is refused,
naming what differs; a lock on ``out_dir`` refuses a second concurrent run (``run.RunDir``).

Launched with N processes (``torchrun``, ``accelerate launch``), the shards are dealt round-robin
to the processes, each generating with its own backend; the rows are gathered back in input order
and DDT-scored data-parallel, so every process returns what one process would have, and a run
killed on any process resumes from the shards all of them wrote. The stats record the split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import ExitStack

from datasets import Dataset

from decoding import make_backend
from decoding.sampling import SamplingConfig
from decoding.rules import eos_ids
from onpolicy_sft.hint_template import cut_analysis, hinted_prompt_ids, student_prompt_ids, with_analysis
from onpolicy_sft import ddt
from onpolicy_sft.schema import EXEMPLARS
from onpolicy_sft.grading import extract_answer, is_correct
from onpolicy_sft.models import weights_digest
from onpolicy_sft.rewrite_config import RewriteConfig
from onpolicy_sft.rewrite_record import SOURCES, ended_right, pick_answers, rewrite_stats, rows_per_source
from onpolicy_sft.run import RunDir, map_shards


def row_seed(seed: int, row_id: str, kind: str) -> int:
    """A 62-bit seed for one row and attempt kind, independent of batching, order and resumption."""
    hashed = hashlib.sha256(f"{seed}\x00{row_id}\x00{kind}".encode()).digest()
    return int.from_bytes(hashed[:8], "little") >> 2


def outcome(text: str, answer: str, cut: bool, timeout: float = 5.0) -> str:
    """One of ``rewrite_record.OUTCOMES`` for an answer; ``cut``: the model never ended its turn."""
    if is_correct(text, answer, timeout=timeout):
        return "right"
    if extract_answer(text) is not None:
        return "wrong"
    return "cut" if cut else "no_answer"


def _model_name(model, config: RewriteConfig) -> str:
    return config.model_name or str(getattr(model, "name_or_path", "") or "")


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
        self.model_name = _model_name(model, config)
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
                     if len(answers[i]) < k and ended_right(answers[i], outcomes[i]) < need}
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
        mine = pick_answers([t for t, _ in answers], [c for _, c in answers], outcomes, n)
        source, picked = ("self", mine) if mine else ("hinted", pick_answers([t for t, _ in hinted],
                                                                            [c for _, c in hinted], hinted_outcomes, n))
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


def _fingerprint_inputs(rows: list[dict], config: RewriteConfig, model) -> dict:
    return {
        **{f"config.{k}": v for k, v in config.settings().items()},
        "data": _dataset_fingerprint(rows),
        "rows": len(rows),
        "model": _model_name(model, config),
        "model_weights": weights_digest(model),
    }


def _progress(shown: tuple[str, ...]):
    """The bar's counts beside it: rows per source, and the share of them rewritten from the model's
    own answers."""

    def postfix(totals) -> dict:
        seen = sum(totals[s] for s in shown)
        accepted = (totals["self"] + totals["hinted"]) / max(seen, 1)
        return {**{s: totals[s] for s in shown}, "accepted": f"{accepted:.0%}"}

    return postfix


def rewrite_corpus(model, tokenizer, dataset, config: RewriteConfig | None = None, *, out_dir=None, backend=None):
    """(the rewritten corpus, the run's statistics): ``dataset`` rewritten with the model itself
    (docs/methods.md §5, steps 1–3).

    `dataset` has columns prompt, response (the reference solution), answer (the reference final
    answer), and optionally id and system. `model` is the transformers model that DDT-scores the
    results; `backend` (a decoding Backend) generates, by default make_backend(config.hinted.backend,
    model, tokenizer). The corpus is a Dataset with id, prompt, response, response_truncated,
    answer, system, source (one of SOURCES), verified, attempts, n_self_correct, n_hinted_correct,
    self_outcomes and hinted_outcomes (one of ``rewrite_record.OUTCOMES`` per answer), original_response, the ddt_
    scores of the kept response and the ddt_original_ scores of the original, and provenance
    (model, config_hash, seed); the statistics are ``rewrite_record.rewrite_stats`` and the split
    between processes. With `out_dir`, shards, fingerprint.json, stats.json and rewritten.jsonl are
    written there, and a rerun with the same inputs resumes. Under N launched processes every
    process returns the whole corpus.
    """
    config = config or RewriteConfig()
    rows = _normalise_rows(dataset)
    with RunDir(out_dir, "rewrite") as run, ExitStack() as stack:
        if out_dir is not None:  # inside the block, so that a refusal lets go of the lock
            run.check_inputs(_fingerprint_inputs(rows, config, model))
        if backend is None:
            backend = stack.enter_context(make_backend(config.hinted.backend, model, tokenizer))
        worker = _Rewriter(model, tokenizer, backend, config)
        if config.triage.by != "off":
            worker.triage(rows)
        size = config.shard_size
        bounds = [[start, min(start + size, len(rows))] for start in range(0, len(rows), size)]
        # in_distribution is shown only where the triage can produce it
        shown = SOURCES if config.triage.by != "off" else SOURCES[:3]
        mapped = map_shards(lambda unit: worker.shard(rows[unit[0]:unit[1]]), bounds, "rewrite",
                            sizes=[stop - start for start, stop in bounds], save_dir=run.file("shards"),
                            tally=rows_per_source, postfix=_progress(shown), progress=config.progress)
        done = [row for shard in mapped.results for row in shard]
        if config.score and done:
            done = worker.score(done)
        stats = rewrite_stats(done, config.fallback)
        if config.triage.by != "off":
            stats["triage"] = {"by": config.triage.by, "level": config.triage.threshold,
                               "in_distribution": len(worker.in_distribution)}
        stats.update(mapped.record())
        kept = [{k: v for k, v in r.items() if k != "kept"} for r in done if r["kept"]]
        run.write_json("stats.json", stats)
        run.write_jsonl("rewritten.jsonl", kept)
    return (Dataset.from_list(kept).cast_column("exemplars", EXEMPLARS) if kept else Dataset.from_dict({})), stats
