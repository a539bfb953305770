"""`metis run` reuses a finished stage only if it was made from the same recipe inputs: a changed
data, model or training field is refused with the field named (exit 2), never silently reused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.recipe import load_recipe
from metis_cli.telemetry.run import changed_inputs, mark_done, stage_inputs

runner = CliRunner()


def _recipe(tmp_path, *overrides):
    return load_recipe("recipes/tiny.yaml", [f"run.output_dir={tmp_path / 'run'}", *overrides])


def test_changed_inputs_name_the_fields_that_differ(tmp_path):
    recipe = _recipe(tmp_path)
    stage_dir = tmp_path / "run" / "sft"
    stage_dir.mkdir(parents=True)
    mark_done(stage_dir, {"inputs": stage_inputs(recipe, "sft")})
    assert changed_inputs(stage_dir, recipe, "sft") == []
    # logging cadence and unrelated sections do not count
    assert changed_inputs(stage_dir, _recipe(tmp_path, "sft.save_every=7", "hdpo.steps=3", "run.threads=1"), "sft") == []
    changed = _recipe(tmp_path, "data.synthetic.answer_noise=0.5", "sft.lr=0.01", "run.seed=3")
    assert changed_inputs(stage_dir, changed, "sft") == ["data.synthetic.answer_noise", "run.seed", "sft.lr"]
    assert "hdpo.w_tool" in stage_inputs(recipe, "hdpo") and "hdpo.w_tool" not in stage_inputs(recipe, "sft")
    # RL prompts are not SFT inputs; cold-start data reaches RL only through the SFT model
    assert changed_inputs(stage_dir, _recipe(tmp_path, "data.synthetic.rl_prompts=10"), "sft") == []
    assert "data.synthetic.answer_noise" not in stage_inputs(recipe, "hdpo")
    assert "data.synthetic.rl_prompts" in stage_inputs(recipe, "hdpo")


def test_the_vision_only_closeup_share_is_an_sft_input_of_vision_runs_only(tmp_path):
    # text runs recorded before the field existed still match their recipes
    assert "data.synthetic.closeup_share" not in stage_inputs(_recipe(tmp_path), "sft")
    vision = load_recipe("recipes/tiny-vl.yaml", [f"run.output_dir={tmp_path / 'vl'}"])
    assert stage_inputs(vision, "sft")["data.synthetic.closeup_share"] == 0.5
    assert "data.synthetic.closeup_share" not in stage_inputs(vision, "hdpo")  # reaches RL via the SFT model


def test_run_refuses_to_reuse_a_stage_made_from_another_recipe(tmp_path):
    recipe = _recipe(tmp_path)
    stage_dir = tmp_path / "run" / "sft"
    stage_dir.mkdir(parents=True)
    mark_done(stage_dir, {"inputs": stage_inputs(recipe, "sft")})
    result = runner.invoke(app, ["run", "recipes/tiny.yaml", "--set", f"run.output_dir={tmp_path / 'run'}",
                                 "--set", "data.synthetic.answer_noise=0.5"])
    assert result.exit_code == 2
    assert "different recipe (data.synthetic.answer_noise changed)" in result.output and "--overwrite" in result.output


def test_a_stage_finished_before_inputs_were_kept_is_still_reused(tmp_path):
    stage_dir = tmp_path / "run" / "sft"
    stage_dir.mkdir(parents=True)
    mark_done(stage_dir, {"steps": 3})
    assert changed_inputs(stage_dir, _recipe(tmp_path, "sft.lr=0.5"), "sft") == []


def test_resuming_an_unfinished_stage_with_another_recipe_is_refused(tmp_path):
    from metis_cli.errors import RunFolderError
    from metis_cli.telemetry.run import INPUTS_FILE, prepare_stage_dir

    stage_dir = tmp_path / "run" / "hdpo"
    inputs = stage_inputs(_recipe(tmp_path), "hdpo")
    prepare_stage_dir(stage_dir, resume=False, overwrite=False, command="hdpo", inputs=inputs)
    assert (stage_dir / INPUTS_FILE).is_file()
    (stage_dir / "metrics.jsonl").write_text('{"stage": "hdpo", "step": 1}\n')  # it ran a step, then died
    prepare_stage_dir(stage_dir, resume=True, overwrite=False, command="hdpo", inputs=inputs)  # same recipe: fine
    changed = stage_inputs(_recipe(tmp_path, "hdpo.lr=0.5"), "hdpo")
    with pytest.raises(RunFolderError, match=r"different recipe \(hdpo.lr changed\).*--overwrite"):
        prepare_stage_dir(stage_dir, resume=True, overwrite=False, command="hdpo", inputs=changed)
    prepare_stage_dir(stage_dir, resume=False, overwrite=True, command="hdpo", inputs=changed)  # starting over is fine
    assert not (stage_dir / "metrics.jsonl").exists()
