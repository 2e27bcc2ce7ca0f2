"""The corpus rewrite of Hinted Decoding (Zhang et al., arXiv 2602.12222; METHODS.md §5, steps 1–3).

Per demonstration: (1) the model answers the plain question k times; a verified-correct answer
is kept as is (source "self"); (2) otherwise m Hinted Decoding attempts; a verified-correct one
is kept (source "hinted"); (3) otherwise the original demonstration is kept (source "original")
or the row is dropped (``fallback``). Kept responses and originals are DDT-scored under the
student context, so a rewrite can be shown to sit closer to the model than the original.

Rows are processed in fixed shards of ``shard_size`` consecutive rows; each finished shard is
written atomically (temp file, then os.replace) under ``out_dir/shards``. Every random stream is
seeded from (seed, row id, stage, attempt), so a killed run restarted with the same arguments
skips the finished shards and ends with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import HintedDecodingConfig, SamplingConfig
from .templates import HintTemplate, cut_analysis, hinted_prompt_ids, student_prompt_ids, with_analysis
from onpolicy_sft.grading import is_correct

FALLBACKS = ("original", "drop")
SOURCES = ("self", "hinted", "original")


@dataclass
class RewriteConfig:
    """Settings of the corpus rewrite. ``sampling`` drives the k self-answers (its n is replaced by
    k_self and its seed by the per-row seeds); ``hinted`` drives the m hinted attempts and names the
    backend. ``analysis`` turns on the stage-1 analysis prefix (templates.py)."""

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

    def __post_init__(self):
        if self.k_self < 0 or self.m_hinted < 0:
            raise ValueError(f"RewriteConfig.k_self and m_hinted must be >= 0, got {self.k_self} and {self.m_hinted}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"RewriteConfig.fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.shard_size < 1:
            raise ValueError(f"RewriteConfig.shard_size must be >= 1, got {self.shard_size}")

    def fingerprint(self) -> str:
        """A hash of every setting that changes the rows (not progress display or provenance)."""
        settings = dataclasses.asdict(self)
        for key in ("progress", "model_name"):
            settings.pop(key)
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def row_seed(seed: int, row_id: str, stage: str) -> int:
    """A 62-bit seed for one row and stage, independent of batching, order and resumption."""
    digest = hashlib.sha256(f"{seed}\x00{row_id}\x00{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _dataset_fingerprint(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for r in rows:
        digest.update(json.dumps([r["id"], r["prompt"], r["response"], r["answer"], r["system"]]).encode())
    return digest.hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _normalise_rows(dataset) -> list[dict]:
    missing = {"prompt", "response", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"rewrite_corpus needs columns prompt, response, answer; missing {sorted(missing)}")
    rows = []
    for i, r in enumerate(dataset):
        rows.append({
            "id": str(r["id"]) if r.get("id") is not None else str(i),
            "prompt": r["prompt"], "response": r["response"], "answer": str(r["answer"]),
            "system": r.get("system") or "",
        })
    if len({r["id"] for r in rows}) != len(rows):
        raise ValueError("rewrite_corpus needs unique row ids (column 'id'): they seed each row's sampling")
    return rows


class _Rewriter:
    def __init__(self, model, tokenizer, backend, config: RewriteConfig):
        self.model, self.tok, self.backend, self.cfg = model, tokenizer, backend, config
        self.model_name = config.model_name or str(getattr(model, "name_or_path", "") or "")
        self.config_hash = config.fingerprint()

    def _self_answers(self, rows, student):
        k = self.cfg.k_self
        if k == 0:
            return [[] for _ in rows]
        sampling = dataclasses.replace(self.cfg.sampling, n=k)
        seeds = [row_seed(self.cfg.seed, r["id"], "self") for r in rows]
        outs = self.backend.sample(student, sampling, seeds=seeds)
        return [[_decode(self.tok, ids) for ids in per_row] for per_row in outs]

    def _hinted_prompts(self, rows) -> list[list[int]]:
        template = self.cfg.template
        plain = [hinted_prompt_ids(self.tok, template, r["prompt"], r["response"]) for r in rows]
        if not self.cfg.analysis:
            return plain
        asked = [hinted_prompt_ids(self.tok, template, r["prompt"], r["response"], analysis=True) for r in rows]
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
        texts = [_decode(self.tok, ids) for ids in outs]
        return [texts[i * m : (i + 1) * m] for i in range(len(rows))]

    def _check(self, texts, answer) -> list[bool]:
        return [is_correct(t, answer, timeout=self.cfg.verify_timeout) for t in texts]

    def shard(self, rows: list[dict]) -> list[dict]:
        cfg = self.cfg
        student = [student_prompt_ids(self.tok, r["prompt"], r["system"]) for r in rows]
        self_texts = self._self_answers(rows, student)
        self_ok = [self._check(t, r["answer"]) for t, r in zip(self_texts, rows)]
        need = [i for i, ok in enumerate(self_ok) if not any(ok)]
        hinted_texts = dict(zip(need, self._hinted_answers([rows[i] for i in need], [student[i] for i in need])))
        out = []
        for i, r in enumerate(rows):
            hinted = hinted_texts.get(i, [])
            hinted_ok = self._check(hinted, r["answer"])
            row = dict(r, original_response=r["response"], attempts=len(self_texts[i]) + len(hinted),
                       n_self_correct=sum(self_ok[i]), n_hinted_correct=sum(hinted_ok), kept=True)
            if any(self_ok[i]):
                row.update(response=self_texts[i][self_ok[i].index(True)], source="self", verified=True)
            elif any(hinted_ok):
                row.update(response=hinted[hinted_ok.index(True)], source="hinted", verified=True)
            else:
                row.update(source="original", verified=is_correct(r["response"], r["answer"], cfg.verify_timeout),
                           kept=cfg.fallback == "original")
            row.update(model=self.model_name, config_hash=self.config_hash, seed=cfg.seed)
            out.append(row)
        if cfg.score:
            out = self._score(out)
        return out

    def _score(self, rows: list[dict]) -> list[dict]:
        from datasets import Dataset

        from onpolicy_sft.ddt import score

        # Score a bare copy: score() replaces every existing ddt_ column, ddt_original_ included.
        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "system", "response", "original_response")} for r in rows])
        opts = dict(batch_tokens=self.cfg.score_batch_tokens, progress=False)
        for column, prefix in (("original_response", "ddt_original_"), ("response", "ddt_")):
            scored = score(self.model, self.tok, ds, response_column=column, **opts)
            for name in scored.column_names:
                if name.startswith("ddt_"):
                    for row, value in zip(rows, scored[name]):
                        row[prefix + name[4:]] = value
        return rows


def rewrite_with_stats(model, tokenizer, dataset, config: RewriteConfig | None = None, *, out_dir=None, backend=None):
    """(rewritten Dataset, run statistics). See rewrite_corpus."""
    from datasets import Dataset

    config = config or RewriteConfig()
    rows = _normalise_rows(dataset)
    own_backend = backend is None
    if own_backend:
        from . import make_backend

        backend = make_backend(config.hinted.backend, model, tokenizer)
    worker = _Rewriter(model, tokenizer, backend, config)
    shards_dir = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        shards_dir = out_dir / "shards"
        shards_dir.mkdir(parents=True, exist_ok=True)
        _check_manifest(out_dir, rows, worker)
    bounds = [(s, min(s + config.shard_size, len(rows))) for s in range(0, len(rows), config.shard_size)]
    done: list[dict] = []
    bar = _progress(config.progress, len(rows))
    try:
        for index, (start, stop) in enumerate(bounds):
            path = shards_dir / f"shard-{index:05d}.jsonl" if shards_dir else None
            if path is not None and path.exists():
                shard = [json.loads(line) for line in path.read_text().splitlines() if line]
            else:
                shard = worker.shard(rows[start:stop])
                if path is not None:
                    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in shard))
            done += shard
            if bar is not None:
                bar.update(len(shard))
                counts = {s: sum(r["source"] == s for r in done) for s in SOURCES}
                accepted = (counts["self"] + counts["hinted"]) / len(done)
                bar.set_postfix({**counts, "accepted": f"{accepted:.0%}"})
    finally:
        if bar is not None:
            bar.close()
        if own_backend:
            backend.close()
    stats = rewrite_stats(done, config.fallback)
    kept = [{k: v for k, v in r.items() if k != "kept"} for r in done if r["kept"]]
    result = Dataset.from_list(kept) if kept else Dataset.from_dict({})
    if out_dir is not None:
        _write_atomic(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
        _write_atomic(out_dir / "rewritten.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    return result, stats


def rewrite_corpus(model, tokenizer, dataset, config: RewriteConfig | None = None, *, out_dir=None, backend=None):
    """Rewrite a demonstration corpus with the model itself (METHODS.md §5, steps 1–3).

    `dataset` has columns prompt, response (the reference solution), answer (the reference final
    answer), and optionally id and system. `model` is the transformers model that DDT-scores the
    results; `backend` (a decoding Backend) generates, by default make_backend(config.hinted.backend,
    model, tokenizer). Returns a Dataset with id, prompt, response, answer, system, source
    ("self" | "hinted" | "original"), verified, attempts, n_self_correct, n_hinted_correct,
    original_response, the ddt_ scores of the kept response and the ddt_original_ scores of the
    original, and provenance (model, config_hash, seed). With `out_dir`, shards, stats.json and
    rewritten.jsonl are written there, and a rerun resumes.
    """
    return rewrite_with_stats(model, tokenizer, dataset, config, out_dir=out_dir, backend=backend)[0]


def _check_manifest(out_dir: Path, rows: list[dict], worker: _Rewriter) -> None:
    manifest = {"config_hash": worker.config_hash, "dataset": _dataset_fingerprint(rows), "rows": len(rows),
                "shard_size": worker.cfg.shard_size, "model": worker.model_name, "seed": worker.cfg.seed}
    path = out_dir / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("config_hash", "dataset", "rows", "shard_size"):
            if old.get(key) != manifest[key]:
                raise ValueError(
                    f"{out_dir} holds a rewrite with a different {key} ({old.get(key)} vs {manifest[key]}): "
                    "resume with the same arguments, or choose a new --out directory"
                )
        return
    _write_atomic(path, json.dumps(manifest, indent=2) + "\n")


def rewrite_stats(rows: list[dict], fallback: str = "original") -> dict:
    """Rows per source, acceptance rate, and mean φ of the originals and of the kept responses."""
    n = len(rows)
    per_source = {s: sum(r["source"] == s for r in rows) for s in SOURCES}
    accepted = per_source["self"] + per_source["hinted"]
    tried_hinted = sum(r["source"] != "self" for r in rows)
    stats = {
        "rows": n,
        "per_source": per_source,
        "dropped": sum(not r["kept"] for r in rows),
        "acceptance_rate": accepted / n if n else 0.0,
        "hinted_acceptance_rate": per_source["hinted"] / tried_hinted if tried_hinted else 0.0,
        "fallback": fallback,
    }

    def mean(values):
        values = [v for v in values if v is not None and v == v]
        return sum(values) / len(values) if values else None

    if rows and "ddt_phi_mean" in rows[0]:
        kept = [r for r in rows if r["kept"]]
        rewritten = [r for r in rows if r["source"] in ("self", "hinted")]
        stats.update(
            phi_before=mean(r["ddt_original_phi_mean"] for r in rows),
            phi_after=mean(r["ddt_phi_mean"] for r in kept),
            phi_before_rewritten=mean(r["ddt_original_phi_mean"] for r in rewritten),
            phi_after_rewritten=mean(r["ddt_phi_mean"] for r in rewritten),
        )
    return stats


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rewrite", unit="row")
