"""`metis sweep`: the grid and its bad input (exit 2 before anything runs), a real tiny sweep with
one shared sft stage and a failing variant, resume after a finished and after a killed session,
the report files, `metis eval` and the dashboard opening a sweep folder; and the data of the
mixed task (recipes/tiny-mixed.yaml)."""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.errors import RecipeError
from metis_cli.recipe.grid import expand, parse_grid, resolve_seeds, split_values

runner = CliRunner()
SMALL = {  # a sweep of the tiny recipe in seconds (tests/test_training.py's sizes)
    "run.threads": "1", "data.synthetic.knowledge_examples": "64", "data.synthetic.cold_start_examples": "64",
    "data.synthetic.rl_prompts": "16", "data.synthetic.eval_per_subset": "4", "sft.phases.0.epochs": "1",
    "sft.phases.1.epochs": "1", "sft.batch_size": "32", "hdpo.steps": "2", "hdpo.prompts_per_step": "4",
    "hdpo.group_size": "4", "hdpo.micro_batch_size": "8", "hdpo.eval_every": "1", "hdpo.save_every": "1",
    "rollout.max_new_tokens": "16", "rollout.max_total_tokens": "96",
}
GRID = ["hdpo.estimator=hdpo,coupled", "hdpo.init_from=${sft.output}/final,/nonexistent/model"]


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def small(**extra: str) -> list[str]:
    return [f"{key}={value}" for key, value in {**SMALL, **extra}.items()]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------- the grid
def test_values_split_at_top_level_commas_only():
    assert split_values("0.1, 0.15,0.2") == ["0.1", "0.15", "0.2"]
    assert split_values("[calculator, python],[python]") == ["[calculator, python]", "[python]"]
    assert split_values('"a,b",c') == ['"a,b"', "c"]


def test_grid_is_the_cartesian_product_with_fixed_overrides_kept_apart():
    fixed, axes = parse_grid(["hdpo.w_tool=0.1,0.2", "hdpo.steps=3", "hdpo.estimator=hdpo,coupled"])
    assert fixed == ["hdpo.steps=3"]
    variants = expand(axes)
    assert [v.name for v in variants] == ["w_tool=0.1 estimator=hdpo", "w_tool=0.1 estimator=coupled",
                                          "w_tool=0.2 estimator=hdpo", "w_tool=0.2 estimator=coupled"]
    assert variants[1].overrides == ("hdpo.w_tool=0.1", "hdpo.estimator=coupled")
    assert len({v.slug for v in variants}) == 4 and all(re.fullmatch(r"[\w.-]+", v.slug) for v in variants)
    # the same leaf name in two sections is told apart by its whole path
    _, axes = parse_grid(["hdpo.coupled.coef=0.1,0.5", "other.coef=1,2"])
    assert expand(axes)[0].name == "hdpo.coupled.coef=0.1 other.coef=1"
    assert [v.name for v in expand([])] == ["recipe"]


def test_explicit_variants_are_crossed_with_the_axes():
    from metis_cli.recipe.grid import parse_variant_sets

    fixed, axes = parse_grid(["run.threads=1", "hdpo.w_tool=0.1,0.2"])
    points = parse_variant_sets(["hdpo.estimator=hdpo", "hdpo.estimator=coupled  hdpo.coupled.coef=0.5"], axes)
    names = [v.name for v in expand(axes, points)]
    assert names == ["estimator=hdpo w_tool=0.1", "estimator=hdpo w_tool=0.2",
                     "estimator=coupled coef=0.5 w_tool=0.1", "estimator=coupled coef=0.5 w_tool=0.2"]
    for bad in (["hdpo.w_tool=0.3"], [" "], ["hdpo.lr=1 hdpo.lr=2"], ["run.output_dir=x"], ["hdpo.lr=1", "hdpo.lr=1"]):
        with pytest.raises(RecipeError):
            parse_variant_sets(bad, axes)


def test_seeds():
    assert resolve_seeds(3, None, default=7) == [0, 1, 2]
    assert resolve_seeds(None, "4, 9", default=7) == [4, 9]
    assert resolve_seeds(None, None, default=7) == [7]
    for seeds, seed_list in ((2, "1"), (None, "1,x"), (None, "1,1")):
        with pytest.raises(RecipeError):
            resolve_seeds(seeds, seed_list, default=0)


