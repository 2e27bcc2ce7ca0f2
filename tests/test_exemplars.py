"""Exemplar turns: one rendering of a row's prompt in every stage, no loss on them, part of every
fingerprint, a pool disjoint from the arithmetic splits, and configs that round-trip."""

from __future__ import annotations

import json

import pytest

from decoding.hf import HFBackend
from decoding.sampling import HintedDecodingConfig, SamplingConfig
from onpolicy_sft import arith
from onpolicy_sft.config import DataConfig, LoopConfig, load_config
from onpolicy_sft.config_io import ConfigError, save_config
from onpolicy_sft.encoding import encode_prompt, encode_row, encode_text
from onpolicy_sft.evaluate import EvalConfig, evaluate
from onpolicy_sft.exemplars import resolve, with_exemplars
from onpolicy_sft.hint_template import HintTemplate, hinted_prompt_ids
from onpolicy_sft.ops import IGNORE_INDEX
from onpolicy_sft.preference_pairs import build_pairs
from onpolicy_sft.rewrite import rewrite_corpus
from onpolicy_sft.rewrite_config import RewriteConfig
from onpolicy_sft.rundir import InputsChanged
from onpolicy_sft.train_data import tokenize_for_training

pytestmark = pytest.mark.usefixtures("one_thread")

TURNS = [dict(e) for e in arith.DEFAULT_EXEMPLARS]


