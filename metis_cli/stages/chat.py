"""`metis chat`: one conversation with a model and its tools, streamed token by token.

The multi-turn tool logic is not re-implemented here: every question goes through the same
`RolloutEngine` that RL and eval use (agent/rollout.py: prompt rendering, stopping at
`</tool_call>`, parsing, running the call through the tool registry, forcing the tool turn's
tokens, turn and token limits). Two adapters make that engine interactive:
  - `StreamingHFBackend`, a GenerationBackend that generates one sequence with transformers'
    `generate` and hands each decoded piece of text to a listener as it is sampled; a set
    `interrupt` event (Ctrl-C in the REPL) ends the turn at the next token. It reports no
    log-probs (0.0 each): chat never trains.
  - `ObservedTools`, a registry wrapper that tells the listener about each call before it runs
    and about its result after.
The conversation is the engine's rollout messages; a question whose answer was interrupted leaves
the conversation as it was. The REPL and its rendering live in stages/chat_repl.py.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from metis_cli.agent.backend import Generation
from metis_cli.errors import DataError


class ChatListener(Protocol):
    """What a front end is told while an answer is produced (all optional to act on)."""

    def on_turn_start(self, turn: int) -> None: ...
    def on_text(self, text: str) -> None: ...
    def on_tool_start(self, call) -> None: ...
    def on_tool_result(self, record: ToolCallRecord) -> None: ...


class SilentListener:
    def on_turn_start(self, turn: int) -> None:
        pass

    def on_text(self, text: str) -> None:
        pass

    def on_tool_start(self, call) -> None:
        pass

    def on_tool_result(self, record: ToolCallRecord) -> None:
        pass


@dataclass
class ToolCallRecord:
    """One call the model made and what came back. `parse_error` is set for malformed calls."""

    name: str | None
    arguments: dict | None
    raw: str
    parse_error: str | None
    result: str
    tool_error: str | None  # a ToolErrorKind string, None on success
    runtime_s: float


@dataclass
class ChatAnswer:
    """One question and everything the model did to answer it.

    finish_reason: the rollout's ("answer", "eos", "max_turns", "length"), "interrupted", or
    "context_full" when the conversation left no room to generate.
    """

    question: str
    answer: str | None
    finish_reason: str
    tool_calls: list[ToolCallRecord]
    T: int
    turns: int
    generated_tokens: int
    total_s: float
    generation_s: float
    tool_s: float
    messages: list[dict] = field(default_factory=list)  # the whole conversation after this answer

    @property
    def interrupted(self) -> bool:
        return self.finish_reason == "interrupted"

    def to_json(self) -> dict:
        return {
            "question": self.question, "answer": self.answer, "finish_reason": self.finish_reason,
            "T": self.T, "turns": self.turns, "generated_tokens": self.generated_tokens,
            "tool_calls": [asdict(record) for record in self.tool_calls],
            "timings": {"total_s": self.total_s, "generation_s": self.generation_s, "tool_s": self.tool_s},
            "messages": self.messages,
        }


# ------------------------------------------------------------------------------ backend
class _TextStreamer(BaseStreamer):
    """Receives token ids from `generate` and passes the newly decoded text on.

    The whole sampled sequence is decoded each time and only the new suffix is emitted, so
    multi-byte characters split across tokens come out whole (a trailing U+FFFD waits).
    """

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.token_ids: list[int] = []
        self.emitted = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate pushes the prompt first
            self.prompt_seen = True
            return
        self.token_ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return
        if len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
            self.emitted = text

    def end(self) -> None:
        pass


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StreamingHFBackend:
    """GenerationBackend for a chat: one sequence at a time, text streamed to `listener.on_text`."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.listener: ChatListener = SilentListener()
        self.interrupt = threading.Event()
        self.turn = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def update_weights(self, model) -> None:
        self.model = model

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, stop_token_ids, greedy=False, seed=None):
        return [self._generate_one(p, max_new_tokens, temperature, top_p, stop_token_ids, greedy, seed) for p in prompts]

    def _generate_one(self, prompt, max_new_tokens, temperature, top_p, stop_token_ids, greedy, seed) -> Generation:
        if self.interrupt.is_set() or max_new_tokens <= 0:
            return Generation([], [], "length")
        self.turn += 1
        self.listener.on_turn_start(self.turn)
        greedy = greedy or temperature <= 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=not greedy, eos_token_id=list(stop_token_ids),
            pad_token_id=self.pad_id, **({} if greedy else {"temperature": temperature, "top_p": top_p}),
        )
        if seed is not None and not greedy:
            torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                streamer=_TextStreamer(self.tokenizer, self.listener.on_text),
                stopping_criteria=StoppingCriteriaList([_StopOnEvent(self.interrupt)]),
            )
        new_ids = output[0, len(prompt):].tolist()
        stopped = bool(new_ids) and new_ids[-1] in stop_token_ids and not self.interrupt.is_set()
        return Generation(new_ids, [0.0] * len(new_ids), "stop" if stopped else "length")


