"""`metis plan`: memory per GPU against numbers worked out by hand, and the command itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.model.memory_plan import GIB, KNOWN_MODELS, model_shape, plan_stage, safetensors_params
from metis_cli.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
SMALL_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "tie_word_embeddings": False}


def recipe_for(model_dir: Path, *overrides: str):
    return load_recipe(REPO / "recipes" / "tiny.yaml", [f"model.name_or_path={model_dir}", "model.build_tiny=null",
                                                        "model.dtype=bfloat16", *overrides])


def test_small_model_on_four_gpus_matches_the_hand_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_CONFIG))
    recipe = recipe_for(tmp_path, "sft.batch_size=8", "sft.max_seq_len=100")
    shape = model_shape(recipe)
    # per layer: q 64*64 + k,v 2*64*32 + o 64*64 + q/k norms 2*16 + MLP 3*64*128 + 2 norms of 64
    assert shape.layer_params == 4096 + 4096 + 4096 + 32 + 24576 + 128 == 37024
    # embeddings and untied head 2*1000*64, final norm 64
    assert shape.params == 128064 + 2 * 37024 == 202112
    plan = plan_stage(shape, recipe, "sft", gpus=4, gpu_memory_gib=80)
    bytes_per_gpu = {name: round(gib * GIB) for name, gib in plan.rows.items()}
    assert plan.tokens_per_micro_batch == 2 * 100  # ceil(8 / 4) sequences of 100 tokens
    assert bytes_per_gpu == {
        "fp32 masters (sharded)": 202112 * 4 // 4,
        "gathered layers": (2 * 37024 + 128064) * 2,  # two bf16 layers and the root
        "gradients (fp32)": 202112 * 4 // 4,
        "Adam states (fp32)": 202112 * 8 // 4,
        # per token and layer 4*64 + 3*64 + 3*32 + 4*128 = 1056 bf16 values
        "activations": 2 * 1056 * 2 * 200,
        "logits": 200 * 1000 * (2 + 4 + 4),
        "runtime overhead": 2 * GIB,
    }


def test_checkpointing_keeps_layer_inputs_and_one_layer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_CONFIG))
    recipe = recipe_for(tmp_path, "sft.batch_size=8", "sft.max_seq_len=100", "run.distributed.gradient_checkpointing=true")
    plan = plan_stage(model_shape(recipe), recipe, "sft", gpus=1, gpu_memory_gib=80)
    tokens = 8 * 100
    assert round(plan.rows["activations (ckpt)"] * GIB) == 2 * 64 * 2 * tokens + 1056 * 2 * tokens
    # one process, bf16: the model plus fp32 master copies
    assert round(plan.rows["weights"] * GIB) == 202112 * 2 and round(plan.rows["fp32 masters"] * GIB) == 202112 * 4


def test_qwen3_vl_8b_from_the_builtin_table():
    text = KNOWN_MODELS["Qwen/Qwen3-8B"]
    assert text.params == 8_190_735_360  # Qwen3-8B's published count (the VL model's decoder)
    vl = KNOWN_MODELS["Qwen/Qwen3-VL-8B-Instruct"]
    assert round(vl.params / 1e7) == 877  # 8.77B with the vision tower
    recipe = load_recipe(REPO / "recipes" / "8b.yaml", [])
    plan = plan_stage(vl, recipe, "hdpo", gpus=8, gpu_memory_gib=80)
    assert plan.rows["fp32 masters (sharded)"] == pytest.approx(vl.params * 4 / 8 / GIB)
    assert plan.rows["Adam states (fp32)"] == pytest.approx(vl.params * 8 / 8 / GIB)
    assert plan.rows["vLLM engine"] == pytest.approx(0.6 * 80)
    assert "rollout copy (unsharded)" not in plan.rows


def test_hf_rollouts_on_several_processes_count_each_ranks_unsharded_copy():
    vl = KNOWN_MODELS["Qwen/Qwen3-VL-8B-Instruct"]
    recipe = load_recipe(REPO / "recipes" / "8b.yaml", ["rollout.backend=hf"])
    plan = plan_stage(vl, recipe, "hdpo", gpus=8, gpu_memory_gib=80)
    assert plan.rows["rollout copy (unsharded)"] == pytest.approx(vl.params * 2 / GIB)  # bf16, ~16 GiB
    assert "vLLM engine" not in plan.rows
    assert "rollout copy (unsharded)" not in plan_stage(vl, recipe, "hdpo", gpus=1, gpu_memory_gib=80).rows


def test_vllm_sleep_mode_needs_the_larger_of_the_update_and_the_rollout():
    """Asleep in the update, the engine's share is counted only beside what the trainer keeps
    between updates (weights, masters, Adam, overhead), not beside the activations or the
    gradients (freed after each update)."""
    vl = KNOWN_MODELS["Qwen/Qwen3-VL-8B-Instruct"]
    awake = plan_stage(vl, load_recipe(REPO / "recipes" / "8b.yaml", []), "hdpo", gpus=8, gpu_memory_gib=80)
    asleep = plan_stage(vl, load_recipe(REPO / "recipes" / "8b.yaml", ["rollout.vllm.sleep_mode=true"]),
                        "hdpo", gpus=8, gpu_memory_gib=80)
    assert awake.rollout_gib is None and awake.total_gib == pytest.approx(sum(awake.rows.values()))
    assert asleep.update_gib == pytest.approx(awake.total_gib - 0.6 * 80)
    kept = sum(asleep.rows[name] for name in ("fp32 masters (sharded)", "Adam states (fp32)", "runtime overhead"))
    assert asleep.rollout_gib == pytest.approx(kept + 0.6 * 80)
    assert asleep.total_gib == pytest.approx(max(asleep.update_gib, asleep.rollout_gib))
    assert asleep.total_gib < awake.total_gib


def test_a_tensor_parallel_engine_holds_a_slice_of_the_weights_per_gpu():
    """The engine's share of each GPU holds 1/T of the bf16 weights; the rest is its KV cache. A
    share too small for the weights is called out, with the two fields that fix it."""
    vl = KNOWN_MODELS["Qwen/Qwen3-VL-8B-Instruct"]
    one = plan_stage(vl, load_recipe(REPO / "recipes" / "8b.yaml", []), "hdpo", gpus=8, gpu_memory_gib=80)
    two = plan_stage(vl, load_recipe(REPO / "recipes" / "8b.yaml", ["rollout.vllm.tensor_parallel_size=2"]),
                     "hdpo", gpus=8, gpu_memory_gib=80)
    assert one.engine_weights_gib == pytest.approx(vl.params * 2 / GIB)
    assert two.engine_weights_gib == pytest.approx(one.engine_weights_gib / 2)
    assert two.engine_kv_gib == pytest.approx(0.6 * 80 - vl.params / GIB)
    tight = ["plan", "recipes/8b.yaml", "--gpus", "8", "--set", "rollout.vllm.gpu_memory_utilization=0.15"]
    result = CliRunner().invoke(app, tight)
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "does NOT fit: raise rollout.vllm.gpu_memory_utilization" in text, text
    text = " ".join(CliRunner().invoke(app, [*tight, "--set", "rollout.vllm.tensor_parallel_size=2"]).output.split())
    assert "(1/2 of them: rollout.vllm.tensor_parallel_size 2), leaving 3.8 GiB for its KV cache" in text, text


def test_parameters_are_counted_from_safetensors_headers(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    assert safetensors_params(tmp_path) == 17


def test_plan_command_reports_fit_without_importing_torch():
    code = ("import json, sys\nfrom typer.testing import CliRunner\nfrom metis_cli.cli.main import app\n"
            "r = CliRunner().invoke(app, ['plan', 'recipes/8b.yaml', '--gpus', '8', '--json', "
            "'--set', 'run.distributed.gradient_checkpointing=true'])\n"
            "print(json.dumps({'code': r.exit_code, 'out': r.output, 'torch': 'torch' in sys.modules}))")
    result = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout)
    assert result["code"] == 0 and not result["torch"]
    stages = json.loads(result["out"])["stages"]
    assert stages["sft"]["fits"] is True and stages["hdpo"]["fits"] is False
    assert stages["hdpo"]["total_gib_checkpointing_flipped"] > stages["hdpo"]["total_gib"]


def test_plan_table_says_whether_it_fits():
    result = CliRunner().invoke(app, ["plan", "recipes/8b.yaml", "--gpus", "8", "--gpu-memory-gib", "141"])
    assert result.exit_code == 0, result.output
    assert "fp32 masters (sharded)" in result.output and "hdpo:" in result.output and "fit" in result.output


def test_unknown_hub_model_is_a_user_error():
    result = CliRunner().invoke(app, ["plan", "recipes/8b.yaml", "--set", "model.name_or_path=someone/unknown-7b"])
    assert result.exit_code == 2 and "neither a local model folder" in result.output
