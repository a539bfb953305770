"""Vision-language policies: the tiny Qwen3-VL builds and loads like a hub Qwen3-VL (model +
processor, without torchvision), runs a forward pass and generates with an image; the vision tower
is frozen or left out of LoRA as the recipe says; the synthetic vision task's sets are written as
JSONL + PNG files that load back."""

from __future__ import annotations

import json
import random

import pytest
import torch

from metis_cli.data import synthetic_vl
from metis_cli.data.images import load_images
from metis_cli.errors import ModelError
from metis_cli.model import tiny, tiny_vl
from metis_cli.model.loading import apply_lora, load_policy, model_class
from metis_cli.model.processor import VIDEO_CONFIG_FILE, is_vision_language, load_processor
from metis_cli.recipe import load_recipe

torch.set_num_threads(1)
TOOLS = [synthetic_vl.ZOOM_IN_TOOL_SPEC]


def one_image_prompt(processor, size=64):
    from PIL import Image

    image = Image.new("RGB", (size, size), (220, 40, 40))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": synthetic_vl.easy_question()}]}]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")


def test_folder_is_a_qwen3_vl_with_its_processor(vl_dir, vl_model, vl_processor):
    from transformers import AutoModelForImageTextToText, Qwen3VLProcessor

    assert model_class(str(vl_dir)) is AutoModelForImageTextToText and is_vision_language(str(vl_dir))
    assert type(vl_model).__name__ == "Qwen3VLForConditionalGeneration"
    assert 0.5e6 < sum(p.numel() for p in vl_model.parameters()) < 1.5e6
    assert isinstance(vl_processor, Qwen3VLProcessor)
    tokenizer, config = vl_processor.tokenizer, vl_model.config
    for name, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                        ("vision_end_token_id", "<|vision_end|>"), ("video_token_id", "<|video_pad|>")):
        assert getattr(config, name) == tokenizer.convert_tokens_to_ids(token), name
    assert config.text_config.vocab_size == len(tokenizer)
    # what AutoProcessor needs where torchvision is installed, and the real processor class name
    assert json.loads((vl_dir / VIDEO_CONFIG_FILE).read_text())["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert json.loads((vl_dir / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"


def test_building_again_returns_the_folder_untouched(vl_dir):
    stamp = (vl_dir / "model.safetensors").stat().st_mtime_ns
    assert tiny_vl.build_tiny_vl_model(vl_dir) == vl_dir
    assert (vl_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_forward_with_one_64px_image(vl_model, vl_processor):
    inputs = one_image_prompt(vl_processor)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4x4 patches of 16 px
    image_id = vl_model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum() == 4  # after the 2x2 merge
    assert inputs["mm_token_type_ids"].tolist() == (inputs["input_ids"] == image_id).long().tolist()
    with torch.no_grad():
        logits = vl_model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], vl_model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_the_image_changes_the_output(vl_model, vl_processor):
    """The pixels reach the language model (a vision tower cut off would leave logits equal)."""
    red, blue = one_image_prompt(vl_processor), one_image_prompt(vl_processor)
    blue["pixel_values"] = -blue["pixel_values"]
    with torch.no_grad():
        assert not torch.allclose(vl_model(**red).logits[0, -1], vl_model(**blue).logits[0, -1])


def test_generate_with_an_image(vl_model, vl_processor):
    inputs = one_image_prompt(vl_processor)
    with torch.no_grad():
        output = vl_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(output[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])


def test_template_renders_images_as_vision_tokens_and_tool_calls_like_the_text_model(vl_processor):
    tokenizer = vl_processor.tokenizer
    row = synthetic_vl.cold_start_trajectories(1, seed=0, hard_share=1.0)[0]
    text = tokenizer.apply_chat_template(row["messages"], tools=TOOLS, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2  # the prompt's and the zoom's
    text_only = [{"role": m["role"], **({"name": m["name"]} if "name" in m else {}),
                  "content": m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"]}
                 for m in row["messages"]]
    assert (tokenizer.apply_chat_template(text_only, tools=TOOLS, tokenize=False)
            == text.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
            == tokenizer.apply_chat_template(text_only, tools=TOOLS, tokenize=False, chat_template=tiny.CHAT_TEMPLATE))
    # compact: the whole zooming trajectory, tool listing included, stays short
    assert len(tokenizer(text)["input_ids"]) < 160
    call = synthetic_vl.zoom_call([0, 0, 64, 64])
    assert tokenizer.decode(tokenizer(call)["input_ids"]) == call
    assert len(tokenizer(call)["input_ids"]) < 20


def test_text_model_folder_has_no_processor(tiny_model_dir):
    assert not is_vision_language(str(tiny_model_dir))
    with pytest.raises(ModelError, match="cannot load a processor"):
        load_processor(str(tiny_model_dir))


def test_torchvision_machines_get_transformers_own_processor(vl_dir, monkeypatch):
    from types import SimpleNamespace

    import transformers
    import transformers.utils

    asked = []
    real = SimpleNamespace(image_processor=object(), tokenizer=SimpleNamespace(pad_token_id=0))
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda path, **kwargs: asked.append(path) or real)
    assert load_processor(str(vl_dir)) is real and asked == [str(vl_dir)]


def _recipe(vl_dir, *overrides):
    from pathlib import Path

    tiny_recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    return load_recipe(tiny_recipe, [f"model.name_or_path={vl_dir}", *overrides])


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_vision_freezes_exactly_the_vision_tower(vl_dir, freeze):
    policy, _ = load_policy(str(vl_dir), _recipe(vl_dir, f"model.freeze_vision={str(freeze).lower()}"),
                            device="cpu", field="model.name_or_path")
    trainable = {name: parameter.requires_grad for name, parameter in policy.named_parameters()}
    vision = [name for name in trainable if name.startswith("model.visual.")]
    assert vision and len(vision) < len(trainable)
    assert all(trainable[name] != freeze for name in vision)
    assert all(trainable[name] for name in trainable if name not in vision)


def test_lora_adapts_the_language_model_only(vl_dir):
    recipe = _recipe(vl_dir, "model.lora.enabled=true",
                     "model.lora.target_modules=[q_proj, v_proj, linear_fc1, gate_proj]")
    policy, _ = load_policy(str(vl_dir), recipe, device="cpu", field="model.name_or_path")
    adapted = {name.split(".lora_")[0] for name, _ in policy.named_parameters() if ".lora_" in name}
    assert adapted and all(".language_model." in name for name in adapted)
    assert any(name.endswith("q_proj") for name in adapted) and any(name.endswith("gate_proj") for name in adapted)
    assert all(not p.requires_grad for n, p in policy.named_parameters() if ".lora_" not in n)


def test_lora_is_refused_plainly_when_no_target_is_in_the_language_model(vl_model):
    import copy

    lora = _recipe("unused").model.lora.model_copy(update={"enabled": True, "target_modules": ["linear_fc1"]})
    with pytest.raises(ModelError, match="model.lora.target_modules"):
        apply_lora(copy.deepcopy(vl_model), lora)


# ------------------------------------------------------------------------- the synthetic vision task
def test_sets_are_written_as_jsonl_with_pngs_beside_that_load_back(tmp_path):
    rows = synthetic_vl.cold_start_trajectories(4, seed=0)
    path = synthetic_vl.write_set(rows, tmp_path / "data" / "cold_start.jsonl")
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["id"] for row in written] == [row["id"] for row in rows]
    for row, original in zip(written, rows):
        assert row["images"] == [f"cold_start_images/{row['id']}-0.png", f"cold_start_images/{row['id']}-1.png"]
        loaded = load_images(row["images"], where=row["id"], base_dir=path.parent)
        assert [image.tobytes() for image in loaded] == [image.tobytes() for image in original["images"]]
        parts = [part for message in row["messages"] if isinstance(message["content"], list)
                 for part in message["content"] if part["type"] == "image"]
        assert len(parts) == len(row["images"])  # one placeholder per image, in order
    assert synthetic_vl.write_set(rows[:1], path) == path  # rewriting replaces the images folder
    assert len(list((path.parent / "cold_start_images").iterdir())) == 2


def test_generators_are_seeded_and_split_by_subset():
    assert [r["answer"] for r in synthetic_vl.rl_prompts(20, seed=1)] == \
        [r["answer"] for r in synthetic_vl.rl_prompts(20, seed=1)]
    rl = synthetic_vl.rl_prompts(20, seed=1, hard_share=0.25)
    assert sum(row["subset"] == "hard" for row in rl) == 5
    evaluation = synthetic_vl.eval_prompts(3, seed=0)
    assert [row["subset"] for row in evaluation] == ["easy"] * 3 + ["hard"] * 3
    assert all(row["answer"] in synthetic_vl.COLOURS for row in evaluation[:3])
    assert all(row["answer"] in synthetic_vl.COLOURS and "corner" in row["messages"][1]["content"][1]["text"]
               for row in evaluation[3:])
    cold = synthetic_vl.cold_start_trajectories(10, seed=0)
    assert all("zoom_in" in row["messages"][2]["content"] for row in cold)  # zoom for everything
    knowledge = synthetic_vl.knowledge_examples(3, seed=0)
    assert all(row["messages"][-1]["content"] == f"<answer>{row['answer']}</answer>" for row in knowledge)


def test_closeup_knowledge_is_the_zoom_output_answered_directly_and_leaves_the_rest_alone():
    """`closeup_share` turns that share of knowledge rows into hard questions on exactly the image
    zoom_in returns for the row's corner; the other rows keep the images of the set without them."""
    from metis_cli.data import images as image_ops

    plain = synthetic_vl.knowledge_examples(12, seed=4)
    mixed = synthetic_vl.knowledge_examples(12, seed=4, closeup_share=0.5)
    assert [row["subset"] for row in mixed].count("hard") == 6
    drawn = random.Random("vl-knowledge-4")
    for before, row in zip(plain, mixed):
        image, facts = synthetic_vl.draw_image(drawn)
        assert before["images"][0].tobytes() == image.tobytes()
        assert row["messages"][-1]["content"] == f"<answer>{row['answer']}</answer>"
        if row["subset"] == "easy":
            assert row["images"][0].tobytes() == image.tobytes() and row["answer"] == facts["colour"]
            continue
        zoomed, _ = image_ops.zoom(image, synthetic_vl.corner_box(facts["corner"]),
                                   min_pixels=synthetic_vl.ZOOM_PIXELS, max_pixels=synthetic_vl.ZOOM_PIXELS)
        assert row["images"][0].tobytes() == zoomed.tobytes() and row["answer"] == facts["mark"]
        assert row["messages"][1]["content"][1]["text"] == synthetic_vl.hard_question(facts["corner"])
        assert len(row["messages"]) == 3  # system, user, the direct answer: no zoom
    assert synthetic_vl.knowledge_examples(12, seed=4, closeup_share=0.0)[5]["images"][0].tobytes() == \
        plain[5]["images"][0].tobytes()


def test_the_cold_starts_direct_answers_are_easy_rows_on_the_same_images():
    zooming = synthetic_vl.cold_start_trajectories(40, seed=2)
    mixed = synthetic_vl.cold_start_trajectories(40, seed=2, direct_answer_share=0.25)
    easy = [row["subset"] for row in zooming].count("easy")
    direct = [row for row in mixed if len(row["messages"]) == 3]  # system, user, the answer: no zoom
    assert len(direct) == round(easy * 0.25) > 0 and all(row["subset"] == "easy" for row in direct)
    assert all(row["messages"][2]["content"] == f"<answer>{row['answer']}</answer>" and len(row["images"]) == 1
               for row in direct)
    for before, row in zip(zooming, mixed):
        assert before["images"][0].tobytes() == row["images"][0].tobytes() and before["answer"] == row["answer"]
        if len(row["messages"]) != 3:
            assert row["messages"] == before["messages"]


def test_the_palette_keeps_every_pair_of_colours_far_apart():
    names = sorted(synthetic_vl.COLOURS)
    distances = [sum((a - b) ** 2 for a, b in zip(synthetic_vl.COLOURS[x], synthetic_vl.COLOURS[y])) ** 0.5
                 for i, x in enumerate(names) for y in names[i + 1:]]
    assert min(distances) >= 70


def test_which_colour_is_top_left_in_the_mark_is_only_visible_after_zooming(vl_processor):
    """The tiny processor's 4x box shrink turns the checkered mark into the same blend whichever of
    its two colours is top-left (pixel_values equal), so a hard question needs zoom_in; the zoomed
    corner box (enlarged 2x by the tool's zoom) shows the top-left cell as a 4x4 px block whose
    centre is nearest that cell's colour. The large shape's colour stays visible."""
    from PIL import Image

    from metis_cli.data import images as image_ops

    processor = vl_processor.image_processor
    plain = Image.new("RGB", (256, 256), (255, 255, 255))
    for corner in synthetic_vl.CORNERS:
        pixels = []
        for first, second in (("red", "blue"), ("blue", "red")):
            image = plain.copy()
            box = synthetic_vl.corner_box(corner)
            synthetic_vl._draw_mark(image, first, second, box)
            pixels.append(processor(images=[image], return_tensors="pt")["pixel_values"])
            zoomed, cropped = image_ops.zoom(image, box, min_pixels=synthetic_vl.ZOOM_PIXELS,
                                             max_pixels=synthetic_vl.ZOOM_PIXELS)
            assert cropped == tuple(box) and zoomed.size == (64, 64)
            scale = zoomed.width // synthetic_vl.CORNER_BOX  # 2: the tool's enlargement
            assert scale * synthetic_vl.MARK_PX == processor.patch_size  # the mark fills the first patch
            half_cell = scale * synthetic_vl.MARK_CELL // 2
            centre = zoomed.getpixel((half_cell, half_cell))
            nearest = min(synthetic_vl.COLOURS, key=lambda name: sum(
                (a - b) ** 2 for a, b in zip(centre, synthetic_vl.COLOURS[name])))
            assert nearest == first, (corner, centre)
        assert torch.equal(pixels[0], pixels[1])
    for seed in range(5):
        image, facts = synthetic_vl.draw_image(random.Random(seed))
        centre = image.resize((64, 64), Image.Resampling.BOX).getpixel((32, 32))
        assert max(abs(a - b) for a, b in zip(centre, synthetic_vl.COLOURS[facts["colour"]])) <= 8  # grain averages out
        assert facts["mark"] != facts["mark_other"]