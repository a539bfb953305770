"""Building the agent a recipe describes: model weights (only where the backend needs them),
tokenizer, generation backend, tool registry and rollout engine, wired once for every stage.

hdpo, eval, chat and curate call `build_agent` instead of wiring these themselves, so a recipe's
`rollout` and `tools` sections mean the same thing everywhere. `rollout.backend: hf` samples
from an HF model in this process (loaded here unless the caller passes its own, e.g. hdpo's
trainer model); `vllm` starts an engine that loads the weights itself, so only the tokenizer is
loaded here. `build_backend` and `build_engine` are the two halves, for tests and benchmarks.

Must not touch: training (the caller owns the model it passes in), sampling internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from metis_cli.agent.backend import GenerationBackend
    from metis_cli.agent.hf_backend import TokenStream
    from metis_cli.agent.rollout import RolloutEngine
    from metis_cli.agent.tools.registry import ToolRegistry


@dataclass
class Agent:
    """What sampling rollouts from one model takes.

    model: the HF model the HF backend samples from; None with vLLM (the engine holds the weights).
    registry: the tools the engine calls; None samples without tools.
    """

    engine: RolloutEngine
    backend: GenerationBackend
    registry: ToolRegistry | None
    tokenizer: Any
    model: Any | None
    vision: Any | None = None  # model/vision.py Vision of a vision-language policy

    def close(self) -> None:
        """Release the backend (a vLLM engine and its memory); the model stays the caller's."""
        self.backend.close()


def build_registry(recipe) -> ToolRegistry:
    from metis_cli.agent.tools.registry import ToolRegistry

    return ToolRegistry.from_config(recipe.tools)


def build_agent(
    recipe,
    model_path: str,
    *,
    registry: ToolRegistry | None,
    field: str = "model.name_or_path",
    model=None,
    tokenizer=None,
    backend: Literal["hf", "vllm"] | None = None,
    token_stream: TokenStream | None = None,
    max_turns: int | None = None,
    max_new_tokens: int | None = None,
    max_total_tokens: int | None = None,
    temperature: float | None = None,
    vision=None,
) -> Agent:
    """The agent that samples from `model_path` as `recipe` says.

    field: the recipe field or option that named `model_path`, for error messages.
    model, tokenizer: already loaded (hdpo's trainer model, which the HF backend then samples
        from in place); by default they are loaded here, the model only for the HF backend.
    backend: overrides `rollout.backend` ("hf" for `metis chat`, which streams tokens).
    token_stream: hooks into the HF backend's decode loop (agent/hf_backend.py); HF only.
    max_turns, max_new_tokens, max_total_tokens, temperature: override the `rollout` section's.
    vision: the policy's image handling when the caller has it (model/vision.py); by default it is
        built here for a vision-language model (its processor loaded from `model_path`).
    """
    from metis_cli.model.vision import load_vision

    kind = backend or recipe.rollout.backend
    if token_stream is not None and kind != "hf":
        raise ValueError("a token stream needs the HF backend")
    if tokenizer is None:
        if model is not None:
            raise ValueError("build_agent: pass the model's tokenizer with it")
        model, tokenizer = _load(recipe, model_path, field, with_weights=kind == "hf")
    elif model is None and kind == "hf":
        raise ValueError("build_agent: the HF backend needs the model the tokenizer belongs to")
    if vision is None:
        vision = load_vision(model_path, model=model, trust_remote_code=recipe.model.trust_remote_code, field=field)
    sampler = build_backend(recipe, model, tokenizer, model_path=model_path, backend=kind, token_stream=token_stream,
                            vision=vision)
    engine = build_engine(recipe, sampler, tokenizer, registry, max_turns=max_turns, max_new_tokens=max_new_tokens,
                          max_total_tokens=max_total_tokens, temperature=temperature, vision=vision)
    return Agent(engine, sampler, registry, tokenizer, model if kind == "hf" else None, vision)


def _load(recipe, model_path: str, field: str, *, with_weights: bool):
    """(model or None, tokenizer); the recipe's tiny base model is built first if it is asked for."""
    from metis_cli.model.loading import ensure_base_model, load_policy, load_tokenizer
    from metis_cli.model.runtime import pick_device

    if model_path == recipe.model.name_or_path:
        ensure_base_model(recipe)
    if not with_weights:
        return None, load_tokenizer(model_path, field=field, trust_remote_code=recipe.model.trust_remote_code,
                                    chat_template_kwargs=recipe.model.chat_template_kwargs)
    model, tokenizer = load_policy(model_path, recipe, device=pick_device(recipe.run.device), field=field,
                                   trainable=False)
    return model.eval(), tokenizer


def build_backend(recipe, model, tokenizer, *, model_path: str | None = None,
                  backend: Literal["hf", "vllm"] | None = None, token_stream: TokenStream | None = None,
                  vision=None):
    """`rollout.backend` (or `backend`): hf samples from `model` in place (shared with a trainer);
    vllm runs an engine in this process on `model_path`."""
    if (backend or recipe.rollout.backend) == "vllm":
        from metis_cli.agent.vllm_backend import VllmBackend

        return VllmBackend.from_recipe(recipe, model_path=model_path, tokenizer=tokenizer, vision=vision)
    from metis_cli.agent.hf_backend import HFBackend

    return HFBackend(model, tokenizer, batch_size=recipe.rollout.batch_size, stream=token_stream, vision=vision)


def build_engine(recipe, backend, tokenizer, registry, *, max_turns: int | None = None,
                 max_new_tokens: int | None = None, max_total_tokens: int | None = None,
                 temperature: float | None = None, vision=None) -> RolloutEngine:
    from metis_cli.agent.rollout import RolloutEngine

    rollout = recipe.rollout
    return RolloutEngine(
        backend, tokenizer, registry,
        max_turns=max_turns or rollout.max_turns,
        max_new_tokens_per_turn=max_new_tokens or rollout.max_new_tokens,
        max_total_tokens=max_total_tokens or rollout.max_total_tokens,
        temperature=rollout.temperature if temperature is None else temperature,
        top_p=rollout.top_p,
        continuous=rollout.vllm.continuous,
        max_response_tokens=rollout.max_response_tokens,
        max_observation_tokens=rollout.max_observation_tokens,
        vision=vision,
    )
