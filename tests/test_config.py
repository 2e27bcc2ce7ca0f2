"""Configs are checked completely when they load, before any model: every kind of bad value fails
with its file and path, numbers written as strings arrive as numbers, and options of a backend the
run does not use are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from onpolicy_sft.compare_config import METHODS, CompareConfig
from onpolicy_sft.config import LoopConfig, load_config, run_rewrite_config
from onpolicy_sft.config_io import ConfigError, apply_overrides, save_config, to_dict
from onpolicy_sft.rewrite_config import RewriteConfig

CONFIGS = Path(__file__).parent.parent / "experiments" / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("rewrite:\n  hinted:\n    beta: x\n", "config.yaml: rewrite.hinted.beta: expected float, got 'x'"),
    ("rewrite:\n  sampling: {top_p: 2.0}\n", "config.yaml: rewrite.sampling: SamplingConfig.top_p must be in (0, 1]"),
    ("rewrite:\n  k_selff: 2\n", "config.yaml: rewrite.k_selff: unknown key; valid keys here:"),
    ("rewrite:\n  fallback: keep\n", "config.yaml: rewrite: RewriteConfig.fallback must be one of"),
    ("rewrite:\n  template: {instruction: 3}\n", "config.yaml: rewrite.template.instruction: expected str, got 3"),
    ("train:\n  objective: {name: idft, hparams: {beta: high}}\n",
     "config.yaml: train.objective.hparams.beta: expected float, got 'high'"),
    ("train:\n  objective: {name: idft, hparams: {betta: 1.0}}\n",
     "config.yaml: train.objective: unknown hyperparameter(s) ['betta'] for objective 'idft'"),
    ("train:\n  objective: {name: ppo}\n", "config.yaml: train.objective: unknown objective 'ppo'"),
    ("baseline:\n  objective: {name: sft, hparams: {tau: 0.1}}\n", "config.yaml: baseline.objective: unknown hyperparameter"),
    ("backend: hf\nbackend_options: {max_model_len: 1024}\n",
     "config.yaml: backend_options.max_model_len: an option of the vllm backend, but backend is 'hf'"),
    ("backend_options: {max_num_seqs: many}\n", "config.yaml: backend_options.max_num_seqs: expected int, got 'many'"),
    ("backend_options: {batch_rows: 8}\n", "config.yaml: backend_options.batch_rows: an option of the hf backend"),
    ("backend: tpu\n", "config.yaml: LoopConfig: backend must be one of ['hf', 'vllm']"),
    ("eval:\n  backend: hf\n", "config.yaml: eval.backend: unknown key"),
    ("rewrite:\n  hinted: {backend: hf}\n", "config.yaml: rewrite.hinted.backend: the generation backend is set once"),
    ("eval:\n  batch_size: 16\n", "config.yaml: eval.batch_size: unknown key"),
    ("rounds: two\n", "config.yaml: rounds: expected int, got 'two'"),
    ("data:\n  on_error: ignore\n", "config.yaml: data: on_error must be 'raise' or 'skip'"),
    ("model:\n  trust_remote_code: 'yes'\n", "config.yaml: model.trust_remote_code: expected bool"),
    ("rewrite:\n  keep_verified: 0\n", "config.yaml: rewrite.keep_verified: must be >= 1, got 0"),
    ("rewrite:\n  adaptive: maybe\n", "config.yaml: rewrite.adaptive: expected bool, got 'maybe'"),
    ("rewrite:\n  triage: {by: entropy}\n", "config.yaml: rewrite.triage.by: must be one of ('off', 'p_value', 'phi')"),
    ("rewrite:\n  triage: {by: p_value, level: 2}\n", "config.yaml: rewrite.triage.level: must be in (0, 1), got 2.0"),
    ("rewrite:\n  triage: {level: 0.05}\n", "config.yaml: rewrite.triage.level: a level needs a test"),
    ("train:\n  rows: 0\n", "config.yaml: train.rows: must be >= 1 or null"),
    # Values that used to pass the load and fail (or train on NaN) once the models were loaded.
    ("train:\n  lr: .inf\n", "config.yaml: train.lr: must be a finite number > 0, got inf"),
    ("train:\n  lr: .nan\n", "config.yaml: train.lr: must be a finite number > 0, got nan"),
    ("train:\n  lr: -1.0e-5\n", "config.yaml: train.lr: must be a finite number > 0"),
    ("train:\n  batch_size: 0\n", "config.yaml: train.batch_size: must be >= 1, got 0"),
    ("train:\n  micro_batch_size: 0\n", "config.yaml: train.micro_batch_size: must be >= 1, got 0"),
    ("train:\n  max_length: 0\n", "config.yaml: train.max_length: must be >= 2, got 0"),
    ("train:\n  epochs: 0\n", "config.yaml: train.epochs: must be a finite number > 0"),
    ("train:\n  adam_betas: [0.9]\n", "config.yaml: train.adam_betas: must be two numbers in [0, 1)"),
    ("train:\n  seed: -1\n", "config.yaml: train.seed: must be an integer in [0, 4294967295], got -1"),
    ("train:\n  warmup_ratio: 2\n", "config.yaml: train.warmup_ratio: must be in [0, 1], got 2.0"),
    ("train:\n  trackers: [wandb]\n", "config.yaml: train.trackers: 'wandb' is not installed here"),
    ("train:\n  trackers: [tensorbored]\n", "config.yaml: train.trackers: 'tensorbored' is not a tracker"),
    ("eval:\n  n_samples: 2\n  pass_k: [1, 5]\n",
     "config.yaml: eval.pass_k: pass@5 needs eval.n_samples >= 5, but n_samples is 2"),
    ("data:\n  columns: {prompt: response}\n", "config.yaml: data.columns: the column 'response' would feed"),
    ("data:\n  seed: 4294967296\n", "config.yaml: data.seed: must be an integer in [0, 4294967295]"),
])
def test_each_kind_of_bad_value_fails_at_load_with_its_path(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert str(err.value).startswith(f"{tmp_path}/{message}"), str(err.value)


def test_a_key_written_twice_is_refused_with_its_file_and_line(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 5.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: line 4: key 'lr' written twice in one mapping (first on line 2)")
    # The same key in two different mappings is no repeat.
    assert load_config(_write(tmp_path, "train:\n  seed: 1\ndata:\n  seed: 2\n")).train.seed == 1


def test_typed_sections_arrive_typed(tmp_path):
    config = load_config(_write(tmp_path, (
        "backend: vllm\nbackend_options: {max_model_len: 1024, gpu_memory_utilization: 1}\n"
        "rewrite:\n  k_self: 3\n  hinted: {beta: 2}\n  sampling: {max_new_tokens: 64}\n"
        "train:\n  lr: 1e-5\n  objective: {name: idft, hparams: {beta: '2', gamma_min: 1}}\n")))
    assert isinstance(config.rewrite, RewriteConfig) and config.rewrite.k_self == 3
    assert config.rewrite.hinted.beta == 2.0 and isinstance(config.rewrite.hinted.beta, float)
    assert config.rewrite.sampling.max_new_tokens == 64
    assert config.train.lr == 1e-5 and isinstance(config.train.lr, float)  # YAML 1.1 reads 1e-5 as a string
    assert config.train.objective.hparams == {"beta": 2.0, "gamma_min": 1.0}
    assert all(isinstance(v, float) for v in config.train.objective.hparams.values())
    assert config.backend_options == {"max_model_len": 1024, "gpu_memory_utilization": 1.0}
    # the run's one backend setting decides every stage's: the rewrite is handed it
    rewrite = run_rewrite_config(config)
    assert rewrite.hinted.backend == "vllm" and rewrite.hinted.beta == 2.0 and rewrite.k_self == 3
    hf = apply_overrides(config, ["backend=hf", "backend_options={}"])
    assert run_rewrite_config(hf).hinted.backend == "hf"
    assert "backend" not in to_dict(config)["rewrite"]["hinted"]  # no setting of a run: not saved


def test_saved_config_loads_back_equal(tmp_path):
    config = apply_overrides(LoopConfig(), ["backend=hf", "rewrite.m_hinted=2", "baseline.enabled=false"])
    assert load_config(save_config(config, tmp_path / "c.yaml")) == config


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"^--set rewrite\.hinted\.beta=x: rewrite\.hinted\.beta: expected float"):
        apply_overrides(LoopConfig(), ["train.lr=1e-5", "rewrite.hinted.beta=x"])


def test_compare_train_overrides_and_hparams_are_typed(tmp_path):
    config = load_config(_write(tmp_path, (
        "train_overrides:\n  sft: {lr: 1e-5, max_steps: 3}\n  target_sft: {teacher: base}\n"
        "hparams:\n  dpo: {beta: '0.2'}\n")), cls=CompareConfig)
    assert config.train_overrides["sft"] == {"lr": 1e-5, "max_steps": 3}
    assert isinstance(config.train_overrides["sft"]["lr"], float)
    assert config.hparams["dpo"] == {"beta": 0.2}
    for text, message in [
        ("train_overrides:\n  sft: {lr: fast}\n", "train_overrides.sft: lr: expected float, got 'fast'"),
        ("train_overrides:\n  sft: {learning_rate: 1}\n", "train_overrides.sft: learning_rate: unknown key"),
        ("train_overrides:\n  ppo: {lr: 1}\n", "train_overrides: unknown method(s) ['ppo']"),
        ("train_overrides:\n  sft: {objective: {name: dft}}\n", "train_overrides.sft.objective: the method names"),
        ("hparams:\n  simpo: {gamma: wide}\n", "hparams.simpo: hparams.gamma: expected float"),
        ("hparams:\n  dpo: {tau: 1}\n", "hparams.dpo: unknown hyperparameter(s) ['tau']"),
        ("methods: [sft, ppo]\n", "methods: unknown method(s) ['ppo']"),
        ("backend: hf\nbackend_options: {max_num_seqs: 8}\n", "backend_options.max_num_seqs: an option of the vllm"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, text), cls=CompareConfig)
        assert message in str(err.value), (text, str(err.value))


def test_python_callers_may_pass_the_rewrite_as_a_mapping():
    config = LoopConfig(backend="hf", rewrite={"k_self": 1, "hinted": {"beta": 2}})
    assert isinstance(config.rewrite, RewriteConfig) and config.rewrite.hinted.beta == 2.0
    assert CompareConfig(rewrite={"m_hinted": 0}).rewrite.m_hinted == 0


def _load_compare(path):
    return load_config(path, cls=CompareConfig)


# Each example config, its loader, and what it is for: the facts a misread file would get wrong.
EXAMPLE_CONFIGS = {
    "cpu_default.yaml": (load_config, {"rounds": 2, "backend": "vllm", "train.objective.name": "idft",
                                       "baseline.objective.name": "sft", "model.name": "smollm2-135m-instruct"}),
    "gpu_qwen25math15b_idft.yaml": (load_config, {"backend": "vllm", "train.objective.name": "idft",
                                                  "model.name": "Qwen/Qwen2.5-Math-1.5B", "model.dtype": "bfloat16"}),
    "gpu_qwen25math15b_target_sft.yaml": (load_config, {"backend": "vllm", "train.objective.name": "target_sft",
                                                        "train.teacher": "base", "model.dtype": "bfloat16"}),
    "compare_cpu.yaml": (_load_compare, {"backend": "hf", "methods": list(METHODS), "seeds": [0, 1, 2],
                                               "model.name": "smollm2-135m-instruct"}),
    "compare_gpu_qwen25math15b.yaml": (_load_compare, {"backend": "vllm", "methods": list(METHODS),
                                                             "seeds": [0, 1, 2], "pairs.k": 16}),
}
ACCELERATE_CONFIGS = {"accelerate_fsdp_8gpu.yaml"}  # accelerate's own format, not ours


def _at(config, path: str):
    for key in path.split("."):
        config = config[key] if isinstance(config, dict) else getattr(config, key)
    return config


def _default_at(config, path: str):
    try:
        return _at(config, path)
    except (KeyError, AttributeError):
        return None  # a key the defaults leave out (a backend option, an objective's hyperparameter)


def _leaves(written: dict, prefix: str = ""):
    """The dotted path and value of every setting a YAML mapping writes."""
    for key, value in written.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _leaves(value, path)
        else:
            yield path, value


def test_every_example_config_is_checked():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXAMPLE_CONFIGS) | ACCELERATE_CONFIGS


@pytest.mark.parametrize("name", sorted(EXAMPLE_CONFIGS))
def test_example_configs_load_every_value_they_write(name):
    """Each setting of the file, read independently with plain YAML, is the value the loaded config
    holds: a key the loader skipped or a default used in its place would differ somewhere."""
    loader, facts = EXAMPLE_CONFIGS[name]
    config = loader(CONFIGS / name)
    written = dict(_leaves(yaml.safe_load((CONFIGS / name).read_text())))
    for path, value in written.items():
        loaded = _at(config, path)
        assert (list(loaded) if isinstance(loaded, tuple) else loaded) == value, path
    defaults = LoopConfig() if loader is load_config else CompareConfig()
    assert any(_default_at(defaults, path) != value for path, value in written.items())  # the file is not all defaults
    for path, value in facts.items():
        assert path in written and _at(config, path) == value, path
