"""Faults outside metis stop a run loudly and resumably, and nothing is trained on nothing: a judge
(a real OpenAI-compatible server, FastAPI on uvicorn, started here) that is down at the start, dies
mid-run or stops giving verdicts; a web search API that fails every call; a full disk or a
read-only folder while writing (docs/faults.md)."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.errors import EndpointError, StorageError
from metis_cli.files import append_whole, write_atomic
from metis_cli.recipe import load_recipe
from metis_cli.stages.hdpo_guard import FaultGuard, JudgeFigures

REPO = Path(__file__).resolve().parents[1]
JUDGED = re.compile(r"Gold answer:\n(.*?)\n\nPredicted answer:\n(.*?)\n\n", re.S)


# ------------------------------------------------------------------------------ the judge
class JudgeServer:
    """An OpenAI-compatible judge on 127.0.0.1:`port`: GET /v1/models lists "judge"; POST
    /v1/chat/completions says yes when the predicted answer equals the gold one, no otherwise
    (`verdicts=False`: it rambles instead); POST /search answers like a Serper search API. With
    `api_key`, every route wants `Authorization: Bearer <key>` (or `X-API-KEY` for /search).
    `stop()` really stops it (connections are refused); `start()` brings it back on the same port."""

    def __init__(self, api_key: str | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.api_key, self.verdicts, self.judged = api_key, True, 0
        self.server = self.thread = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _app(self) -> FastAPI:
        api = FastAPI()

        def refused(request: Request, header: str = "authorization", prefix: str = "Bearer ") -> bool:
            return self.api_key is not None and request.headers.get(header) != f"{prefix}{self.api_key}"

        @api.get("/v1/models")
        def models(request: Request):
            if refused(request):
                return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
            return {"object": "list", "data": [{"id": "judge", "object": "model", "owned_by": "test"}]}

        @api.post("/v1/chat/completions")
        async def chat(request: Request):
            if refused(request):
                return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
            body = await request.json()
            gold, predicted = JUDGED.search(body["messages"][-1]["content"]).groups()
            self.judged += 1
            reply = ("yes" if predicted.strip() == gold.strip() else "no") if self.verdicts else "It depends."
            return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}]}

        @api.post("/search")
        async def search(request: Request):
            if refused(request, "x-api-key", ""):
                return JSONResponse({"message": "Unauthorized"}, status_code=403)
            return {"organic": [{"title": "A", "link": "https://a.example", "snippet": "a"}]}

        return api

    def start(self) -> JudgeServer:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self._app(), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the judge server did not start"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def judge():
    server = JudgeServer().start()
    yield server
    if server.thread.is_alive():
        server.stop()


@pytest.fixture(autouse=True)
def no_real_keys(monkeypatch):
    for name in ("OPENAI_API_KEY", "SERPER_API_KEY", "JUDGE_KEY"):
        monkeypatch.delenv(name, raising=False)


def judge_overrides(url: str) -> list[str]:
    return ["reward.checker=judge",
            f'reward.judge={{base_url: "{url}", model: judge, max_retries: 0, backoff_s: 0, timeout_s: 5}}',
            "hdpo.unscored_retries=0"]


# ------------------------------------------------------------------------ preflight, fast
def test_preflight_accepts_a_live_judge_and_names_field_and_url_of_each_problem(monkeypatch):
    server = JudgeServer(api_key="secret").start()
    try:
        def problem(*overrides: str) -> str:
            recipe = load_recipe("recipes/tiny.yaml", list(overrides))
            with pytest.raises(EndpointError) as raised:
                from metis_cli.rewards.preflight import preflight

                preflight(recipe, "hdpo")
            return str(raised.value)

        base = judge_overrides(server.base_url)
        unset = problem(*base)
        assert unset.startswith("reward.judge.api_key_env:") and server.base_url in unset
        assert "OPENAI_API_KEY is unset" in unset
        monkeypatch.setenv("JUDGE_KEY", "secret")
        keyed = [*base, "reward.judge.api_key_env=JUDGE_KEY"]
        from metis_cli.rewards.preflight import preflight

        preflight(load_recipe("recipes/tiny.yaml", keyed), "hdpo")  # up, key accepted, model listed
        wrong_model = problem(*keyed, "reward.judge.model=gpt-judge")
        assert wrong_model.startswith("reward.judge.model:") and "'gpt-judge'" in wrong_model
        assert "it serves: judge" in wrong_model
        no_v1 = problem(*keyed, f"reward.judge.base_url=http://127.0.0.1:{server.port}")
        assert no_v1.startswith("reward.judge.base_url:") and "usually ends in /v1" in no_v1
        search = ["tools.enabled=[calculator, search]", "tools.search.backend=http",
                  f"tools.search.http.url=http://127.0.0.1:{server.port}/search"]
        refused = problem(*keyed, *search)
        assert refused.startswith("tools.search.http.api_key_env:") and "SERPER_API_KEY is unset" in refused
        monkeypatch.setenv("SERPER_API_KEY", "secret")
        preflight(load_recipe("recipes/tiny.yaml", [*keyed, *search]), "hdpo")
        assert server.judged == 0, "the preflight must not ask the judge to judge"
    finally:
        server.stop()
    both = problem(*keyed, *search)
    assert both.startswith("2 endpoints are not usable")
    assert "reward.judge.base_url: cannot reach the judge" in both and "tools.search.http.url: cannot reach" in both


def _forbid_model_loading(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded or built before the endpoint check")

    for name in ("load_model", "load_policy", "load_tokenizer", "ensure_base_model"):
        monkeypatch.setattr(f"metis_cli.model.loading.{name}", loaded)
    monkeypatch.setattr("metis_cli.model.tiny.build_tiny_model", loaded)


@pytest.mark.parametrize("command", ["hdpo", "eval", "curate", "run"])
def test_judge_down_at_start_exits_2_before_any_model_loads(command, tmp_path, tiny_model_dir, monkeypatch):
    os.chdir(REPO)
    url = JudgeServer().base_url  # nothing listens there
    _forbid_model_loading(monkeypatch)
    overrides = [f"run.output_dir={tmp_path / 'run'}", "run.threads=1", *judge_overrides(url),
                 f"hdpo.init_from={tiny_model_dir}"]
    extra = {"eval": ["--model", str(tiny_model_dir)], "curate": []}.get(command, [])
    if command == "curate":
        overrides.append(f'curate.filters.judge={{enabled: true, base_url: "{url}", model: judge}}')
    started = time.monotonic()
    result = CliRunner().invoke(app, [command, "recipes/tiny.yaml", *extra,
                                      *[a for o in overrides for a in ("--set", o)]])
    elapsed_s = time.monotonic() - started
    assert result.exit_code == 2, result.output
    field = "curate.filters.judge" if command == "curate" else "reward.judge"
    assert f"{field}.base_url: cannot reach the judge at {url}" in " ".join(result.output.split())
    assert "bug in metis" not in result.output
    assert elapsed_s < 10
    assert not (tmp_path / "run").exists(), "a run folder (or the tiny base model) was made before the check"


# ----------------------------------------------------------------------- guard, pure rules
def _scores(verdicts: list) -> list:
    """RolloutScore-likes: True/False/None verdicts; "failed" = scored wrong because the judge failed;
    "no answer" = nothing was sent to the judge."""
    return [SimpleNamespace(answer=None if v == "no answer" else "7", correct=None if v is None else v is True,
                            scoring_failed=v == "failed") for v in verdicts]


def test_guard_stops_at_once_when_nothing_gets_a_verdict_and_after_patience_when_most_do_not():
    guard = FaultGuard(judge_url="http://judge/v1", max_unscored_share=0.5, patience=2)
    assert guard.observe(JudgeFigures.of(_scores([True, False, "no answer"]))) is None
    assert guard.observe(JudgeFigures.of(_scores(["no answer"] * 4))) is None  # the judge was not asked
    everything = guard.observe(JudgeFigures.of(_scores([None, "failed", "no answer"])))
    assert everything and "http://judge/v1" in everything and "any of the step's 2 answers" in everything

    guard = FaultGuard(judge_url="http://judge/v1", max_unscored_share=0.5, patience=2)
    mostly = _scores([None, None, True])  # 67% without a verdict
    assert guard.observe(JudgeFigures.of(mostly)) is None
    assert guard.observe(JudgeFigures.of(_scores([None, True]))) is None  # 50% is not over: the count restarts
    assert guard.observe(JudgeFigures.of(mostly)) is None
    reason = guard.observe(JudgeFigures.of(mostly))
    assert reason and "67%" in reason and "reward.judge.max_unscored_share (0.5)" in reason


def test_a_search_api_that_fails_every_call_stops_the_run(tmp_path):
    import asyncio

    from metis_cli.agent.tools.search import WebSearchTool

    server = JudgeServer().start()
    tool = WebSearchTool(f"http://127.0.0.1:{server.port}/search", retries=0, timeout_s=5, cache_dir=None)
    guard = FaultGuard(services=[tool.service])
    guard.begin_step()
    assert asyncio.run(tool.call({"query": "a"})).ok
    assert guard.observe(JudgeFigures(0, 0)) is None
    server.stop()
    guard.begin_step()
    assert guard.observe(JudgeFigures(0, 0)) is None  # no call this step: nothing to judge by
    failed = asyncio.run(tool.call({"query": "b"}))
    assert not failed.ok and "unreachable" in failed.text
    reason = guard.observe(JudgeFigures(0, 0))
    assert reason and f"127.0.0.1:{server.port}/search (tools.search.http) failed all 1 requests" in reason


def test_the_dashboard_shows_an_unknown_accuracy_as_unknown_not_stale_or_zero():
    from metis_cli.telemetry.history import MetricsHistory
    from metis_cli.tui.charts import format_value

    history = MetricsHistory()
    history.add([{"stage": "hdpo", "step": 1, "accuracy": 0.5}, {"stage": "hdpo", "step": 2, "accuracy": None}])
    assert history.latest_number("accuracy") is None and format_value(history.latest_number("accuracy")) == "–"
    assert history.series("accuracy") == ([1.0], [0.5])  # no point drawn at 0 for step 2


# --------------------------------------------------------------------------------- storage
def test_a_storage_error_names_the_path_and_what_to_do():
    assert str(StorageError(errno.ENOSPC, "runs/x/checkpoints/step_000002")) == (
        "no space left on device writing runs/x/checkpoints/step_000002; free space, then --resume")
    assert str(StorageError(errno.EACCES, "runs/x/metrics.jsonl")).startswith(
        "permission denied writing runs/x/metrics.jsonl; make that folder writable")
    assert "read-only file system writing a; the file system is read-only" in str(StorageError(errno.EROFS, "a"))
    assert isinstance(StorageError(errno.ENOSPC, "a"), OSError)  # callers that tolerate OSError still do


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_leaves_no_partial_file_and_no_half_line(tiny_disk):
    metrics = tiny_disk / "metrics.jsonl"
    line = json.dumps({"step": 1, "pad": "x" * 9000}) + "\n"
    with pytest.raises(StorageError) as raised:
        for _ in range(20):
            append_whole(metrics, line)
    assert str(raised.value).startswith(f"no space left on device writing {metrics}; free space")
    assert metrics.read_text().count("\n") == len(metrics.read_text().splitlines())
    assert all(json.loads(row)["step"] == 1 for row in metrics.read_text().splitlines())  # whole lines only
    with pytest.raises(StorageError):
        write_atomic(tiny_disk / "report.json", "y" * 200_000)
    assert not (tiny_disk / "report.json").exists()
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["metrics.jsonl"]  # no .partial left


def test_ctrl_c_during_fsync_keeps_a_whole_append_and_an_fsync_error_cuts_it_back(tmp_path, monkeypatch):
    path = tmp_path / "decisions.jsonl"
    path.write_text('{"a": 1}\n')

    def interrupted(_fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        append_whole(path, '{"b": 2}\n', fsync=True)
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'  # a reader may already have seen it: it stays

    def failed(_fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failed)
    with pytest.raises(StorageError):
        append_whole(path, '{"c": 3}\n', fsync=True)
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'  # not known to be stored: cut back


def test_a_read_only_run_folder_is_a_clear_exit_2(tmp_path, tiny_model_dir):
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        os.chdir(REPO)
        result = CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", "--set", f"run.output_dir={folder / 'run'}",
                                          "--set", f"hdpo.init_from={tiny_model_dir}"])
    finally:
        subprocess.run(["umount", str(folder)], check=False)
    assert result.exit_code == 2, result.output
    assert f"read-only file system writing {folder / 'run'}" in " ".join(result.output.split())
    assert "bug in metis" not in result.output


# ------------------------------------------------------------- real runs on the tiny model
ANSWERING = {"data.synthetic.knowledge_examples": "600", "data.synthetic.cold_start_examples": "600",
             "sft.save_every": "1000", "sft.eval_every": "1000"}
"""Enough sft (~20 s) that about half the rollouts end in an <answer>, the ones the judge is asked
about; test_training's smaller sft gives almost none."""


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from test_training import cli, small_overrides

    run_dir = tmp_path_factory.mktemp("faults")
    os.chdir(REPO)
    result = CliRunner().invoke(app, ["sft", "recipes/tiny.yaml", "--quiet",
                                      *cli(small_overrides(run_dir, **ANSWERING))])
    assert result.exit_code == 0, result.output
    return run_dir


