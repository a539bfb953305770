"""`metis chat`: one conversation with a model and its tools, streamed token by token.

The multi-turn tool logic is not re-implemented here: every question goes through the same
`RolloutEngine` and HF backend that RL and eval use (agent/factory.py `build_agent`: prompt
rendering, stopping at `</tool_call>`, parsing, running the call through the tool registry,
forcing the tool turn's tokens, turn and token limits). `_ChatStream` makes it interactive: as
the HF backend's token stream it decodes each sampled token into text for the listener and, once
`interrupt` is set (Ctrl-C in the REPL), ends the turn at the next token; as the engine's
`RolloutListener` it tells the listener about each turn, each tool call before it runs and each
result after. The conversation is the engine's rollout messages; a question whose answer was
interrupted leaves the conversation as it was. The REPL and its rendering live in
stages/chat_repl.py.

Images (a vision-language policy, `Agent.vision`): a question may bring images
(`ask(..., images=)`); its user message holds one `{"type": "image"}` part per image before the
text, and the session keeps every image of the conversation in order of appearance -- the
questions' and those tools returned (zoom_in) -- in `images`, passed whole to each engine run so
the re-rendered history and its image parts line up. Transcripts (`--once --json`, `/save`) carry
image placeholders and sizes, never pixels; `/save` writes the images as PNG files beside the row.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from metis_cli.agent.rollout_types import RolloutListener
from metis_cli.errors import DataError, ModelError


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
    images: list[list[int]] = field(default_factory=list)  # [width, height] of each image it returned


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
    images: list[list[int]] = field(default_factory=list)  # [width, height] of its images, in order

    @property
    def interrupted(self) -> bool:
        return self.finish_reason == "interrupted"

    def to_json(self) -> dict:
        return {
            "question": self.question, "answer": self.answer, "finish_reason": self.finish_reason,
            "T": self.T, "turns": self.turns, "generated_tokens": self.generated_tokens,
            "tool_calls": [asdict(record) for record in self.tool_calls],
            "timings": {"total_s": self.total_s, "generation_s": self.generation_s, "tool_s": self.tool_s},
            "messages": self.messages, "images": self.images,
        }


def image_sizes(images) -> list[list[int]]:
    """[[width, height], ...] of PIL images: what transcripts record instead of pixels."""
    return [[image.width, image.height] for image in images]


# ------------------------------------------------------------------------------ stream
class _ChatStream(RolloutListener):
    """The HF backend's token stream and the engine's listener for one session (module docstring).

    Text: the whole sampled turn is decoded after each token and only the new suffix is passed
    on, so multi-byte characters split across tokens come out whole (a trailing U+FFFD waits).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.listener: ChatListener = SilentListener()
        self.interrupt = threading.Event()
        self.records: list[ToolCallRecord] = []
        self._turn_ids: list[int] = []
        self._emitted = ""

    def start(self, listener: ChatListener) -> None:
        """A new question: clear the interrupt and the records, talk to `listener`."""
        self.listener, self.records = listener, []
        self.interrupt.clear()

    # TokenStream (agent/hf_backend.py)
    @property
    def interrupted(self) -> bool:
        return self.interrupt.is_set()

    def on_tokens(self, prompt_indices: list[int], token_ids: list[int]) -> None:
        self._turn_ids += token_ids  # a chat samples one sequence at a time
        text = self.tokenizer.decode(self._turn_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return
        if len(text) > len(self._emitted):
            self.listener.on_text(text[len(self._emitted):])
            self._emitted = text

    # RolloutListener (agent/rollout_types.py)
    def on_turn_start(self, rollout) -> None:
        self._turn_ids, self._emitted = [], ""
        if not self.interrupted:
            self.listener.on_turn_start(rollout.num_turns + 1)

    def on_tool_start(self, rollout, call) -> None:
        self.listener.on_tool_start(call)

    def on_tool_result(self, rollout, call, result) -> None:
        record = ToolCallRecord(call.name, call.arguments, call.raw, call.error, result.text, result.error,
                                result.runtime_s, image_sizes(result.images))
        self.records.append(record)
        self.listener.on_tool_result(record)


# ------------------------------------------------------------------------------ session
class ChatSession:
    """A conversation with one model: `ask(question)` runs the engine and keeps the messages."""

    def __init__(self, agent, stream: _ChatStream, recipe, *, model_path: str, system_prompt: str | None):
        self.agent, self.engine, self.tools, self.stream = agent, agent.engine, agent.registry, stream
        self.vision = agent.vision  # None for a text-only model
        self.model_path = model_path
        self.temperature = recipe.chat.temperature
        self.seed = recipe.run.seed
        self.questions = 0
        self.system_prompt = system_prompt
        self.messages: list[dict] = []
        self.images: list = []  # every image of the conversation, in order of appearance
        self.reset()

    @property
    def interrupt(self) -> threading.Event:
        return self.stream.interrupt

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.images = []

    def require_vision(self, option: str) -> None:
        """A ModelError naming the model and `option` when the model cannot see images."""
        if self.vision is None:
            raise ModelError(f"{option}: {self.model_path} is a text-only model (no vision tower), so it cannot "
                             "see images; chat with a vision-language model (e.g. Qwen3-VL) or leave out the image")

    def load_image(self, path: str, *, option: str):
        """The image at `path` for a question, as the model will get it (data/images.py
        `load_image`); a ModelError for a text-only model, a DataError if it cannot be read."""
        from metis_cli.data.images import load_image

        self.require_vision(option)
        return load_image(path, where=f"{option} {path}")

    def set_system_prompt(self, text: str | None) -> None:
        """Replace the system prompt; the rest of the conversation stays."""
        self.system_prompt = text or None
        rest = [m for m in self.messages if m["role"] != "system"]
        self.messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + rest

    def tool_specs(self) -> list[dict]:
        return self.tools.specs()

    def ask(self, question: str, listener: ChatListener | None = None, images: list | None = None) -> ChatAnswer:
        """Answer `question` (with `images`, PIL images shown before its text) in the conversation."""
        from metis_cli.model.runtime import CHAT_QUESTION_SEED, derive_seed
        from metis_cli.rewards.answer import final_answer

        images = list(images or [])
        if images:
            self.require_vision("images")
        self.stream.start(listener or SilentListener())
        started = time.perf_counter()
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": question}] if images else question
        prompt = self.messages + [{"role": "user", "content": content}]
        self.questions += 1  # a new draw per question when sampling, reproducible per session
        rollout = self.engine.run([prompt], 1, greedy=self.temperature <= 0, listener=self.stream,
                                  seed=derive_seed(CHAT_QUESTION_SEED, self.seed, self.questions),
                                  images=[self.images + images] if self.vision is not None else None)[0]
        finish = rollout.finish_reason or "eos"
        if self.interrupt.is_set():
            finish = "interrupted"
        elif rollout.num_turns == 0:
            finish = "context_full"
        else:
            self.messages, self.images = rollout.messages, list(rollout.images)
        return ChatAnswer(
            question=question, answer=final_answer(rollout.assistant_texts), finish_reason=finish,
            tool_calls=list(self.stream.records), T=rollout.tool_calls, turns=rollout.num_turns,
            generated_tokens=rollout.generated_tokens, total_s=time.perf_counter() - started,
            generation_s=rollout.generation_s, tool_s=rollout.tool_s, messages=rollout.messages,
            images=image_sizes(rollout.images),
        )

    def save(self, path: Path) -> Path:
        """Write the conversation as one messages-layout JSONL row (`metis sft` can train on it).

        Its images go beside it as `<name>_images/image_<n>.png`; the row names them in `images`
        (relative to its folder, as data rows do) and gives their sizes in `image_sizes`.
        """
        if not any(m["role"] == "assistant" for m in self.messages):
            raise DataError("nothing to save yet: ask a question first")
        path = Path(path).expanduser()
        row = {"id": f"chat-{time.strftime('%Y%m%d-%H%M%S')}", "model": self.model_path, "messages": self.messages}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.images:
                folder = path.parent / f"{path.stem}_images"
                folder.mkdir(exist_ok=True)
                names = [f"{folder.name}/image_{number}.png" for number in range(1, len(self.images) + 1)]
                for name, image in zip(names, self.images):
                    image.save(path.parent / name, format="PNG")
                row.update(images=names, image_sizes=image_sizes(self.images))
            path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as error:
            raise DataError(f"cannot write {path}: {error.strerror}") from None
        return path


def open_session(model_path: str, recipe, *, quiet: bool = False) -> ChatSession:
    """Load the model and tools a recipe describes and start a conversation."""
    from metis_cli.agent.factory import build_agent, build_registry
    from metis_cli.data.synthetic import SYSTEM_PROMPT
    from metis_cli.model.loading import load_policy
    from metis_cli.model.runtime import pick_device, seed_everything, setup_threads
    from metis_cli.telemetry.progress import spinner

    setup_threads(recipe.run.threads)
    device = pick_device(recipe.run.device)
    seed_everything(recipe.run.seed)
    with spinner(f"chat: loading {model_path}", quiet=quiet):
        model, tokenizer = load_policy(model_path, recipe, device=device, field="--model", trainable=False)
    stream = _ChatStream(tokenizer)
    chat = recipe.chat
    agent = build_agent(
        recipe, model_path, registry=build_registry(recipe), model=model.eval(), tokenizer=tokenizer,
        backend="hf", token_stream=stream, max_turns=chat.max_turns, max_new_tokens=chat.max_new_tokens,
        # A chat grows over many questions: the model's context is the only cap.
        max_total_tokens=getattr(model.config, "max_position_embeddings", None) or recipe.rollout.max_total_tokens,
        temperature=chat.temperature,
    )
    system_prompt = chat.system_prompt if chat.system_prompt is not None else SYSTEM_PROMPT
    return ChatSession(agent, stream, recipe, model_path=model_path, system_prompt=system_prompt)
