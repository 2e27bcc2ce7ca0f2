"""The pair logic an engine-side mixer runs (decoding.pairs), driven by a stand-in for an inference
engine's persistent batch: rows in slots that are reordered, condensed and swapped between steps,
a greedy sampler, and output lists that hold only placeholders (as asynchronous scheduling leaves
them). Its outputs must equal the plain reference loop."""

import random

import pytest
import torch

from decoding import HintedDecodingConfig
from decoding.pairs import KEY, PairBook, check_spec, pair_spec, probe_spec
from decoding.reference import reference_two_stream
from decoding.mixing import stream_seeds
from decoding.rules import answer_markers, eos_ids, repetition_length
from tiny import last_logits, make_tiny_model


def run_engine(model, tok, hinted, student, cfg, *, seed=0, placeholders=True, extra=()):
    """Decode the pairs as an engine would; return (per-pair ids, the book afterwards)."""
    book = PairBook(lambda: tok)
    eos = eos_ids(model, tok)
    streams = stream_seeds(cfg.seed, len(hinted))
    markers = answer_markers(cfg.answer_marker)
    requests = []
    for i, (h, s) in enumerate(zip(hinted, student)):
        for role, prompt in (("hinted", h), ("student", s)):
            spec = pair_spec(f"p{i}", role, seed=streams[i], config=cfg, markers=markers, eos=min(eos))
            requests.append({"prompt": prompt, "true": [], "shown": [], "spec": spec, "max": cfg.max_new_tokens})
    for script in extra:
        requests.append({"prompt": [5, 6], "true": [], "shown": [], "spec": probe_spec(script), "max": len(script)})
    rng = random.Random(seed)
    slots = list(range(len(requests)))
    rng.shuffle(slots)  # the two rows of a pair sit anywhere in the batch
    book.update([], [(k, requests[r]["spec"], requests[r]["shown"]) for k, r in enumerate(slots)], [])
    while slots:
        logits = torch.cat([last_logits(model, requests[r]["prompt"] + requests[r]["true"]) for r in slots])
        tokens = book.apply(logits).argmax(-1).tolist()
        for r, token in zip(slots, tokens):
            requests[r]["true"].append(token)
            requests[r]["shown"].append(-1 if placeholders else token)
        removed = [k for k, r in enumerate(slots)
                   if requests[r]["true"][-1] in eos or len(requests[r]["true"]) >= requests[r]["max"]]
        moved = []
        alive = {k: r for k, r in enumerate(slots) if k not in removed}
        # Condense: the last rows move into the holes (one-way moves), then a random swap.
        for hole in sorted(removed):
            last = max(alive, default=-1)
            if last > hole:
                alive[hole] = alive.pop(last)
                moved.append((last, hole, False))
        slots = [alive[k] for k in sorted(alive)]
        if len(slots) > 1 and rng.random() < 0.5:
            a, b = rng.sample(range(len(slots)), 2)
            slots[a], slots[b] = slots[b], slots[a]
            moved.append((a, b, True))
        book.update(removed, [], moved)
    outs = []
    for i in range(len(hinted)):
        h, s = requests[2 * i]["true"], requests[2 * i + 1]["true"]
        assert h == s, f"pair {i} lost lock-step"
        cut = repetition_length(h, cfg.repeat_window, cfg.repeat_count)
        outs.append(h[:cut] if cut is not None else h)
    return outs, book, [r["true"] for r in requests[2 * len(hinted):]]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer, seed=0, hidden=256)  # hidden 64 repeats one token whatever the prompt


@pytest.fixture
def pairs(tiny_tokenizer):
    texts = [("Hint: 6*7=42. Q: 6*7?", "Q: 6*7?"), ("hi", "a much longer student prompt"), ("Rewrite: 3+4=7", "3+4?"),
             ("A", "B")]
    return ([tiny_tokenizer(h)["input_ids"] for h, _ in texts], [tiny_tokenizer(s)["input_ids"] for _, s in texts])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_engine_batch_equals_reference(model, tiny_tokenizer, pairs, temperature):
    free = HintedDecodingConfig(temperature=0.0, beta=0.0, max_new_tokens=10, answer_marker="")
    first = reference_two_stream(model, *pairs, free)[0]
    # A marker the unguarded run writes early, so that the guard trips inside the run.
    marker = tiny_tokenizer.decode(first[1:3])
    cfg = HintedDecodingConfig(temperature=temperature, top_p=0.9, max_new_tokens=14, seed=3, answer_marker=marker,
                               beta=0.0, repeat_window=3, repeat_count=4)
    want = reference_two_stream(model, *pairs, cfg, tiny_tokenizer)
    for seed in range(2):
        got, book, _ = run_engine(model, tiny_tokenizer, *pairs, cfg, seed=seed)
        assert got == want
        assert book.rows == {} and book.pairs == {}  # every row left, every pair forgotten
    if temperature == 0:  # the greedy run writes the marker, so the guard mattered
        unguarded = HintedDecodingConfig(**{**cfg.__dict__, "answer_marker": ""})
        assert want != reference_two_stream(model, *pairs, unguarded, tiny_tokenizer)