@pytest.mark.parametrize("grid, expected", [
    (["hdpo.wtool=0.1,0.2"], ["hdpo.wtool: unknown key 'wtool' (did you mean 'w_tool'?)", "--set hdpo.wtool=0.2"]),
    (["hdpo.w_tool="], ["hdpo.w_tool: empty value list"]),
    (["hdpo.w_tool=0.1,,0.2"], ["hdpo.w_tool: empty value", "0.1,,0.2"]),
    (["hdpo.w_tool=0.1,-1"], ["hdpo.w_tool: must be >= 0", "got -1", "--set hdpo.w_tool=-1"]),
    (["hdpo.estimator=hdpo,bogus"], ["hdpo.estimator: must be one of", "'bogus'"]),
    (["hdpo.w_tool=0.1,0.10"], ["hdpo.w_tool: lists '0.1' and '0.10', the same value"]),
    (["run.seed=1,2"], ["run.seed: set by metis sweep itself", "--seeds"]),
    (["hdpo.w_tool=0.1", "hdpo.w_tool=0.2"], ["hdpo.w_tool: given twice"]),
], ids=["unknown-field", "empty-list", "empty-value", "bad-value", "bad-choice", "same-value", "reserved", "twice"])
def test_bad_input_stops_before_anything_runs(tmp_path, grid, expected):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "recipes/tiny.yaml", *sets(grid), "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for part in expected:
        assert part in text, text
    assert "Traceback" not in result.output and not out.exists()


