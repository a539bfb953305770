"""Building the rollout engine a recipe describes: tool registry + generation backend + engine.

Stages (hdpo, eval, chat, curate) call `build_engine` instead of wiring these themselves, so a
recipe's `rollout` and `tools` sections mean the same thing everywhere.
"""

from __future__ import annotations


def build_registry(recipe):
    from metis_cli.agent.tools.registry import ToolRegistry

    return ToolRegistry.from_config(recipe.tools)


def build_backend(recipe, model, tokenizer, *, model_path: str | None = None):
    """`rollout.backend`: hf shares the trainer's model object; vllm runs an engine in process."""
    if recipe.rollout.backend == "vllm":
        from metis_cli.agent.vllm_backend import VllmBackend

        return VllmBackend.from_recipe(recipe, model_path=model_path, tokenizer=tokenizer)
    from metis_cli.agent.hf_backend import HFBackend

    return HFBackend(model, tokenizer, batch_size=recipe.rollout.batch_size)


def build_engine(recipe, backend, tokenizer, registry, *, max_turns: int | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None):
    from metis_cli.agent.rollout import RolloutEngine

    rollout = recipe.rollout
    return RolloutEngine(
        backend, tokenizer, registry,
        max_turns=max_turns or rollout.max_turns,
        max_new_tokens_per_turn=max_new_tokens or rollout.max_new_tokens,
        max_total_tokens=rollout.max_total_tokens,
        temperature=rollout.temperature if temperature is None else temperature,
        top_p=rollout.top_p,
        continuous=rollout.vllm.continuous,
    )