def test_probe_rows_follow_their_script(model, tiny_tokenizer, pairs):
    cfg = HintedDecodingConfig(temperature=0.0, max_new_tokens=6)
    got, _, probes = run_engine(model, tiny_tokenizer, *pairs, cfg, extra=[[11, 12, 11], [12, 11, 12]])
    assert probes == [[11, 12, 11], [12, 11, 12]]
    assert got == reference_two_stream(model, *pairs, cfg, tiny_tokenizer)


def test_book_updates_follow_moves_and_swaps(tiny_tokenizer):
    book = PairBook(lambda: tiny_tokenizer)
    cfg = HintedDecodingConfig()
    spec = lambda role: pair_spec("k", role, seed=0, config=cfg, markers=(), eos=3)
    book.update([], [(0, spec("hinted"), []), (1, None, []), (2, spec("student"), [])], [])
    assert set(book.rows) == {0, 2} and len(book.pairs) == 1
    book.update([], [], [(0, 2, True)])
    assert book.rows[2].role == "hinted" and book.rows[0].role == "student"
    book.update([1], [], [(2, 1, False)])  # one-way: row 2 takes slot 1
    assert book.rows[1].role == "hinted" and 2 not in book.rows
    book.update([0], [(0, None, [])], [])  # a non-pair request takes the slot
    assert set(book.rows) == {1} and len(book.pairs) == 1
    book.update([1], [], [])
    assert book.rows == {} and book.pairs == {}


def test_check_spec_names_the_bad_field():
    good = pair_spec("k", "hinted", seed=0, config=HintedDecodingConfig(), markers=("####",), eos=3)
    check_spec(good)
    with pytest.raises(ValueError, match="'role'"):
        check_spec({**good, "role": "teacher"})
    with pytest.raises(ValueError, match="lacks the field 'seed'"):
        check_spec({k: v for k, v in good.items() if k != "seed"})
    with pytest.raises(ValueError, match="'window'"):
        check_spec({**good, "window": True})
    with pytest.raises(ValueError, match=KEY):
        check_spec([1, 2])


def test_repetition_stop_with_colliding_counts_and_recycled_slots(tiny_tokenizer):
    """Pairs decoding scripted tokens, six at a time, each finished pair replaced by a new one in its
    rows; the window counts shared by all pairs have 8 entries, so windows of different pairs (and of
    pairs gone) collide at every step. Every pair must still stop exactly where RepetitionStop does."""

    class SmallTable(PairBook):
        TABLE_BITS = 3

    book, eos = SmallTable(lambda: tiny_tokenizer), tiny_tokenizer.eos_token_id
    cfg = HintedDecodingConfig(temperature=0.0, repeat_window=2, repeat_count=3, answer_marker="")
    rng = random.Random(0)
    scripts = [[rng.choice([10, 11, 12]) for _ in range(rng.randrange(4, 24))] for _ in range(30)]
    waiting, live, done = list(range(len(scripts))), {}, {}

    def admit(rows):
        i = waiting.pop(0)
        added = []
        for role, row in zip(("hinted", "student"), rows):
            live[row] = (i, [])
            added.append((row, pair_spec(f"p{i}", role, seed=i, config=cfg, markers=(), eos=eos), live[row][1]))
        return added

    book.update([], [a for k in range(6) for a in admit((k, k + 6))], [])
    while live:
        logits = torch.zeros(12, len(tiny_tokenizer))
        for row, (i, out) in live.items():
            logits[row, scripts[i][len(out)] if len(out) < len(scripts[i]) else eos] = 10.0
        tokens = book.apply(logits).argmax(-1).tolist()
        for row, (_, out) in live.items():
            out.append(tokens[row])
        removed, added = [], []
        for k in range(6):
            if k in live and live[k][1][-1] == eos:
                (i, out), _ = live.pop(k), live.pop(k + 6)
                done[i] = out
                removed += [k, k + 6]
                if waiting:
                    added += admit((k, k + 6))
        book.update(removed, added, [])
    for i, script in enumerate(scripts):
        cut = repetition_length(script, 2, 3)
        assert done[i] == (script[:cut] if cut is not None else script) + [eos], i
    assert any(repetition_length(s, 2, 3) for s in scripts) and not all(repetition_length(s, 2, 3) for s in scripts)
    assert book.pairs == {} and not book._table.any()  # every pair's windows were taken back out
