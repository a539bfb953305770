"""TRL's side of benchmarks/rollout_throughput.py and step_time.py: GRPOTrainer's multi-turn tool
rollouts and whole training steps, timed.

Runs inside the benchmarks' own TRL venv (benchmarks/.venv-trl, made by _trl_env.py; metis is not
installed there) and never imports metis. Usage, normally via _trl_env.run_trl:
    benchmarks/.venv-trl/bin/python benchmarks/trl_rollouts.py SPEC.json
SPEC.json: {"model_dir", "prompts" (chat messages per prompt), "prompt_ids" (metis's rendering of
each prompt), "tool_spec" (metis's calculator spec), "group_size", "max_completion_length",
"max_tool_calls", "temperature", "warmup_steps", "steps", "mode": "hf" | "vllm_colocate", "threads",
"kv_cache_gb", "tool_latency_s"}. Prints one JSON line: generated tokens (model-sampled, tool output excluded),
seconds inside GRPOTrainer._generate (generation, tool calls and, for vLLM, the weight sync it does
at each new step) per measured step, rollouts and tool-call ratio; and `step_s`, each measured
step's wall time from the trainer's on_step_begin to on_step_end (generation with tools, rewards,
loss, backward, optimizer step).

TRL renders a tool from its Python signature and docstring; metis's calculator spec also forbids
extra arguments, which a docstring cannot say. The tiny tokenizer and model are fitted on metis's
spec, so `calculator` is rendered as `tool_spec`, and the run stops unless every prompt's ids
equal `prompt_ids`: both sides then sample from the very same prompts.
Two patches make TRL's vLLM colocate mode run on CPU vLLM (docs/rl-step.md): the engine gets
dtype=float32 (vLLM picks bf16 on CPU otherwise), eager mode and an explicit KV-cache size; and
weight sync uses vLLM's reload_weights (TRL's per-tensor `model.load_weights` fails on CPU, where
vLLM repacks linear weights). Neither changes how TRL generates or runs tools.
"""

from __future__ import annotations

import ast
import asyncio
import json
import operator
import os
import sys
import tempfile
import time


def calculator(expression: str):
    """Evaluate an arithmetic expression.

    Args:
        expression: The expression to evaluate.
    """
    return str(_evaluate(ast.parse(expression, mode="eval").body))


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg}


def _evaluate(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only + - * / // % on numbers")


def calculator_after(latency_s: float):
    """The calculator tool TRL runs: `calculator` itself, or with `latency_s` > 0 an async
    calculator that waits that long first (TRL gathers async tools' calls; sync ones run one by one)."""
    if latency_s <= 0:
        return calculator

    async def remote_calculator(expression: str):
        """Evaluate an arithmetic expression.

        Args:
            expression: The expression to evaluate.
        """
        await asyncio.sleep(latency_s)
        return str(_evaluate(ast.parse(expression, mode="eval").body))

    remote_calculator.__name__ = remote_calculator.__qualname__ = "calculator"  # TRL names tools by function
    return remote_calculator


def answer_reward(completions, **_) -> list[float]:
    """1 when the last assistant message holds an <answer>; the value does not affect timing."""
    return [float(any(m.get("role") == "assistant" and "<answer>" in str(m.get("content")) for m in c))
            for c in completions]


def _render_tool_as(tool, tool_spec: dict) -> None:
    import transformers.utils.chat_template_utils as chat_template_utils

    from_docstring = chat_template_utils.get_json_schema
    chat_template_utils.get_json_schema = lambda func: tool_spec if func is tool else from_docstring(func)


def _check_same_prompts(tokenizer, tool, prompts: list, expected_ids: list[list[int]]) -> None:
    for index, (messages, expected) in enumerate(zip(prompts, expected_ids, strict=True)):
        rendered = tokenizer.apply_chat_template(messages, tools=[tool], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        if list(rendered) != expected:
            raise SystemExit(f"prompt {index}: TRL renders {len(rendered)} tokens where metis renders "
                             f"{len(expected)}; the sides would not sample from the same prompts")


def _patch_vllm_for_cpu(kv_cache_gb: float) -> None:
    import trl.generation.vllm_generation as vllm_generation
    from vllm import LLM

    def cpu_llm(**kwargs):
        kwargs.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=int(kv_cache_gb * (1 << 30)))
        return LLM(**kwargs)

    def sync_weights(self):
        weights = {self._fix_param_name_to_vllm(n): p.data for n, p in self.model.named_parameters()}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items()),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    vllm_generation.LLM = cpu_llm
    vllm_generation.VLLMGeneration.sync_weights = sync_weights


def _step_timer(step_s: list[float]):
    """A TrainerCallback appending each optimizer step's wall time to `step_s`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_s.append(time.perf_counter() - self.started)

    return StepTimer()


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    use_vllm = spec["mode"] == "vllm_colocate"
    if use_vllm:
        _patch_vllm_for_cpu(spec["kv_cache_gb"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    # The tiny model's template is Qwen's layout (tool calls as <tool_call>{json}</tool_call>), but
    # TRL recognises templates by exact text, so its Qwen3 response parser is set by hand.
    tokenizer.response_template = qwen3_template
    tool = calculator_after(spec.get("tool_latency_s", 0.0))
    _render_tool_as(tool, spec["tool_spec"])
    _check_same_prompts(tokenizer, tool, spec["prompts"], spec["prompt_ids"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    prompts, group_size = spec["prompts"], spec["group_size"]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=True, bf16=False, seed=0, beta=0.0, learning_rate=1e-6,
        per_device_train_batch_size=len(prompts) * group_size, num_generations=group_size,
        max_completion_length=spec["max_completion_length"], max_tool_calling_iterations=spec["max_tool_calls"],
        temperature=spec["temperature"], top_p=1.0, max_steps=spec["warmup_steps"] + spec["steps"],
        use_vllm=use_vllm, vllm_mode="colocate", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=answer_reward, args=config, processing_class=tokenizer,
                          tools=[tool], train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    steps: list[dict] = []
    generate = trainer._generate

    def timed_generate(batch_prompts):
        started = time.perf_counter()
        output = generate(batch_prompts)
        seconds = time.perf_counter() - started
        completion_ids, tool_mask, completions = output[1], output[2], output[3]
        tokens = sum(sum(m) for m in tool_mask) if tool_mask is not None else sum(map(len, completion_ids))
        calls = sum(any(m.get("role") == "tool" for m in c) for c in completions)
        steps.append({"seconds": seconds, "generated_tokens": tokens, "rollouts": len(completion_ids),
                      "rollouts_with_tool_calls": calls})
        return output

    trainer._generate = timed_generate
    step_s: list[float] = []
    trainer.add_callback(_step_timer(step_s))
    trainer.train()
    measured = steps[spec["warmup_steps"]:]
    seconds = sum(s["seconds"] for s in measured)
    tokens = sum(s["generated_tokens"] for s in measured)
    rollouts = sum(s["rollouts"] for s in measured)
    print(json.dumps({
        "mode": spec["mode"], "steps": len(measured), "rollouts": rollouts, "generated_tokens": tokens,
        "generation_s": seconds, "tokens_per_s": tokens / seconds,
        "tool_call_ratio": sum(s["rollouts_with_tool_calls"] for s in measured) / rollouts,
        "generation_s_per_step": [s["seconds"] for s in measured],
        "step_s": step_s[spec["warmup_steps"]:],
    }))


if __name__ == "__main__":
    main(sys.argv[1])
