"""Qwen2.5-VL as a policy: the tiny Qwen2.5-VL (`model.build_tiny.kind: vision-qwen2.5`,
model/tiny_vl.py) builds and loads through the recipe path (ensure_base_model, load_policy,
load_vision) like a hub Qwen2.5-VL; placeholder expansion matches its patch-14 processor; the HF
backend generates with images what transformers' own generate does; grouped log-probs with
prompt and tool images equal the plain pass in values and gradients; an SFT image row's loss is
the loss of the processor's own inputs; LoRA stays out of its vision tower (whose MLP has
gate/up/down_proj). The Qwen3-VL counterparts are tests/test_vl_model.py and test_vl_rollout.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from metis_cli.agent.hf_backend import HFBackend
from metis_cli.agent.rollout import RolloutBatch, RolloutEngine
from metis_cli.agent.tools.registry import ToolRegistry
from metis_cli.data import synthetic_vl
from metis_cli.data.chat import encode_text, render
from metis_cli.model.loading import ensure_base_model, load_policy
from metis_cli.model.processor import VIDEO_CONFIG_FILE, load_processor
from metis_cli.model.vision import load_vision
from metis_cli.recipe import load_recipe
from metis_cli.recipe.schema_tools import ToolsConfig
from metis_cli.train import sft_batch
from metis_cli.train.logprobs import grouped_token_logprobs, token_logprobs
from metis_cli.train.vision_rows import tokenize_with_images

torch.set_num_threads(1)
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
TOOLS = [synthetic_vl.ZOOM_IN_TOOL_SPEC]
FIELD = "model.name_or_path"


def _recipe(path, *overrides):
    return load_recipe(REPO / "recipes" / "tiny-vl.yaml",
                       [f"model.name_or_path={path}", "model.build_tiny.kind=vision-qwen2.5", *overrides])


@pytest.fixture(scope="module")
def q25_dir(tmp_path_factory):
    recipe = _recipe(tmp_path_factory.mktemp("tiny-qwen25-vl") / "base")
    return ensure_base_model(recipe)


@pytest.fixture(scope="module")
def policy(q25_dir):
    """(model, tokenizer, vision) as a stage loads them, model in eval mode."""
    model, tokenizer = load_policy(q25_dir, _recipe(q25_dir), device="cpu", field=FIELD)
    return model.eval(), tokenizer, load_vision(q25_dir, model=model)


@pytest.fixture(scope="module")
def processor(q25_dir):
    return load_processor(q25_dir)


def _prompts(n: int, seed: int = 0):
    rows = synthetic_vl.rl_prompts(n, seed)
    return [r["messages"] for r in rows], [r["images"] for r in rows]


def test_recipe_kind_builds_a_qwen25_vl_that_loads_as_a_policy(q25_dir, policy, processor):
    from pathlib import Path

    from transformers import Qwen2_5_VLProcessor

    model, tokenizer, vision = policy
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert 0.3e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    assert isinstance(processor, Qwen2_5_VLProcessor)
    config = model.config
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"), ("video_token_id", "<|video_pad|>"))}
    assert {name: getattr(config, name) for name in ids} == ids
    assert vision.image_token_id == ids["image_token_id"] and vision.special_token_ids == set(ids.values())
    assert vision.merge_size == 2 and config.vision_config.patch_size == 14
    folder = Path(q25_dir)
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    assert json.loads((folder / VIDEO_CONFIG_FILE).read_text())["video_processor_type"] == "Qwen2VLVideoProcessor"
    from_folder = load_vision(q25_dir)  # the config read from the folder (the vLLM path)
    assert from_folder.image_token_id == vision.image_token_id and from_folder.special_token_ids == vision.special_token_ids


def test_expansion_matches_the_patch_14_processor(policy, processor):
    """A 256 px prompt image becomes 56x56 px (4x4 patches of 14 px, 4 tokens after the merge);
    a 64 px zoom crop 56x56 too; Vision.expand gives the processor's own ids."""
    _, tokenizer, vision = policy
    row = synthetic_vl.cold_start_trajectories(1, seed=0, hard_share=1.0)[0]
    text = render(tokenizer, row["messages"], TOOLS, add_generation_prompt=False)
    reference = processor(images=row["images"], text=[text], return_tensors="pt")
    assert reference["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert [vision.features(image).grid_thw for image in row["images"]] == [(1, 4, 4), (1, 4, 4)]
    ids, _, _ = vision.expand(encode_text(tokenizer, text), row["images"])
    assert ids == reference["input_ids"][0].tolist()
    assert sum(token == vision.image_token_id for token in ids) == 8


def test_the_image_changes_the_output(policy, processor):
    model, tokenizer, _ = policy
    messages, images = _prompts(1)
    text = render(tokenizer, messages[0], TOOLS, add_generation_prompt=True)
    red = processor(images=images[0], text=[text], return_tensors="pt")
    blue = dict(red, pixel_values=-red["pixel_values"])
    with torch.no_grad():
        assert not torch.allclose(model(**red).logits[0, -1], model(**blue).logits[0, -1])


def test_hf_backend_generates_what_transformers_generates(policy, processor):
    """Left-padded batch of prompts with different images and lengths: greedy tokens and log-probs
    equal transformers' generate on each prompt alone (images and Qwen2.5-VL's 3-D positions reach it)."""
    from test_vl_rollout import assert_hf_backend_matches_transformers

    model, tokenizer, vision = policy
    assert_hf_backend_matches_transformers(model, processor, tokenizer, vision)


def _batch(model, tokenizer, vision):
    """Rollouts of 2 prompts x G = 2 sampled by the HF backend, plus 2 scripted rollouts that
    zoom (a tool image inside the continuation)."""
    from test_vl_rollout import ZoomThenAnswer

    registry = ToolRegistry.from_config(ToolsConfig(enabled=["zoom_in"], zoom_in={"min_pixels": 4096, "max_pixels": 4096}))
    engine = RolloutEngine(HFBackend(model, tokenizer, vision=vision), tokenizer, registry, max_turns=2,
                           max_new_tokens_per_turn=10, max_total_tokens=300, temperature=1.0, top_p=1.0, vision=vision)
    messages, images = _prompts(2, seed=5)
    rollouts = engine.run(messages, 2, images=images, seed=1)
    zoomed = RolloutEngine(ZoomThenAnswer(tokenizer), tokenizer, registry, max_turns=3, max_new_tokens_per_turn=40,
                           max_total_tokens=400, temperature=1.0, top_p=1.0, vision=vision).run(
                               messages[:1], 2, images=images[:1])
    for rollout in zoomed:
        rollout.prompt_index = 2
    rollouts += zoomed
    batch = RolloutBatch.from_rollouts(rollouts, tokenizer.pad_token_id)
    return batch, torch.tensor([r.prompt_len for r in rollouts]), [r.images for r in rollouts]


def test_grouped_logprobs_with_images_equal_the_plain_pass(policy):
    model, tokenizer, vision = policy
    batch, prompt_lens, images = _batch(model, tokenizer, vision)
    assert any(len(row) == 2 for row in images)
    model.train()
    try:
        columns = torch.arange(batch.input_ids.shape[1])[None]
        trained = (columns >= prompt_lens[:, None]) & (batch.attention_mask > 0)
        plain, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, vision=vision, images=images)
        (plain * trained).sum().backward()
        plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        grouped, _ = grouped_token_logprobs(model, batch.input_ids, batch.attention_mask, prompt_lens, vision=vision,
                                            images=images)
        grouped.sum().backward()
        grouped_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad()
        model.eval()
    torch.testing.assert_close(grouped, plain * trained, atol=2e-5, rtol=0)
    assert set(grouped_grads) == set(plain_grads) and any("visual" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, atol=5e-5, rtol=1e-3, msg=name)


