"""OpenAIJudge against a real OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from local_http import LocalJSONServer, scripted

from metis_cli.data.datasets import Example
from metis_cli.errors import MetisError
from metis_cli.recipe.schema import RewardConfig
from metis_cli.rewards.batch import build_checker, score_rollouts
from metis_cli.rewards.judge import CONTRACTS, OpenAIJudge, parse_verdict


class ScriptedServer(LocalJSONServer):
    """An OpenAI-compatible /v1/chat/completions endpoint answering from a script of (status,
    reply text) pairs (the last repeats), or from reply_for(request body) -> (status, text)."""

    def __init__(self, script: list[tuple[int, str]], reply_for=None):
        next_reply = scripted(script) if reply_for is None else None

        def respond(request):
            status, text = reply_for(request["body"]) if reply_for is not None else next_reply(request)
            if status != 200:
                return status, {"error": {"message": text, "type": "server_error"}}
            return 200, {
                "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "judge",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        super().__init__(respond, models=["judge", "judge-model"])  # the model names these tests use

    @property
    def base_url(self) -> str:
        return f"{self.address}/v1"


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


def test_parse_verdict_with_other_replies():
    assert parse_verdict("CORRECT", "CORRECT", "INCORRECT") is True
    assert parse_verdict("**Incorrect.**", "CORRECT", "INCORRECT") is False
    assert parse_verdict("correctly so", "CORRECT", "INCORRECT") is None
    assert parse_verdict("yes", "CORRECT", "INCORRECT") is None


# ------------------------------------------------------------- contracts, through the recipe
PROMPT = [{"role": "system", "content": "Tools: python. Answer in <answer></answer>."},
          {"role": "user", "content": "<image>Which city is this?"}]


def example(answer) -> Example:
    return Example(id="q1", messages=PROMPT, answer=answer)


def rollout(answer_text: str) -> SimpleNamespace:
    """What score_rollouts reads of a Rollout."""
    return SimpleNamespace(prompt_index=0, assistant_texts=[answer_text], tool_calls=0)


def reward_cfg(server: ScriptedServer, **judge) -> RewardConfig:
    return RewardConfig(checker="judge", judge={"base_url": server.base_url, "model": "judge-model",
                                                "backoff_s": 0.001, **judge})


def test_official_contract_asks_the_whole_prompt_and_reads_correct_incorrect():
    with ScriptedServer([(200, "CORRECT")]) as server:
        cfg = reward_cfg(server, contract="official")
        judge = OpenAIJudge.from_config(cfg.judge)
        assert judge._client.timeout == 30.0 and judge.max_retries == 1
        [score] = score_rollouts([rollout("<answer>Paris</answer>")], [example("Paris")], build_checker(cfg), cfg)
        assert score.correct is True
        body = server.requests[0]["body"]
        assert body["temperature"] == 0.0
        [message] = body["messages"]  # no system message: the contract is one user turn
        assert message["role"] == "user"
        assert "Tools: python." in message["content"] and "Which city is this?" in message["content"]
        assert "CORRECT or INCORRECT" in message["content"]
    with ScriptedServer([(200, "INCORRECT")]) as server:
        cfg = reward_cfg(server, contract="official")
        [score] = score_rollouts([rollout("<answer>Rome</answer>")], [example("Paris")], build_checker(cfg), cfg)
        assert score.correct is False


def test_metis_contract_is_the_default_and_asks_the_last_user_turn():
    with ScriptedServer([(200, "yes")]) as server:
        cfg = reward_cfg(server)
        score_rollouts([rollout("<answer>Paris</answer>")], [example("Paris")], build_checker(cfg), cfg)
        system, user = server.requests[0]["body"]["messages"]
        assert system["content"] == CONTRACTS["metis"].system_prompt
        assert "Which city is this?" in user["content"] and "Tools: python." not in user["content"]


def test_official_contract_makes_two_attempts():
    with ScriptedServer([(500, "down")]) as server:
        cfg = reward_cfg(server, contract="official")
        [score] = score_rollouts([rollout("<answer>Paris</answer>")], [example("Paris")], build_checker(cfg), cfg)
        assert score.correct is None and len(server.requests) == 2


def test_recipe_prompt_and_replies_override_the_contract():
    with ScriptedServer([(200, "MATCH!")]) as server:
        cfg = reward_cfg(server, contract="official", prompt="Q={question} G={ground_truth} P={prediction}",
                         system_prompt="Be brief.", reply_correct="match", reply_incorrect="differ",
                         question="last_user")
        [score] = score_rollouts([rollout("<answer>Paris</answer>")], [example("Paris")], build_checker(cfg), cfg)
        assert score.correct is True
        system, user = server.requests[0]["body"]["messages"]
        assert system == {"role": "system", "content": "Be brief."}
        assert user["content"] == "Q=<image>Which city is this? G=Paris P=Paris"


@pytest.mark.parametrize(("prompt", "problem"), [
    ("{question} {gold} {prediction}", "bad placeholder"),
    ("{question} {prediction}", "needs the placeholder"),
    ("{ground_truth} {prediction} {", "bad placeholder"),
])
def test_bad_judge_prompt_is_a_recipe_error(prompt, problem):
    with pytest.raises(ValueError, match=problem):
        RewardConfig(checker="judge", judge={"base_url": "http://x/v1", "model": "m", "prompt": prompt})


def test_list_ground_truth_scores_the_best_match_with_the_judge():
    def reply_for(body):
        return 200, "CORRECT" if "Ground truth:\nNew York" in body["messages"][-1]["content"] else "INCORRECT"

    with ScriptedServer([], reply_for=reply_for) as server:
        cfg = reward_cfg(server, contract="official")
        [score] = score_rollouts([rollout("<answer>NYC</answer>")], [example(["Boston", "New York", "LA"])],
                                 build_checker(cfg), cfg)
        assert score.correct is True
        assert len(server.requests) == 2  # stops at the first match


def test_judge_failure_is_unscored_by_default_and_incorrect_on_request():
    rollouts, examples = [rollout("<reason>r</reason><answer>Paris</answer>")], [example("Paris")]
    with ScriptedServer([(500, "down")]) as server:
        cfg = reward_cfg(server, contract="official")
        [score] = score_rollouts(rollouts, examples, build_checker(cfg), cfg)
        assert (score.correct, score.r_acc, score.scoring_failed) == (None, None, False)
        cfg = reward_cfg(server, contract="official", on_failure="incorrect")
        cfg.format = "reason"
        [score] = score_rollouts(rollouts, examples, build_checker(cfg), cfg)
        assert (score.correct, score.r_tool, score.scoring_failed) == (False, 0.0, True)
        assert score.r_acc == pytest.approx(0.1)  # the format reward is still earned