def test_every_bad_value_is_named_at_once(tmp_path):
    result = runner.invoke(app, ["sweep", "recipes/tiny.yaml", *sets(["hdpo.w_tool=-1,0.1", "hdpo.estimator=x,hdpo"]),
                                 "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "2 problems" in result.output
    assert "hdpo.w_tool" in result.output and "hdpo.estimator" in result.output


def test_summary_averages_finished_seeds_only():
    from metis_cli.evaluation.sweep_report import summarize

    def run(seed, status, accuracy, tools=0.5):
        final = {"easy": {"accuracy": accuracy, "tool_call_ratio": tools}} if status == "done" else {}
        return {"variant": "a", "name": "w=1", "seed": seed, "status": status, "sft_group": "g", "final": final,
                "start": {"easy": {"accuracy": 1.0, "tool_call_ratio": 1.0}}}

    summary = summarize({"runs": [run(0, "done", 0.9), run(1, "done", 0.6, 0.1), run(2, "failed", 0.0)]})
    (row,) = summary["variants"]
    assert (row["runs"], row["done"], row["failed"], row["seeds"]) == (3, 2, 1, [0, 1])
    accuracy = row["subsets"]["easy"]["accuracy"]
    assert accuracy["mean"] == pytest.approx(0.75) and (accuracy["min"], accuracy["max"], accuracy["n"]) == (0.6, 0.9, 2)
    assert summary["start"][0]["subsets"]["easy"]["accuracy"]["mean"] == 1.0 and summary["start"][0]["done"] == 2


def test_report_names_the_variants_of_a_variant_list():
    from metis_cli.evaluation.sweep_report import markdown, summarize

    runs = [{"variant": slug, "name": name, "seed": 0, "status": "pending", "sft_group": "g", "final": {},
             "start": {}} for slug, name in (("a", "estimator=hdpo"), ("b", "estimator=coupled coef=0.5"))]
    plan = {"recipe": "r.yaml", "axes": {}, "fixed": [], "seeds": [0],
            "variants": [{"name": r["name"], "slug": r["variant"], "overrides": []} for r in runs]}
    text = markdown({"plan": plan, "runs": runs, "summary": summarize({"runs": runs})})
    assert "Variants (2): estimator=hdpo; estimator=coupled coef=0.5" in text and "none (one variant)" not in text
    plan.update(variants=plan["variants"][:1])
    assert "Grid: none (one variant)" in markdown({"plan": plan, "runs": runs[:1], "summary": summarize({"runs": runs[:1]})})


# ---------------------------------------------------------------------------- a real tiny sweep
@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """2 x 2 grid, one seed: two variants train for real (sharing one sft stage), two fail."""
    out = tmp_path_factory.mktemp("sweep") / "tiny-sweep"
    argv = ["sweep", "recipes/tiny.yaml", *sets(small() + GRID), "--out", str(out)]
    result = runner.invoke(app, argv)
    return out, argv, result


@pytest.mark.slow
def test_sweep_trains_each_variant_on_one_shared_sft_stage(swept):
    out, _, result = swept
    sweep = json.loads((out / "sweep.json").read_text())
    by_name = {r["name"]: r for r in sweep["runs"]}
    done = [by_name[f"estimator={name} init_from=${{sft.output}}/final"] for name in ("hdpo", "coupled")]
    assert [r["status"] for r in done] == ["done", "done"], result.output
    assert [p.name for p in (out / "sft").iterdir()] == [Path(done[0]["sft_dir"]).name]  # trained once
    assert result.output.count("sft: already finished") == 3  # the other three runs reused it
    for entry in done:
        recipe = (out / entry["run_dir"] / "recipe.yaml").read_text()
        assert f"init_from: {out / entry['sft_dir'] / 'sft' / 'final'}" in recipe
        records = read_metrics(out / entry["run_dir"] / "hdpo" / "metrics.jsonl")
        assert records[-1]["estimator"] == entry["overrides"][0].split("=")[1]
        last = records[-1]
        assert entry["final_step"] == 2
        assert entry["final"]["hard"]["tool_call_ratio"] == last["eval/hard/tool_call_ratio"]
        assert entry["final"]["easy"]["accuracy"] == last["eval/easy/accuracy"]
        assert entry["start"]["easy"]["accuracy"] == records[0]["eval/easy/accuracy"]


@pytest.mark.slow
def test_a_failed_variant_is_recorded_and_the_others_still_run(swept):
    out, _, result = swept
    assert result.exit_code == 2  # user errors only
    assert "2 of 4 runs failed" in " ".join(result.output.split())
    sweep = json.loads((out / "sweep.json").read_text())
    failed = [r for r in sweep["runs"] if r["status"] == "failed"]
    assert len(failed) == 2 and all("/nonexistent/model" in r["error"] for r in failed)
    assert sweep["runs"][-1]["status"] == "failed" and sweep["runs"][2]["status"] == "done"  # ran after a failure
    report = (out / "report.md").read_text()
    assert "## Failed runs" in report and "0/1, 1 failed" in report and "model folder not found" in report


@pytest.mark.slow
def test_report_table_json_and_plots(swept):
    out, _, _ = swept
    sweep = json.loads((out / "sweep.json").read_text())
    rows = {row["name"]: row for row in sweep["summary"]["variants"]}
    hdpo_row = rows["estimator=hdpo init_from=${sft.output}/final"]
    run = next(r for r in sweep["runs"] if r["name"] == hdpo_row["name"])
    assert hdpo_row["subsets"]["hard"]["accuracy"]["mean"] == run["final"]["hard"]["accuracy"]
    assert sweep["summary"]["subsets"] == ["easy", "hard"]
    report = (out / "report.md").read_text()
    assert "| variant | runs | subset | accuracy | tool-call ratio |" in report
    assert "| start (SFT model) |" in report and "| estimator=coupled init_from=${sft.output}/final | 1/1 | easy |" in report
    for name in ("pareto.png", "efficiency_group_share.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000


@pytest.mark.slow
def test_resume_skips_finished_runs_and_retries_failed_ones(swept):
    out, argv, _ = swept
    refused = runner.invoke(app, argv)
    assert refused.exit_code == 2 and "--resume" in refused.output
    other_plan = runner.invoke(app, [*argv[:2], *sets(small(**{"hdpo.steps": "3"}) + GRID), "--out", str(out), "--resume"])
    assert other_plan.exit_code == 2 and "another plan" in other_plan.output
    done_metrics = sorted(out.glob("runs/*final/seed-0/hdpo/metrics.jsonl"))
    before = [path.read_bytes() for path in done_metrics]
    resumed = runner.invoke(app, [*argv, "--resume"])
    assert resumed.exit_code == 2  # the two bad variants fail again
    assert resumed.output.count("finished; skipped") == 2 and resumed.output.count("starting") == 2
    assert [path.read_bytes() for path in done_metrics] == before  # not trained again


@pytest.mark.slow
def test_eval_and_the_dashboard_open_a_sweep_folder(swept):
    out, _, _ = swept
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.output
    assert "start (SFT model)" in result.output and "estimator=coupled" in result.output
    as_json = runner.invoke(app, ["eval", str(out), "--json"])
    assert json.loads(as_json.output)["summary"]["subsets"] == ["easy", "hard"]
    assert runner.invoke(app, ["eval", str(out), "--model", "x"]).exit_code == 2

    import asyncio

    from rich.console import Console
    from textual.widgets import Static

    from metis_cli.tui.app import Dashboard

    async def look() -> tuple[str, str]:
        dashboard = Dashboard(run_dir=out)
        async with dashboard.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            console = Console(width=160, record=True, file=open(os.devnull, "w"))
            console.print(dashboard.query_one("#sweep-runs", Static).content)
            return str(dashboard.query_one("#status", Static).render()), console.export_text()

    status, listing = asyncio.run(look())
    assert "2/4 runs done" in status and "2 failed" in status
    assert "estimator=coupled init_from=${sft.output}/final" in listing and "model folder not found" in listing


@pytest.mark.slow
def test_a_killed_sweep_resumes_the_run_it_was_in(tmp_path, kill_mid_run):
    out = tmp_path / "killed"
    grid = small(**{"hdpo.steps": "6", "hdpo.eval_every": "100"}) + ["hdpo.estimator=hdpo,grpo"]
    command = [sys.executable, "-m", "metis_cli", "sweep", "recipes/tiny.yaml", "--quiet", *sets(grid), "--out", str(out)]
    metrics = out / "runs" / "estimator-hdpo" / "seed-0" / "hdpo" / "metrics.jsonl"
    kill_mid_run(command, metrics, step=2)
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["status"] == "running"
    resumed = runner.invoke(app, ["sweep", "recipes/tiny.yaml", *sets(grid), "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "estimator=hdpo, seed 0: resuming" in resumed.output and "hdpo: resumed from" in resumed.output
    assert [r["step"] for r in read_metrics(metrics) if r["step"] > 0] == list(range(1, 7))
    assert [r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == ["done", "done"]


# ---------------------------------------------------------------------------------- mixed task
def test_the_mixed_task_makes_easy_answers_half_known_with_and_without_the_tool():
    """Sampled from the SFT data's own answer distribution, most groups of G = 8 are mixed for
    easy questions with and without the tool and for hard ones with it, while every question's
    most frequent answer is still the right one (greedy stays right); tiny.yaml is unchanged."""
    from metis_cli.data.sources import synthetic_rows
    from metis_cli.recipe import load_recipe

    def answer(row):
        return re.fullmatch(r"<answer>(.*)</answer>", row["messages"][-1]["content"]).group(1)

    def right_share(rows):
        return statistics.fmean(answer(row) == row["answer"] for row in rows)

    def mixed_group_chance(p, group=8):
        return 1 - p ** group - (1 - p) ** group

    overrides = ["data.synthetic.cold_start_examples=4000"]
    mixed = load_recipe("recipes/tiny-mixed.yaml", overrides).data.synthetic
    plain = load_recipe("recipes/tiny.yaml", overrides).data.synthetic
    knowledge, cold_start = synthetic_rows("knowledge", mixed), synthetic_rows("cold_start", mixed)
    uses_tool = lambda row: any(message["role"] == "tool" for message in row["messages"])  # noqa: E731
    shares = {
        "easy direct": right_share(knowledge + [r for r in cold_start if r["subset"] == "easy" and not uses_tool(r)]),
        "easy tool": right_share([r for r in cold_start if r["subset"] == "easy" and uses_tool(r)]),
        "hard tool": right_share([r for r in cold_start if r["subset"] == "hard"]),
    }
    for what, share in shares.items():
        assert mixed_group_chance(share) > 0.8, (what, share)
    assert abs(shares["easy direct"] - shares["easy tool"]) < 0.05  # the tool adds nothing on easy questions
    votes = defaultdict(Counter)
    for row in knowledge:
        votes[row["messages"][1]["content"]][answer(row)] += 1
    gold = {row["messages"][1]["content"]: row["answer"] for row in knowledge}
    assert all(counts.most_common(1)[0][0] == gold[question] for question, counts in votes.items())
    # same questions and rows apart from the answers; the plain task's answers stay exact
    plain_knowledge = synthetic_rows("knowledge", plain)
    assert [r["messages"][:2] for r in plain_knowledge] == [r["messages"][:2] for r in knowledge]
    assert right_share(plain_knowledge) == 1.0
    for name in ("rl", "eval"):
        assert synthetic_rows(name, mixed) == synthetic_rows(name, plain)