def hdpo(run_dir: Path, stage: Path, *args: str, **settings: str):
    from test_training import cli, small_overrides

    overrides = small_overrides(run_dir, **{**ANSWERING, "hdpo.output": str(stage), **settings})
    return CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", "--quiet", *args, *cli(overrides)])


def records(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]



@pytest.mark.slow
def test_judge_up_scores_then_dead_mid_run_stops_with_a_checkpoint_and_resumes(sft_run, tmp_path, judge,
                                                                               monkeypatch):
    from metis_cli.telemetry.run import MetricsLog

    stage = tmp_path / "hdpo"
    settings = {"hdpo.steps": "3", "hdpo.save_every": "100", "hdpo.eval_every": "100"}
    judged = judge_overrides(judge.base_url)
    appended = MetricsLog.append

    def append_then_kill_the_judge(log, record):
        appended(log, record)
        if record.get("step") == 1:
            judge.stop()

    monkeypatch.setattr(MetricsLog, "append", append_then_kill_the_judge)
    stopped = hdpo(sft_run, stage, *[a for o in judged for a in ("--set", o)], **settings)
    assert stopped.exit_code == 2, stopped.output
    message = " ".join(stopped.output.split())
    assert "hdpo stopped at step 2/3" in message and judge.base_url in message and "--resume" in message
    assert "Step 2 was not trained" in message and "bug in metis" not in message
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["step_000001"]  # written at the stop
    assert not (stage / "DONE.json").exists()
    logged = records(stage)
    assert [r["step"] for r in logged] == [0, 1]
    assert logged[1]["unscored"] == 0 and logged[1]["accuracy"] is not None  # while up: scored
    assert judge.judged > 0

    monkeypatch.setattr(MetricsLog, "append", appended)
    judge.start()
    resumed = hdpo(sft_run, stage, "--resume", *[a for o in judged for a in ("--set", o)], **settings)
    assert resumed.exit_code == 0, resumed.output
    logged = records(stage)
    assert [r["step"] for r in logged] == [0, 1, 2, 3]
    assert all(r["unscored"] == 0 and r["rollouts_trained"] > 0 for r in logged[2:])
    assert (stage / "DONE.json").exists()


