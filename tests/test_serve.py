"""`metis serve`: the real `openai` client against the server on loopback.

The served model is the tiny Qwen3 trained here for a second to call the calculator on two
questions (one whose call fails) and answer from the result, so every completion below runs the
real path: the HF backend samples the call, the server's tool registry runs it, the forced tool
turn goes back into the model, and the model writes the answer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from metis_cli.recipe import validate_data
from metis_cli.stages.serve import ServerSettings, create_app, open_service
from metis_cli.stages.serve_openai import BadRequest, ServerLimits, parse_chat_request, reply_text, visible_text

MODEL_ID = "metis-test"
API_KEY = "test-key-123"
LIMITS = ServerLimits(max_tokens=24, max_turns=3, context_tokens=512, temperature=0.0)


# ------------------------------------------------------------------------------ fixtures
def _conversation(question: str, expression: str, observation: str, answer: str) -> list[dict]:
    from metis_cli.data import synthetic

    return [{"role": "system", "content": synthetic.SYSTEM_PROMPT}, {"role": "user", "content": question},
            {"role": "assistant", "content": synthetic.calculator_call(expression)},
            {"role": "tool", "name": "calculator", "content": observation},
            {"role": "assistant", "content": synthetic.answer_text(answer)}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> Path:
    """The tiny model, overfit on two calculator trajectories (greedy decoding replays them)."""
    import asyncio

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metis_cli.agent.tools.calculator import CalculatorTool
    from metis_cli.data import synthetic
    from metis_cli.data.chat import tokenize_conversation
    from metis_cli.model.tiny import build_tiny_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = build_tiny_model(tmp_path_factory.mktemp("serve") / "model", hidden_size=32, num_layers=2, num_heads=2,
                              intermediate_size=64)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    failed = asyncio.run(CalculatorTool().call({"expression": "5 / 0"}))
    assert failed.error is not None
    rows = [tokenize_conversation(tokenizer, conversation, [synthetic.CALCULATOR_TOOL_SPEC]) for conversation in (
        _conversation("What is 17 * 23?", "17 * 23", "391", "391"),
        _conversation("What is 5 / 0?", "5 / 0", failed.text, "none"),
    )]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(200):
        loss = 0.0
        for ids, mask in rows:
            input_ids = torch.tensor([ids])
            labels = input_ids.masked_fill(torch.tensor([mask]) == 0, -100)
            loss = loss + model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = folder.parent / "trained"
    model.save_pretrained(trained)
    tokenizer.save_pretrained(trained)
    return trained


class GatedBackend:
    """The real backend, but the first call waits until the test opens the gate (so the test
    can queue requests behind it and see them batched)."""

    def __init__(self, backend):
        self.backend, self.gate, self.calls = backend, threading.Event(), []
        self.gate.set()
        self.fail_next = False

    def generate(self, prompts, params):
        self.gate.wait(timeout=60)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("backend broke")
        self.calls.append(len(prompts))
        return self.backend.generate(prompts, params)

    def close(self):
        self.backend.close()


@pytest.fixture(scope="module")
def server(tool_model, tmp_path_factory):
    import uvicorn

    recipe = validate_data({"run": {"output_dir": str(tmp_path_factory.mktemp("serve-run")), "threads": 1},
                            "model": {"name_or_path": str(tool_model)},
                            "chat": {"max_turns": 3, "max_new_tokens": 24}}, source="test")
    service = open_service(str(tool_model), recipe, quiet=True)
    gated = GatedBackend(service.batcher.backend)
    service.batcher.backend = gated
    app = create_app(service, ServerSettings(model_id=MODEL_ID, api_key=API_KEY, max_concurrent=16))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield {"base_url": base_url, "service": service, "gated": gated}
    uv.should_exit = True
    thread.join(timeout=10)
    app.state.pool.shutdown(wait=False)
    service.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["base_url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def ask(client, question: str, **options):
    return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": question}], **options)


# ------------------------------------------------------------------------------ completions
def test_a_completion_runs_the_tool_on_the_server_and_reports_the_trace(client):
    reply = ask(client, "What is 17 * 23?")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "<answer>391</answer>"
    assert choice.finish_reason == "stop" and reply.model == MODEL_ID
    metis = reply.model_extra["metis"]
    [call] = metis["tool_calls"]
    assert call["name"] == "calculator" and call["arguments"] == {"expression": "17 * 23"}
    assert call["observation"] == "391" and call["error"] is None and call["seconds"] >= 0
    assert metis["answer"] == "391" and metis["turns"] == 2 and metis["finish_reason"] == "answer"
    usage = reply.usage
    assert usage.model_extra["tool_calls"] == 1 and usage.model_extra["tool_tokens"] > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= 2 * LIMITS.max_tokens


def test_a_streamed_completion_adds_up_to_the_same_reply_with_the_tool_call_before_the_answer(client):
    chunks = list(ask(client, "What is 17 * 23?", stream=True, stream_options={"include_usage": True}))
    texts = [(i, c.choices[0].delta.content) for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content]
    tool_events = [i for i, c in enumerate(chunks) if (c.model_extra.get("metis") or {}).get("tool_call")]
    assert "".join(text for _, text in texts) == "<answer>391</answer>"
    assert len(texts) >= 3, "the answer should arrive token by token, not in one piece"
    assert len(tool_events) == 1 and tool_events[0] < texts[0][0]
    tool_call = chunks[tool_events[0]].model_extra["metis"]["tool_call"]
    assert tool_call["arguments"] == {"expression": "17 * 23"} and tool_call["observation"] == "391"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert finals[0].model_extra["metis"]["tool_calls"] == [tool_call]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_extra["tool_calls"] == 1


def test_a_failing_tool_is_an_observation_not_an_error(client):
    reply = ask(client, "What is 5 / 0?")
    [call] = reply.model_extra["metis"]["tool_calls"]
    assert call["arguments"] == {"expression": "5 / 0"}
    assert call["error"] == "tool_error" and call["observation"].startswith("Error:")
    assert reply.choices[0].message.content is not None


def test_eight_concurrent_requests_are_all_answered_and_share_backend_calls(client, server):
    gated, service = server["gated"], server["service"]
    gated.gate.clear()  # the first turn to arrive holds the model until the other seven are queued
    gated.calls.clear()
    questions = ["What is 17 * 23?"] * 4 + ["What is 5 / 0?"] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(ask, client, question) for question in questions]
        deadline = time.monotonic() + 30
        while (service.in_flight < 8 or len(service.batcher._queue) < 7) and time.monotonic() < deadline:
            time.sleep(0.01)
        gated.gate.set()
        replies = [future.result(timeout=120) for future in futures]
    contents = [reply.choices[0].message.content for reply in replies]
    assert contents[:4] == ["<answer>391</answer>"] * 4
    assert all(len(reply.model_extra["metis"]["tool_calls"]) == 1 for reply in replies)
    # The first call takes what had arrived (usually 1 request, 2 when two arrive together under load);
    # everything queued while it held the model runs as the second call.
    assert len(gated.calls) >= 2 and sum(gated.calls[:2]) == 8, \
        f"the queued turns should run as one backend call: {gated.calls}"


def test_a_client_that_leaves_a_stream_stops_its_request(server):
    gated, service = server["gated"], server["service"]
    gated.gate.clear()
    gated.calls.clear()
    body = {"model": MODEL_ID, "stream": True, "messages": [{"role": "user", "content": "What is 17 * 23?"}]}
    with httpx.stream("POST", server["base_url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert next(response.iter_lines()).startswith("data: ")  # the role chunk; then the client hangs up
    gated.gate.set()
    deadline = time.monotonic() + 30
    while service.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.in_flight == 0
    assert len(gated.calls) <= 1, "the answer's turn after the tool call should not have run"


def test_models_and_health(client, server):
    assert [model.id for model in client.models.list()] == [MODEL_ID]
    health = httpx.get(server["base_url"] + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == MODEL_ID


# ------------------------------------------------------------------------------ bad requests
def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(client, server):
    url = server["base_url"] + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    malformed = httpx.post(url, content=b'{"model": "metis-test", "messages": [', headers=headers)
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"

    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.code == "model_not_found" and "metis-test" in unknown.value.message

    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "tool", "content": "42"}])
    assert role.value.code == "invalid_role" and role.value.body["param"] == "messages[0].role"

    with pytest.raises(openai.BadRequestError) as long_input:
        ask(client, "What is 1 + 1? " * 400)
    assert long_input.value.code == "context_length_exceeded" and "512" in long_input.value.message

    with pytest.raises(openai.BadRequestError) as temperature:
        ask(client, "What is 17 * 23?", temperature=5)
    assert temperature.value.body["param"] == "temperature"

    for key in ("wrong-key", None):
        bare = httpx.post(url, json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]},
                          headers={"Authorization": f"Bearer {key}"} if key else {})
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base_url"] + "/v1", api_key="wrong", max_retries=0).models.list()

    missing = httpx.get(server["base_url"] + "/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()

    server["gated"].fail_next = True
    with pytest.raises(openai.InternalServerError) as broken:
        ask(client, "What is 17 * 23?")
    assert "backend broke" in broken.value.message and broken.value.body["type"] == "server_error"

    assert ask(client, "What is 17 * 23?").choices[0].message.content == "<answer>391</answer>"


def test_max_tokens_caps_each_turn(client):
    reply = ask(client, "What is 17 * 23?", max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2
    assert reply.model_extra["metis"]["tool_calls"] == []  # the call was cut off before </tool_call>


# ------------------------------------------------------------------------------ the wire format
def parse(payload: dict):
    return parse_chat_request(json.dumps(payload).encode(), model_id=MODEL_ID, limits=LIMITS)


def test_request_checks():
    request = parse({"model": MODEL_ID, "max_tokens": 10_000, "temperature": 0.7, "messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]}]})
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert request.max_tokens == LIMITS.max_tokens and request.temperature == 0.7 and not request.stream
    bad = [
        ({"model": MODEL_ID, "messages": []}, "messages"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         "messages[1].role"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "a"}], "n": 2}, "n"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "a"}], "top_p": 0}, "top_p"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, "max_tokens"),
    ]
    for payload, param in bad:
        with pytest.raises(BadRequest) as refused:
            parse(payload)
        assert refused.value.param == param and refused.value.body()["error"]["type"] == "invalid_request_error"


def test_visible_text_hides_tool_calls_and_holds_back_what_may_start_one():
    assert visible_text('Let me check. <tool_call>{"name"', finished=False) == "Let me check. "
    assert visible_text("Let me check. <tool", finished=False) == "Let me check. "
    assert visible_text("Let me check. <tool", finished=True) == "Let me check. <tool"
    assert visible_text("caf\ufffd", finished=False) == "caf"
    assert reply_text(['<tool_call>{"name": "calculator"}</tool_call>', "<answer>4</answer>"]) == "<answer>4</answer>"


# ------------------------------------------------------------------------------ the command
def test_metis_serve_starts_and_answers_health(tool_model, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "METIS_TEST_KEY": API_KEY}
    process = subprocess.Popen([sys.executable, "-m", "metis_cli", "serve", "--model", str(tool_model), "--port",
                                str(port), "--api-key-env", "METIS_TEST_KEY"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None and health["model"] == str(tool_model), process.stdout.read() if process.poll() else ""
        reply = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0).chat.completions \
            .create(model=str(tool_model), messages=[{"role": "user", "content": "What is 17 * 23?"}])
        assert reply.model_extra["metis"]["tool_calls"][0]["observation"] == "391"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_metis_serve_refuses_an_unset_key_variable(tool_model):
    from typer.testing import CliRunner

    from metis_cli.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tool_model), "--api-key-env", "METIS_NO_SUCH_VARIABLE"])
    assert result.exit_code == 2 and "METIS_NO_SUCH_VARIABLE" in result.output
