"""The vLLM backend's refusals at construction, before any model loads or vLLM is imported."""

import pytest

from decoding.vllm_backend import RUNNER_VARIABLE, VLLMBackend, check_engine_options, engine_devices


@pytest.mark.parametrize("kwargs, match", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative decoding"),
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=2"),
])
def test_settings_that_cannot_keep_pairs_are_refused(tiny_model, tiny_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        VLLMBackend(tiny_model, tiny_tokenizer, engine_kwargs=kwargs)
    check_engine_options({"pipeline_parallel_size": 1, "speculative_config": None})  # the defaults pass


@pytest.mark.parametrize("value, refused", [("1", True), ("true", True), ("0", False), ("", False)])
def test_model_runner_v2_is_refused(monkeypatch, value, refused):
    monkeypatch.setenv(RUNNER_VARIABLE, value)
    if refused:
        with pytest.raises(ValueError, match=f"{RUNNER_VARIABLE}=0"):
            check_engine_options({})
    else:
        check_engine_options({})


def test_model_runner_choice_must_match_the_environment(monkeypatch):
    monkeypatch.setenv(RUNNER_VARIABLE, "0")
    with pytest.raises(ValueError, match="model_runner='v2' needs Model Runner V2"):
        check_engine_options({}, "v2")
    monkeypatch.setenv(RUNNER_VARIABLE, "1")
    check_engine_options({}, "v2")
    with pytest.raises(ValueError, match="model_runner must be one of"):
        check_engine_options({}, "v3")


@pytest.mark.parametrize("rank, processes, tp, visible, expected", [
    (0, 1, 1, 8, None),             # no launcher: vLLM chooses
    (3, 8, 1, 8, [3]),              # torchrun on 8 GPUs: one engine per GPU
    (1, 4, 2, 8, [2, 3]),           # tensor parallel 2: a block of two per process
    (1, 4, 1, 1, None),             # each process already sees only its own GPU
    (1, 4, 2, 4, None),             # too few GPUs for a block each: left to the user's setting
])
def test_each_launched_process_gets_its_own_gpus(rank, processes, tp, visible, expected):
    assert engine_devices(rank, processes, tp, visible) == expected
    if expected is not None:  # the blocks of all processes tile the GPUs without overlap
        blocks = [engine_devices(r, processes, tp, visible) for r in range(processes)]
        assert sorted(sum(blocks, [])) == list(range(processes * tp))
