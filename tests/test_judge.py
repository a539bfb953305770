"""OpenAIJudge against a real OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from metis_cli.errors import MetisError
from metis_cli.rewards.judge import OpenAIJudge, parse_verdict


class ScriptedServer:
    """Answers POST /v1/chat/completions from a script of (status, reply text) pairs.

    The last entry repeats once the script runs out. Every request body is recorded.
    """

    def __init__(self, script: list[tuple[int, str]]):
        self.script = list(script)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"path": self.path, "body": json.loads(body)})
                status, text = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if status == 200:
                    payload = {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                        "model": "judge",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                else:
                    payload = {"error": {"message": text, "type": "server_error"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def judge_for(server: ScriptedServer, max_retries: int = 3) -> OpenAIJudge:
    return OpenAIJudge(server.base_url, "judge-model", max_retries=max_retries,
                       backoff_s=0.001, timeout_s=5.0)


@pytest.mark.parametrize(("reply", "verdict"), [("yes", True), ("Yes.", True), ("**No**", False)])
def test_yes_and_no_replies(reply, verdict):
    with ScriptedServer([(200, reply)]) as server:
        assert judge_for(server).score("What is 2+2?", "4", "4") is verdict
        request = server.requests[0]
        assert request["path"] == "/v1/chat/completions"
        assert request["body"]["model"] == "judge-model"
        prompt = request["body"]["messages"][-1]["content"]
        assert "What is 2+2?" in prompt and "4" in prompt


def test_unparseable_reply_is_unscored_not_wrong():
    with ScriptedServer([(200, "It depends on the interpretation.")]) as server:
        assert judge_for(server).score("q", "a", "b") is None


def test_server_error_is_retried_then_scored():
    with ScriptedServer([(500, "overloaded"), (500, "overloaded"), (200, "yes")]) as server:
        assert judge_for(server).score("q", "a", "a") is True
        assert len(server.requests) == 3


def test_persistent_server_error_is_unscored_after_retries():
    with ScriptedServer([(500, "down")]) as server:
        assert judge_for(server, max_retries=2).score("q", "a", "a") is None
        assert len(server.requests) == 3  # first attempt + 2 retries


def test_unreachable_endpoint_is_unscored():
    with ScriptedServer([(200, "yes")]) as server:
        url = server.base_url
    judge = OpenAIJudge(url, "judge-model", max_retries=1, backoff_s=0.001, timeout_s=2.0)
    assert judge.score("q", "a", "a") is None


def test_rejected_key_is_a_configuration_error_naming_the_variable():
    with ScriptedServer([(401, "invalid api key")]) as server:
        judge = OpenAIJudge(server.base_url, "m", api_key_env="METIS_TEST_JUDGE_KEY",
                            backoff_s=0.001)
        with pytest.raises(MetisError, match="METIS_TEST_JUDGE_KEY"):
            judge.score("q", "a", "a")
        assert len(server.requests) == 1


def test_missing_prediction_is_wrong_without_calling_the_judge():
    with ScriptedServer([(200, "yes")]) as server:
        assert judge_for(server).score("q", None, "a") is False
        assert server.requests == []


def test_parse_verdict():
    assert parse_verdict("YES, it is") is True
    assert parse_verdict("no") is False
    assert parse_verdict("yesterday") is None
    assert parse_verdict(None) is None
