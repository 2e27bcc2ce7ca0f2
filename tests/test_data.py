"""Data: chat-template encoding and label masking, every input format, every kind of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch

from onpolicy_sft.data import (DataError, collate, encode_example, encode_prompt,
                               length_grouped_batches, load_demonstrations, load_preferences, read_demonstrations,
                               stable_id, tokenize_dataset, tokenize_with_report)
from onpolicy_sft.ops import IGNORE_INDEX

FIX = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------------------------------
# encoding, collation, tokenising


def _rendered(tokenizer, prompt, response, system=""):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(msgs, tokenize=False)


@pytest.mark.parametrize("system", ["", "Be terse."])
def test_encode_example_masks_all_but_response_and_eos(tiny_tokenizer, system):
    tok = tiny_tokenizer
    enc = encode_example(tok, "What is 2+3?", "2+3=5\n#### 5", system)
    prompt = encode_prompt(tok, "What is 2+3?", system)
    n = len(prompt)
    assert enc["input_ids"][:n] == prompt
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    assert enc["labels"][-1] == tok.eos_token_id
    assert tok.decode(enc["labels"][n:-1]) == "2+3=5\n#### 5"
    # the concatenation is the template's own rendering of the whole conversation (up to the
    # newline after the end-of-turn token)
    assert tok.decode(enc["input_ids"]) == _rendered(tok, "What is 2+3?", "2+3=5\n#### 5", system).rstrip("\n")


def test_encode_example_max_length_cuts_the_response_end(tiny_tokenizer):
    full = encode_example(tiny_tokenizer, "hi", "a long answer")
    cut = encode_example(tiny_tokenizer, "hi", "a long answer", max_length=len(full["input_ids"]) - 4)
    assert cut["input_ids"] == full["input_ids"][:-4] and cut["labels"] == full["labels"][:-4]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_with_ignored_labels_and_zero_mask(side):
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(rows, pad_token_id=0, padding_side=side)
    assert all(v.dtype == torch.long for v in b.values())
    if side == "right":
        assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
        assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
        assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    else:
        assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
        assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
        assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def _length_ds(tok):
    # prompt length is fixed; responses of 1, 10 and 40 characters (char-level tokenizer)
    rows = [{"prompt": "q", "response": "x" * n} for n in (1, 10, 40)]
    return datasets.Dataset.from_list(rows), len(encode_prompt(tok, "q"))


def test_tokenize_dataset_truncate_counts_and_logs(tiny_tokenizer, caplog):
    ds, n_prompt = _length_ds(tiny_tokenizer)
    max_length = n_prompt + 12  # the 1- and 10-char rows fit (+ eos), the 40-char one does not
    with caplog.at_level(logging.INFO, logger="onpolicy_sft.data"):
        out, report = tokenize_with_report(ds, tiny_tokenizer, max_length=max_length, overlong="truncate")
    assert (report.rows, report.kept, report.truncated, report.skipped_overlong) == (3, 3, 1, 0)
    assert [len(x) for x in out["input_ids"]] == [n_prompt + 2, n_prompt + 11, max_length]
    assert all(len(i) == len(l) for i, l in zip(out["input_ids"], out["labels"]))
    assert "truncated 1" in caplog.text
    assert set(out.column_names) >= {"prompt", "response", "input_ids", "labels"}


def test_tokenize_dataset_skip_and_prompt_too_long(tiny_tokenizer, caplog):
    ds, n_prompt = _length_ds(tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="onpolicy_sft.data"):
        out, report = tokenize_with_report(ds, tiny_tokenizer, max_length=n_prompt + 12, overlong="skip")
    assert (report.kept, report.truncated, report.skipped_overlong) == (2, 0, 1)
    assert out["response"] == ["x", "x" * 10]
    assert "skipped 1 overlong" in caplog.text
    # a prompt that fills max_length leaves nothing to learn: skipped and counted even when truncating
    out, report = tokenize_with_report(ds, tiny_tokenizer, max_length=n_prompt, overlong="truncate")
    assert len(out) == 0 and report.skipped_prompt_too_long == 3
    assert len(tokenize_dataset(ds, tiny_tokenizer, max_length=1000)) == 3
    with pytest.raises(ValueError, match="overlong"):
        tokenize_dataset(ds, tiny_tokenizer, max_length=10, overlong="drop")


def test_truncated_responses_get_no_end_of_turn(tiny_tokenizer):
    rows = [{"prompt": "2+2?", "response": "four", "system": "", "response_truncated": cut} for cut in (False, True)]
    full, cut = tokenize_dataset(datasets.Dataset.from_list(rows), tiny_tokenizer, max_length=100).to_list()
    eos = tiny_tokenizer.eos_token_id
    assert full["labels"][-1] == eos and cut["labels"][-1] != eos
    assert full["input_ids"][:-1] == cut["input_ids"] and full["labels"][:-1] == cut["labels"]


def test_length_grouped_batches_cover_once_deterministic_and_group_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (203,), generator=g).tolist()
    a = length_grouped_batches(lengths, 8, seed=1)
    assert a == length_grouped_batches(lengths, 8, seed=1) and a != length_grouped_batches(lengths, 8, seed=2)
    assert sorted(i for b in a for i in b) == list(range(203)) and all(1 <= len(b) <= 8 for b in a)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    perm = torch.randperm(203, generator=g).tolist()
    assert padding(a) < padding([perm[j:j + 8] for j in range(0, 203, 8)]) / 5


# ---------------------------------------------------------------------------------------------
# formats


def test_prompt_response_jsonl_normalised_with_stable_and_given_ids():
    ds = load_demonstrations(FIX / "prompt_response.jsonl")
    assert ds.column_names == ["id", "prompt", "response", "answer", "system"]
    rows = ds.to_list()
    assert rows[0] == {"id": stable_id("", "What is 2+3?", "2+3=5\n#### 5"), "prompt": "What is 2+3?",
                       "response": "2+3=5\n#### 5", "answer": "5", "system": ""}
    assert rows[1]["id"] == "given-7" and rows[1]["answer"] == ""
    assert rows[2]["answer"] == "42" and rows[2]["system"] == "Be terse."  # an int answer becomes a string
    assert load_demonstrations(FIX / "prompt_response.jsonl")["id"] == ds["id"]


def test_json_completion_and_wrapped_list():
    ds = load_demonstrations(FIX / "completion.json")
    assert ds["prompt"] == ["Say hi.", "What is 9-4?"] and ds["response"] == ["Hi!", "9-4=5"]
    assert ds["answer"] == ["", "5"]
    assert load_demonstrations(FIX / "wrapped.json")["id"] == ds["id"][:1]  # same content, same id


def test_chat_messages_system_and_last_assistant():
    rows = load_demonstrations(FIX / "chat.jsonl").to_list()
    assert rows[0]["system"] == "You are kind." and rows[0]["prompt"] == "Hello?"
    assert rows[0]["response"] == "Hello there."
    assert rows[1]["answer"] == "2" and rows[1]["system"] == ""


def test_chat_multi_turn_is_reported_not_flattened():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(DataError, match="multi-turn") as e:
        load_demonstrations([{"messages": msgs}])
    assert e.value.field == "messages" and e.value.where == "row 0"
    with pytest.raises(DataError, match="not an assistant message"):
        load_demonstrations([{"messages": msgs[:1]}])


def test_gsm8k_answer_is_the_number_after_hashes():
    rows = load_demonstrations(FIX / "gsm8k.jsonl").to_list()
    assert rows[0]["prompt"].startswith("Tom has") and rows[0]["response"].endswith("#### 12")
    assert [r["answer"] for r in rows] == ["12", "1500"]
    with pytest.raises(DataError, match="####"):
        load_demonstrations([{"question": "q", "answer": "no marker"}])


def test_math_answer_from_last_boxed_with_nested_braces():
    rows = load_demonstrations(FIX / "math.json").to_list()
    assert [r["answer"] for r in rows] == ["\\frac{1}{2}", "2", ""]
    assert rows[0]["prompt"] == "Compute $1/2 + 0$." and rows[0]["response"].startswith("We get")


def test_csv_with_column_mapping_and_quoted_cells():
    ds = load_demonstrations(FIX / "instruction_output.csv", columns={"prompt": "instruction", "response": "output"})
    assert ds["prompt"] == ["What is 3+4?", "Say yes."] and ds["response"] == ["3+4=7\n#### 7", "Yes."]
    assert ds["answer"] == ["7", ""]
    assert load_demonstrations(FIX / "prompt_response.csv")["prompt"] == ["What is 5+5?", "Quote, with comma"]
    with pytest.raises(DataError, match="mapped column 'instr' is missing"):
        load_demonstrations(FIX / "instruction_output.csv", columns={"prompt": "instr"})


def test_parquet_dataset_datasetdict_saved_dir_and_list_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = [json.loads(line) for line in (FIX / "prompt_response.jsonl").read_text().splitlines()]
    for r in raw:  # columnar formats: every row has every column, one type per column
        r.update(answer=str(r.get("answer", "")), id=r.get("id"), system=r.get("system", ""))
    want = load_demonstrations(FIX / "prompt_response.jsonl")
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "d.parquet")
    hf = datasets.Dataset.from_list(raw)
    hf.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "d.parquet", str(tmp_path / "d.parquet"), hf, datasets.DatasetDict(train=hf),
                   tmp_path / "saved", raw):
        assert load_demonstrations(source).to_list() == want.to_list(), source
    assert len(load_demonstrations(datasets.DatasetDict(test=hf), split="test")) == 3
    with pytest.raises(DataError, match="no split 'train'"):
        load_demonstrations(datasets.DatasetDict(test=hf))


def test_duplicate_rows_get_distinct_stable_ids():
    ids = load_demonstrations([{"prompt": "p", "response": "r"}] * 3)["id"]
    assert len(set(ids)) == 3 and ids[1] == ids[0] + "-1"


def test_preferences_strings_and_message_lists():
    rows = load_preferences(FIX / "preferences.jsonl").to_list()
    assert rows[0]["chosen"] == "2+2=4\n#### 4" and rows[0]["rejected"] == "5" and rows[0]["answer"] == "4"
    assert (rows[1]["prompt"], rows[1]["chosen"], rows[1]["rejected"]) == ("Hi?", "Hello!", "Go away.")
    with pytest.raises(DataError, match="rejected"):
        load_preferences([{"prompt": "p", "chosen": "c"}])


def test_missing_file_and_unreachable_hub_give_clear_errors():
    with pytest.raises(DataError, match="no such file"):
        load_demonstrations(FIX / "does_not_exist.jsonl")
    with pytest.raises(DataError, match="hub"):  # conftest sets HF_DATASETS_OFFLINE=1
        load_demonstrations("no-such-owner/no-such-dataset")


# ---------------------------------------------------------------------------------------------
# bad input


BAD = [
    ("bad_malformed.jsonl", "malformed", None),
    ("bad_missing.jsonl", "missing_field", "response"),
    ("bad_empty.jsonl", "empty_field", "response"),
    ("bad_type.jsonl", "wrong_type", "response"),
    ("bad_bytes.jsonl", "undecodable", "response"),
]


@pytest.mark.parametrize("name,kind,field", BAD)
def test_bad_input_raises_naming_file_line_and_field(name, kind, field):
    with pytest.raises(DataError) as e:
        load_demonstrations(FIX / name)
    msg = str(e.value)
    assert name in msg and "line 2" in msg and e.value.kind == kind
    if field:
        assert f"field {field!r}" in msg


@pytest.mark.parametrize("name,kind,field", BAD)
def test_bad_input_skipped_and_counted(name, kind, field, caplog):
    with caplog.at_level(logging.WARNING, logger="onpolicy_sft.data"):
        ds, report = read_demonstrations(FIX / name, on_error="skip")
    assert len(ds) == 2 and report.kept == 2 and dict(report.skipped) == {kind: 1}
    assert "skipped 1" in caplog.text and name in caplog.text


def test_mixed_bad_file_counts_every_skip_by_reason():
    ds, report = read_demonstrations(FIX / "bad_mixed.jsonl", on_error="skip")
    assert len(ds) == 2
    assert dict(report.skipped) == {"malformed": 1, "missing_field": 1, "empty_field": 1, "wrong_type": 2,
                                    "undecodable": 1}
    assert report.kept + report.n_skipped == 8  # every non-blank line accounted for
    assert any("line 7" in m and "expected an object" in m for m in report.messages)


def test_bad_csv_rows_located_by_line():
    with pytest.raises(DataError, match="line 3"):
        load_demonstrations(FIX / "bad_rows.csv")
    ds, report = read_demonstrations(FIX / "bad_rows.csv", on_error="skip")
    assert ds["prompt"] == ["ok", "ok2"]
    assert dict(report.skipped) == {"malformed": 1, "undecodable": 1, "empty_field": 1}
    assert any("line 4" in m and "'response'" in m for m in report.messages)
    assert any("line 5" in m and "'prompt'" in m for m in report.messages)


def test_on_error_value_checked():
    with pytest.raises(ValueError, match="on_error"):
        load_demonstrations(FIX / "chat.jsonl", on_error="ignore")


# ---------------------------------------------------------------------------------------------
# the embedded model's real template


@pytest.mark.embedded
def test_encoding_matches_embedded_chat_template():
    from onpolicy_sft.models import EMBEDDED_MODEL, load_tokenizer

    tok = load_tokenizer(EMBEDDED_MODEL)  # the tokenizer only: no need to load the weights
    for system in ("", "Be terse."):
        for response in ("12+3=15\n#### 15", " lead", "\nnewline", "The answer is \\boxed{7}."):
            enc = encode_example(tok, "What is 12+3?", response, system)
            full = list(tok.apply_chat_template(
                ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": "What is 12+3?"}, {"role": "assistant", "content": response}],
                tokenize=True)["input_ids"])
            # token for token the template's conversation, which ends with one newline after eos
            assert full[: len(enc["input_ids"])] == enc["input_ids"]
            assert tok.decode(full[len(enc["input_ids"]):]) == "\n"
            assert enc["input_ids"][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_data_convert_round_trips_and_reports_bad_rows(tmp_path, capsys):
    from onpolicy_sft.cli import main

    out = tmp_path / "chat.parquet"
    assert main(["data", "convert", str(FIX / "chat.jsonl"), "--out", str(out)]) == 0
    assert load_demonstrations(out).to_list() == load_demonstrations(FIX / "chat.jsonl").to_list()
    assert main(["data", "convert", str(FIX / "bad_type.jsonl"), "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "line 2" in capsys.readouterr().err
    assert main(["data", "convert", str(FIX / "bad_mixed.jsonl"), "--on-error", "skip",
                 "--out", str(tmp_path / "x.jsonl")]) == 0
    assert "skipped 6 rows" in capsys.readouterr().err
    assert len(load_demonstrations(tmp_path / "x.jsonl")) == 2


def test_cli_data_show_previews_arithmetic_with_token_statistics(tmp_path, tiny_tokenizer, capsys):
    from onpolicy_sft.cli import main

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    assert main(["data", "show", "--n", "5", "--rows", "1", "--model", str(tmp_path / "tok")]) == 0
    text = capsys.readouterr().out
    assert "\\\\boxed{}" in text and '"rows": 5' in text and '"response_tokens"' in text