# -------------------------------------------------------------------------------- tools
class ObservedTools:
    """The tool registry, reporting each call to a listener and keeping a record of it."""

    def __init__(self, registry):
        self.registry = registry
        self.listener: ChatListener = SilentListener()
        self.records: list[ToolCallRecord] = []

    def specs(self) -> list[dict]:
        return self.registry.specs()

    def names(self) -> list[str]:
        return self.registry.names()

    def execute_many(self, requests):
        for call, _ in requests:
            self.listener.on_tool_start(call)
        results = self.registry.execute_many(requests)
        for (call, _), result in zip(requests, results):
            record = ToolCallRecord(call.name, call.arguments, call.raw, call.error, result.text, result.error,
                                    result.runtime_s)
            self.records.append(record)
            self.listener.on_tool_result(record)
        return results


# ------------------------------------------------------------------------------ session
class ChatSession:
    """A conversation with one model: `ask(question)` runs the engine and keeps the messages."""

    def __init__(self, model, tokenizer, registry, recipe, *, model_path: str, system_prompt: str | None):
        from metis_cli.agent.rollout import RolloutEngine

        chat = recipe.chat
        self.model_path = model_path
        self.backend = StreamingHFBackend(model, tokenizer)
        self.tools = ObservedTools(registry)
        self.temperature = chat.temperature
        self.seed = recipe.run.seed
        self.engine = RolloutEngine(
            self.backend, tokenizer, self.tools,
            max_turns=chat.max_turns, max_new_tokens_per_turn=chat.max_new_tokens,
            # A chat grows over many questions: the model's context is the only cap.
            max_total_tokens=getattr(model.config, "max_position_embeddings", None) or recipe.rollout.max_total_tokens,
            temperature=chat.temperature, top_p=recipe.rollout.top_p,
        )
        self.system_prompt = system_prompt
        self.messages: list[dict] = []
        self.reset()

    @property
    def interrupt(self) -> threading.Event:
        return self.backend.interrupt

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def set_system_prompt(self, text: str | None) -> None:
        """Replace the system prompt; the rest of the conversation stays."""
        self.system_prompt = text or None
        rest = [m for m in self.messages if m["role"] != "system"]
        self.messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + rest

    def tool_specs(self) -> list[dict]:
        return self.tools.specs()

    def ask(self, question: str, listener: ChatListener | None = None) -> ChatAnswer:
        from metis_cli.rewards.answer import final_answer

        listener = listener or SilentListener()
        self.backend.listener = self.tools.listener = listener
        self.backend.turn = 0
        self.tools.records = []
        self.interrupt.clear()
        started = time.perf_counter()
        prompt = self.messages + [{"role": "user", "content": question}]
        self.seed += 1  # a new draw per question when sampling, reproducible per session
        rollout = self.engine.run([prompt], 1, greedy=self.temperature <= 0, seed=self.seed)[0]
        finish = rollout.finish_reason or "eos"
        if self.interrupt.is_set():
            finish = "interrupted"
        elif rollout.num_turns == 0:
            finish = "context_full"
        else:
            self.messages = rollout.messages
        return ChatAnswer(
            question=question, answer=final_answer(rollout.assistant_texts), finish_reason=finish,
            tool_calls=list(self.tools.records), T=rollout.tool_calls, turns=rollout.num_turns,
            generated_tokens=rollout.generated_tokens, total_s=time.perf_counter() - started,
            generation_s=rollout.generation_s, tool_s=rollout.tool_s, messages=rollout.messages,
        )

    def save(self, path: Path) -> Path:
        """Write the conversation as one messages-layout JSONL row (`metis sft` can train on it)."""
        if not any(m["role"] == "assistant" for m in self.messages):
            raise DataError("nothing to save yet: ask a question first")
        path = Path(path).expanduser()
        row = {"id": f"chat-{time.strftime('%Y%m%d-%H%M%S')}", "model": self.model_path, "messages": self.messages}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as error:
            raise DataError(f"cannot write {path}: {error.strerror}") from None
        return path


def open_session(model_path: str, recipe, *, quiet: bool = False) -> ChatSession:
    """Load the model and tools a recipe describes and start a conversation."""
    from metis_cli.agent.factory import build_registry
    from metis_cli.data.synthetic import SYSTEM_PROMPT
    from metis_cli.telemetry.progress import spinner
    from metis_cli.model.loading import load_policy
    from metis_cli.model.runtime import pick_device, seed_everything, setup_threads

    setup_threads(recipe.run.threads)
    device = pick_device(recipe.run.device)
    seed_everything(recipe.run.seed)
    with spinner(f"chat: loading {model_path}", quiet=quiet):
        model, tokenizer = load_policy(model_path, recipe, device=device, field="--model", trainable=False)
    system_prompt = recipe.chat.system_prompt if recipe.chat.system_prompt is not None else SYSTEM_PROMPT
    return ChatSession(model.eval(), tokenizer, build_registry(recipe), recipe,
                       model_path=model_path, system_prompt=system_prompt)