class RecordingBackend(HFBackend):
    """The hf backend, keeping every prompt it was asked to continue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain, self.student, self.hinted = [], [], []

    def sample(self, prompts, config, seeds=None):
        self.plain += [list(p) for p in prompts]
        return super().sample(prompts, config, seeds=seeds)

    def two_stream(self, hinted, student, config, tokenizer=None, seeds=None):
        self.hinted += [list(p) for p in hinted]
        self.student += [list(p) for p in student]
        return super().two_stream(hinted, student, config, tokenizer, seeds=seeds)


@pytest.fixture
def rows():
    return with_exemplars(arith.arithmetic_splits(n_train=3, n_test=2, n_test_hard=2)["train"], TURNS)


def test_every_stage_renders_the_same_prompt_ids(tiny_model, tiny_tokenizer, rows):
    expected = [encode_prompt(tiny_tokenizer, r["prompt"], "", TURNS) for r in rows]
    # the turns are really there: the question alone renders shorter, and the examples' text is in it
    assert all(len(e) > len(encode_prompt(tiny_tokenizer, r["prompt"])) for e, r in zip(expected, rows))
    assert TURNS[0]["response"] in tiny_tokenizer.decode(expected[0])

    backend = RecordingBackend(tiny_model, tiny_tokenizer)
    config = RewriteConfig(k_self=1, m_hinted=1, sampling=SamplingConfig(max_new_tokens=4),
                           hinted=HintedDecodingConfig(max_new_tokens=4), score=False, progress=False)
    rewrite_corpus(tiny_model, tiny_tokenizer, rows, config, backend=backend)
    assert backend.plain == expected  # the self-answers
    assert backend.student == expected  # the student stream of Hinted Decoding (no row was solved)

    backend.plain = []
    evaluate(tiny_model, tiny_tokenizer, rows, EvalConfig(max_new_tokens=2), backend=backend)
    assert backend.plain == expected

    backend.plain = []
    build_pairs(tiny_model, tiny_tokenizer, rows, k=2, backend=backend, sampling=SamplingConfig(max_new_tokens=2))
    assert backend.plain == expected

    # DDT scores and training tokenises through encode_row: its prompt is the unlabelled prefix
    trained, _ = tokenize_for_training(rows, tiny_tokenizer, max_length=1024, pairwise=False)
    for row, want in zip(trained, expected):
        n = len(want)
        assert row["input_ids"][:n] == want and set(row["labels"][:n]) == {IGNORE_INDEX}


def test_hinted_stream_carries_the_turns_only_when_its_template_says_so(tiny_tokenizer, rows):
    row = rows[0]
    with_turns = hinted_prompt_ids(tiny_tokenizer, HintTemplate(), row["prompt"], row["response"], exemplars=TURNS)
    without = hinted_prompt_ids(tiny_tokenizer, HintTemplate(exemplars=False), row["prompt"], row["response"],
                                exemplars=TURNS)
    assert without == hinted_prompt_ids(tiny_tokenizer, HintTemplate(), row["prompt"], row["response"])
    # the turns come first and the hint stays in the last user turn, after them
    turns_only = encode_prompt(tiny_tokenizer, "", "", TURNS)
    opening = encode_prompt(tiny_tokenizer, "")
    assert with_turns[: len(turns_only) - len(opening)] == turns_only[: len(turns_only) - len(opening)]
    assert tiny_tokenizer.decode(with_turns).rstrip().endswith(tiny_tokenizer.decode(without).rstrip()[-40:])


def test_only_the_final_response_carries_labels(tiny_tokenizer, rows):
    row = rows[0]
    encoded = encode_row(tiny_tokenizer, row)
    learned = [t for t in encoded["labels"] if t != IGNORE_INDEX]
    assert learned == encode_text(tiny_tokenizer, row["response"]) + [tiny_tokenizer.eos_token_id]
    # the exemplar answers are in the input, not among the targets
    answer_ids = encode_text(tiny_tokenizer, TURNS[0]["response"])
    flat = encoded["input_ids"]
    starts = [i for i in range(len(flat)) if flat[i: i + len(answer_ids)] == answer_ids]
    assert starts and all(encoded["labels"][i] == IGNORE_INDEX for i in range(starts[0], starts[0] + len(answer_ids)))


def test_rewrite_resume_with_other_exemplars_is_refused(tiny_model, tiny_tokenizer, rows, tmp_path):
    config = RewriteConfig(k_self=1, m_hinted=0, sampling=SamplingConfig(max_new_tokens=3), score=False,
                           progress=False)
    backend = HFBackend(tiny_model, tiny_tokenizer)
    rewrite_corpus(tiny_model, tiny_tokenizer, rows, config, out_dir=tmp_path, backend=backend)
    other = with_exemplars(rows.remove_columns("exemplars"), TURNS[:1])
    with pytest.raises(InputsChanged, match="data: was"):
        rewrite_corpus(tiny_model, tiny_tokenizer, other, config, out_dir=tmp_path, backend=backend)
    # the same exemplars resume without a word
    again, _ = rewrite_corpus(tiny_model, tiny_tokenizer, rows, config, out_dir=tmp_path, backend=backend)
    assert again["exemplars"] == [TURNS] * len(rows)


def test_pool_never_holds_a_question_of_any_split():
    pool = {e["prompt"] for e in arith.EXEMPLAR_POOL}
    for seed in range(3):
        splits = arith.arithmetic_splits(seed=seed, n_train=1000, n_test=200, n_test_hard=200)
        assert not pool & {p for split in splits.values() for p in split["prompt"]}
    # and by construction: no story's item or actor appears in an example
    items = {story.item for story in arith.STORIES}
    for example in arith.EXEMPLAR_POOL:
        words = set(example["prompt"].replace(".", " ").replace("?", " ").split())
        assert not words & set(arith.NAMES) and not words & items
        assert example["response"].endswith(f"\\boxed{{{example['response'].split('= ')[-1].split(chr(10))[0]}}}.")


def test_a_draw_is_seeded_and_from_the_pool(tmp_path):
    draws = {s: resolve(3, source="arithmetic", seed=s) for s in range(4)}
    assert all(d == resolve(3, source="arithmetic", seed=s) for s, d in draws.items())
    assert len({json.dumps(d) for d in draws.values()}) > 1
    assert all(e in list(arith.EXEMPLAR_POOL) for d in draws.values() for e in d)
    assert resolve(None, source="arithmetic") == TURNS and resolve(None, source="x.jsonl") == []
    assert resolve(0, source="arithmetic") == []
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(5)))
    assert resolve(2, source="x.jsonl", pool=str(pool), seed=1) == resolve(2, source="y", pool=str(pool), seed=1)
    assert resolve(str(pool), source="x.jsonl")[4] == {"prompt": "q4", "response": "a4"}


def test_rows_with_turns_of_their_own_keep_them(rows):
    own = [{"prompt": "p", "response": "r"}]
    mixed = with_exemplars(rows.remove_columns("exemplars").add_column("exemplars", [own, [], []]), TURNS)
    assert mixed["exemplars"] == [own, TURNS, TURNS]


def test_config_round_trips_and_refuses_bad_exemplars(tmp_path):
    for value in (TURNS, 2, 0):
        config = LoopConfig(data=DataConfig(exemplars=value))
        again = load_config(save_config(config, tmp_path / "c.yaml"))
        assert again == config and again.data.exemplars == value
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q"}\n')
    cases = {"data.exemplars=-1": ">= 0", "data.exemplars=99": "exceeds the pool", "data.exemplars=[{prompt: q}]":
             "exemplar 0", f"data.exemplars={bad}": "line 2", "data.exemplars=nofile.jsonl": "no file"}
    for override, why in cases.items():
        with pytest.raises(ConfigError, match=why) as err:
            load_config(None, [override])
        assert "data.exemplars" in str(err.value)
    with pytest.raises(ConfigError, match="exemplar_pool"):
        load_config(None, ["data.source=x.jsonl", "data.exemplars=2"])
