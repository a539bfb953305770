"""`metis chat`: one-shot JSON, the REPL through piped stdin and a pseudo-terminal, tool-call display."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from tests.conftest import default_sigint

from metis_cli.agent.backend import Generation
from metis_cli.cli.main import app
from metis_cli.data import synthetic
from metis_cli.data.datasets import load_examples
from metis_cli.recipe import validate_data
from metis_cli.stages.chat import open_session
from metis_cli.stages.chat_repl import Repl
from metis_cli.model.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    # A long context, so the random model can babble for thousands of tokens (the Ctrl-C test).
    return build_tiny_model(tmp_path_factory.mktemp("chat") / "model", hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64, max_position_embeddings=4096)


def chat_recipe(tmp_path, model_dir, **chat) -> Path:
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run"), "threads": 1},
        "model": {"name_or_path": str(model_dir)},
        "chat": {"max_turns": 4, "max_new_tokens": 8, **chat},
    }))
    return path


def test_once_json_prints_the_whole_trajectory(tmp_path, model_dir):
    result = CliRunner().invoke(app, ["chat", "--model", str(model_dir), "--recipe", str(chat_recipe(tmp_path, model_dir)),
                                      "--once", "What is 3 + 4?", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["question"] == "What is 3 + 4?" and payload["model"] == str(model_dir)
    roles = [m["role"] for m in payload["messages"]]
    assert roles[:3] == ["system", "user", "assistant"]
    assert payload["messages"][1]["content"] == "What is 3 + 4?"
    assert payload["T"] == len(payload["tool_calls"]) == roles.count("tool")
    assert 0 < payload["generated_tokens"] <= 8 * payload["turns"]
    timings = payload["timings"]
    assert timings["total_s"] >= timings["generation_s"] > 0


def test_once_from_stdin_answers_each_line_in_a_fresh_conversation(tmp_path, model_dir):
    result = CliRunner().invoke(app, ["chat", "--model", str(model_dir), "--recipe", str(chat_recipe(tmp_path, model_dir)),
                                      "--once", "-", "--json"], input="What is 1 + 1?\n\nWhat is 2 + 2?\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, question in zip(lines, ["What is 1 + 1?", "What is 2 + 2?"]):
        payload = json.loads(line)
        users = [m["content"] for m in payload["messages"] if m["role"] == "user"]
        assert users == [question]


def test_json_without_once_is_a_user_error(model_dir):
    result = CliRunner().invoke(app, ["chat", "--model", str(model_dir), "--json"])
    assert result.exit_code == 2 and "--json needs --once" in result.stderr


def test_without_a_recipe_chat_uses_the_calculator_and_greedy_defaults(tmp_path):
    from metis_cli.cli.chat import recipe_or_defaults

    recipe = recipe_or_defaults(str(tmp_path / "model"), None, None)
    assert recipe.tools.enabled == ["calculator"] and recipe.chat.temperature == 0.0
    assert recipe.model.name_or_path == str(tmp_path / "model")


def test_missing_model_is_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["chat", "--model", str(tmp_path / "nope"), "--once", "hi"])
    assert result.exit_code == 2 and "model folder not found" in result.stderr


def test_repl_question_tools_save_quit(tmp_path, model_dir):
    saved = tmp_path / "out" / "conversation.jsonl"
    script = f"What is 3 + 4?\n/tools\n/system Be brief.\n/save {saved}\n/nonsense\n/quit\n"
    recipe = chat_recipe(tmp_path, model_dir)
    result = CliRunner().invoke(app, ["chat", "--model", str(model_dir), "--recipe", str(recipe)], input=script)
    assert result.exit_code == 0, result.output
    output = result.stdout
    assert "calculator" in output and "Evaluate an arithmetic expression" in output  # /tools
    assert "tool calls" in output or "tool call " in output  # the footer after the answer
    assert "saved 3 messages" in output and "unknown command /nonsense" in output
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 1
    messages = rows[0]["messages"]
    assert [m["role"] for m in messages][:3] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[1]["content"] == "What is 3 + 4?"
    # The saved file is a dataset metis reads back (e.g. as SFT data).
    example = load_examples(saved, need_answer=False)[0]
    assert example.trajectory == messages


class ScriptedBackend:
    """Writes fixed turns instead of sampling, token by token through the chat's stream: a failing
    call, a malformed call, a good call, the answer."""

    TURNS = [
        '<tool_call>{"name": "calculator", "arguments": {"expression": "2 +"}}</tool_call>',
        "<tool_call>not json</tool_call>",
        synthetic.calculator_call("123 * 45"),
        "<answer>5535</answer><|im_end|>",
    ]

    def __init__(self, tokenizer, stream):
        self.tokenizer, self.stream, self.turn = tokenizer, stream, 0

    def generate(self, prompts, params):
        ids = self.tokenizer.encode(self.TURNS[self.turn], add_special_tokens=False)
        self.turn += 1
        for token_id in ids:
            self.stream.on_tokens([0], [token_id])
        return [Generation(ids, [0.0] * len(ids), "stop")]

    def update_weights(self, model):
        pass

    def close(self):
        pass


def test_tool_errors_and_malformed_calls_are_shown_and_the_session_goes_on(model_dir):
    recipe = validate_data({"model": {"name_or_path": str(model_dir)}, "run": {"output_dir": ".", "threads": 1}})
    session = open_session(str(model_dir), recipe, quiet=True)
    session.engine.backend = ScriptedBackend(session.agent.tokenizer, session.stream)
    screen = io.StringIO()
    repl = Repl(session, Console(file=screen, width=100, highlight=False))

    answer = repl.ask("What is 123 * 45?")

    assert answer.T == 3 and answer.answer == "5535" and answer.finish_reason == "answer"
    assert [r.tool_error for r in answer.tool_calls] == ["tool_error", "malformed", None]
    assert answer.tool_calls[1].parse_error and answer.tool_calls[2].result == "5535"
    from metis_cli.stages.chat_repl import print_answer

    print_answer(repl.console, answer)
    text = screen.getvalue()
    assert "malformed tool call" in text and "invalid JSON" in text
    assert "calculator" in text and "-> 5535" in text
    assert "answer: 5535" in text and "3 tool calls" in text
    # Each turn's text streamed after its prompt marker (the panels show the arguments, not this raw call).
    assert text.count("model>") == 4 and '"arguments": {"expression": "2 +"}' in text.split("model>")[1]
    assert [m["role"] for m in session.messages].count("tool") == 3


def test_interrupted_answer_leaves_the_conversation_as_it_was(tmp_path, model_dir):
    recipe = validate_data({"model": {"name_or_path": str(model_dir)}, "run": {"output_dir": ".", "threads": 1},
                            "chat": {"max_new_tokens": 500}})
    session = open_session(str(model_dir), recipe, quiet=True)
    before = list(session.messages)

    class InterruptAfterFirstText:
        seen = 0

        def on_turn_start(self, turn):
            pass

        def on_text(self, text):
            self.seen += 1
            session.interrupt.set()  # what Ctrl-C does in the REPL

        def on_tool_start(self, call):
            pass

        def on_tool_result(self, record):
            pass

    answer = session.ask("What is 3 + 4?", InterruptAfterFirstText())

    assert answer.finish_reason == "interrupted" and answer.generated_tokens < 20
    assert session.messages == before


def test_ctrl_c_in_a_terminal_stops_the_answer_not_the_session(tmp_path, model_dir):
    pexpect = pytest.importorskip("pexpect")
    recipe = chat_recipe(tmp_path, model_dir, max_new_tokens=3000)
    child = pexpect.spawn(sys.executable, ["-m", "metis_cli", "chat", "--model", str(model_dir), "--recipe", str(recipe)],
                          cwd=str(REPO), encoding="utf-8", timeout=60, dimensions=(40, 120),
                          preexec_fn=default_sigint)
    try:
        child.expect_exact("you>")
        child.sendintr()  # at the prompt: a reminder, not an exit
        child.expect_exact("/quit or Ctrl-D to leave")
        child.sendline("What is 3 + 4?")
        child.expect_exact("model>")
        child.expect(r"[A-Za-z0-9]")  # the random model is babbling (it would go on for ~3000 tokens)
        child.sendintr()
        child.expect_exact("interrupted", timeout=10)
        child.expect_exact("you>")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