def test_sft_image_row_loss_is_the_loss_of_the_processors_inputs(policy, processor):
    """A zooming cold-start conversation (2 images) as SFT rows: the padded layout's loss sum with
    the row's images equals cross-entropy on the processor's own inputs under the same mask, and
    its gradient reaches the vision tower."""
    model, tokenizer, vision = policy
    row = synthetic_vl.cold_start_trajectories(1, seed=0, hard_share=1.0)[0]
    rows = tokenize_with_images(tokenizer, vision, row["messages"], TOOLS, row["images"], where="row 0")
    assert len(rows) == 1 and len(rows[0][2]) == 2
    ids, mask, _ = rows[0]
    batch = sft_batch.build(rows, packing=True, pad_id=tokenizer.pad_token_id, device="cpu")
    assert not isinstance(batch, sft_batch.PackedRows)  # image rows take the padded layout
    try:
        with sft_batch.routing(model, batch):
            total, count = sft_batch.loss_sum(model, batch, vision)
        total.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "visual" in n)
    finally:
        model.zero_grad()
    inputs = processor(images=row["images"], text=[render(tokenizer, row["messages"], TOOLS, add_generation_prompt=False)], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1]
    targets = torch.tensor(ids[1:]).masked_fill(~torch.tensor(mask[1:], dtype=torch.bool), -100)
    expected = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    assert count == sum(mask[1:]) > 0
    torch.testing.assert_close(total.detach(), expected, atol=1e-4, rtol=1e-5)


def test_lora_adapts_the_language_model_only(q25_dir):
    recipe = _recipe(q25_dir, "model.lora.enabled=true", "model.lora.target_modules=[q_proj, gate_proj, down_proj]")
    model, _ = load_policy(q25_dir, recipe, device="cpu", field=FIELD)
    adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}
    assert adapted and all(".language_model." in name for name in adapted)
    assert any(name.endswith("gate_proj") for name in adapted)
    assert any(".visual." in n and n.endswith("gate_proj.weight") for n, _ in model.named_parameters())