@pytest.mark.slow
def test_a_judge_without_verdicts_stops_before_training_and_logs_null_not_zero(sft_run, tmp_path, judge):
    judge.verdicts = False
    stage = tmp_path / "hdpo"
    result = hdpo(sft_run, stage, *[a for o in judge_overrides(judge.base_url) for a in ("--set", o)])
    assert result.exit_code == 2, result.output
    assert "nothing was trained yet" in " ".join(result.output.split())
    assert not (stage / "checkpoints").exists()
    (step_zero,) = records(stage)
    accuracies = {key: value for key, value in step_zero.items() if key.endswith("/accuracy")}
    assert accuracies and all(value is None for value in accuracies.values()), accuracies  # null, not 0.0


@pytest.mark.slow
def test_eval_with_a_subset_nobody_scored_says_so_and_exits_2_unless_allowed(sft_run, tmp_path, judge):
    judge.verdicts = False
    args = ["eval", "recipes/tiny.yaml", "--model", str(sft_run / "sft" / "final"),
            *[a for o in [*judge_overrides(judge.base_url), f"eval.output={tmp_path / 'eval'}",
                          "eval.max_questions=2", "run.threads=1", f"run.output_dir={sft_run}"]
              for a in ("--set", o)]]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    message = " ".join(refused.output.split())
    assert "could be scored" in message and judge.base_url in message and "--allow-unscored" in message
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| unscored |" in report and "its accuracy is unknown, not 0" in report
    allowed = CliRunner().invoke(app, [*args, "--allow-unscored"])
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_exit_2_with_no_partial_folder_and_resumes(sft_run, tmp_path, monkeypatch):
    import torch

    stage = tmp_path / "hdpo"
    saved = torch.save

    def disk_full_at_step_2(obj, path, *args, **kwargs):
        if "step_000002" in str(path):  # what torch raises when the disk fills up under it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4447552 vs 4447440")
        return saved(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    failed = hdpo(sft_run, stage, **{"hdpo.steps": "2", "hdpo.save_every": "1"})
    assert failed.exit_code == 2, failed.output
    message = " ".join(failed.output.split())
    assert f"no space left on device writing {stage / 'checkpoints' / 'step_000002'}; free space, then --resume" \
        in message
    assert "bug in metis" not in message
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["step_000001"]  # no partial step 2

    monkeypatch.setattr(torch, "save", saved)
    resumed = hdpo(sft_run, stage, "--resume", **{"hdpo.steps": "2", "hdpo.save_every": "1"})
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in records(stage)] == [0, 1, 2] and (stage / "DONE.json").exists()
