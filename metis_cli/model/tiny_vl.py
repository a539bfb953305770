"""Build the tiny Qwen3-VL model the vision default trains (or a tiny Qwen2.5-VL), with no downloads.

Like model/tiny.py (whose tokenizer machinery it reuses): a byte-level BPE tokenizer trained
here, on the synthetic vision task's rendered conversations (data/synthetic_vl.py), plus the
vision tokens; a Qwen-style chat template that renders an image content part as
`<|vision_start|><|image_pad|><|vision_end|>` (the processor expands `<|image_pad|>` to the
image's token count); randomly initialised Qwen3-VL weights (about 0.8M parameters); and the
processor (patch 16, 2x2 merge, images shrunk to at most `max_pixels`). All saved as one folder
that transformers (`AutoModelForImageTextToText`, `AutoProcessor` where torchvision is) and
model/processor.py's `load_processor` load like a hub Qwen3-VL. It does not train the model.

`family="qwen2.5-vl"` (recipe `model.build_tiny.kind: vision-qwen2.5`) builds the same tokenizer
and template with a Qwen2.5-VL instead: windowed vision attention, no deepstack, and
Qwen2.5-VL's own image processor settings (patch 14, CLIP mean/std, bicubic), so a 256 px image
reaches it as 56x56 px = 4 tokens. That resize is not the exact 4x box shrink, so the task's
hard subset does not strictly need zoom_in there; it is built to test Qwen2.5-VL as a policy
(tests/test_qwen25_vl.py), not to reproduce the vision default's results.
"""

from __future__ import annotations

from pathlib import Path

from metis_cli.data import synthetic_vl
from metis_cli.model import tiny
from metis_cli.model.processor import images_only, save_processor

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
"""Qwen's vision tokens, as special tokens. `<|video_pad|>` is never used (images only) but
Qwen-VL processors, and vLLM's, look it up in the vocabulary."""

ZOOM_CALL_PREFIX = '{"name": "zoom_in", "arguments": {"bbox_2d": ['
ZOOM_CALL_SUFFIX = '], "image_index": 0}}'
MARKER_TOKENS = [marker for marker in tiny.MARKER_TOKENS
                 if marker not in (tiny.CALCULATOR_CALL_PREFIX, tiny.CALCULATOR_CALL_SUFFIX)]
MARKER_TOKENS += [ZOOM_CALL_PREFIX, ZOOM_CALL_SUFFIX]
"""The text model's markers with the calculator's fixed call text swapped for zoom_in's."""

MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64
"""The tiny processor's image sizes: a 256 px task image reaches the model as 64x64 pixels, 4
image tokens after the 2x2 merge (fast on CPU, and too coarse to read the corner digit)."""

_TEXT_PART = "{%- if part is mapping and part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
_TEXT_OR_IMAGE_PART = (
    "{%- if part is mapping and part.type == 'text' -%}{{- part.text -}}"
    "{%- elif part is mapping and (part.type in ['image', 'image_url'] or 'image' in part) -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- endif -%}"
)
CHAT_TEMPLATE = tiny.CHAT_TEMPLATE.replace(_TEXT_PART, _TEXT_OR_IMAGE_PART)
"""The text model's template (tool calls rendered the same), with image parts rendered the way
Qwen3-VL's template renders them (tests/test_vl_model.py fails if model/tiny.py's macro changes)."""

_BUILT_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                      "processor_config.json")
_TEXT_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=32)
_VISION_SIZES = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                     patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0])
_QWEN25_VISION_SIZES = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                            fullatt_block_indexes=[1], tokens_per_second=2)
"""Qwen2.5-VL's vision tower at tiny sizes: block 0 attends within 2x2-token windows (window_size
56 px = 4 patches = 2 merged tokens), block 1 is full attention, like the real tower's mix."""
FAMILIES = ("qwen3-vl", "qwen2.5-vl")


def build_tiny_vl_model(out_dir: Path, *, seed: int = 0, max_position_embeddings: int = 1024,
                        min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, family: str = "qwen3-vl") -> Path:
    """Build a randomly initialised tiny Qwen3-VL (or Qwen2.5-VL, `family`) + tokenizer + processor
    folder at `out_dir`.

    An `out_dir` that already holds a built model is returned untouched; the folder is written
    beside it and renamed into place (model/tiny.py's `build_folder_atomically`).
    """

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")

    def write(staging_dir: Path) -> None:
        tokenizer = build_tiny_vl_tokenizer()
        if family == "qwen2.5-vl":
            processor = _qwen25_processor(tokenizer, min_pixels, max_pixels)
            model = _random_qwen25_vl(tokenizer, seed, max_position_embeddings)
        else:
            processor = _processor(tokenizer, min_pixels, max_pixels)
            model = _random_qwen3_vl(tokenizer, seed, max_position_embeddings)
        save_processor(processor, staging_dir)  # tokenizer files, chat template, processor configs
        model.save_pretrained(staging_dir)

    return tiny.build_folder_atomically(Path(out_dir), _BUILT_MODEL_FILES, write)


def build_tiny_vl_tokenizer():
    """The tiny vision model's tokenizer: model/tiny.py's, trained on the vision task's text."""
    conversations = [row["messages"] for row in synthetic_vl.cold_start_trajectories(200, seed=0)]
    conversations += [row["messages"] for row in synthetic_vl.knowledge_examples(50, seed=0)]
    special_tokens = tiny.SPECIAL_TOKENS + VISION_TOKENS
    texts = tiny.rendered_training_texts(conversations, [synthetic_vl.ZOOM_IN_TOOL_SPEC], CHAT_TEMPLATE,
                                         special_tokens + MARKER_TOKENS)
    return tiny.build_tiny_tokenizer(training_texts=texts, special_tokens=special_tokens,
                                     marker_tokens=MARKER_TOKENS, chat_template=CHAT_TEMPLATE)


def _processor(tokenizer, min_pixels: int, max_pixels: int):
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen3-VL's own image settings, at tiny sizes. The PIL backend needs no torchvision and
    # saves as "Qwen2VLImageProcessor", which loads with torchvision's backend where it exists.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=min_pixels, max_pixels=max_pixels,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        resample=4,  # PIL's BOX: a 4x shrink averages 4x4 blocks exactly, so the task's checkered mark
    )  # becomes a pure blend at 64 px (bicubic's wider kernel leaks which colour is top-left)
    processor = images_only(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                              chat_template=CHAT_TEMPLATE)
    processor.video_config = {  # what AutoProcessor needs to build Qwen3-VL's video processor
        "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    }
    return processor


def _qwen25_processor(tokenizer, min_pixels: int, max_pixels: int):
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen2.5-VL's own image settings (the class defaults: patch 14, CLIP mean/std, bicubic).
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = images_only(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                 chat_template=CHAT_TEMPLATE)
    processor.video_config = {  # what AutoProcessor needs to build Qwen2.5-VL's video processor
        "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }
    return processor


def _token_ids(tokenizer) -> tuple[int, int, dict]:
    """(pad id, end-of-turn id, the config's vision token ids)."""
    token_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    return tokenizer.convert_tokens_to_ids(tiny.PAD_TOKEN), tokenizer.convert_tokens_to_ids(tiny.END_OF_TURN_TOKEN), \
        token_ids


def _random_qwen3_vl(tokenizer, seed: int, max_position_embeddings: int):
    from transformers import Qwen3VLConfig

    pad_id, end_of_turn_id, token_ids = _token_ids(tokenizer)
    text_config = dict(
        _TEXT_SIZES, vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
        rope_scaling={"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True},
        bos_token_id=pad_id, eos_token_id=end_of_turn_id, pad_token_id=pad_id, dtype="float32",
    )
    config = Qwen3VLConfig(text_config=text_config, vision_config=dict(_VISION_SIZES), tie_word_embeddings=True,
                           **token_ids)
    return _random_model(config, seed, pad_id, end_of_turn_id)


def _random_qwen25_vl(tokenizer, seed: int, max_position_embeddings: int):
    from transformers import Qwen2_5_VLConfig

    pad_id, end_of_turn_id, token_ids = _token_ids(tokenizer)
    text_sizes = {key: value for key, value in _TEXT_SIZES.items() if key != "head_dim"}  # hidden / heads = 32
    text_config = dict(
        text_sizes, num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
        rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6]},  # Qwen2.5-VL's [16, 24, 24] / 4
        bos_token_id=pad_id, eos_token_id=end_of_turn_id, pad_token_id=pad_id, dtype="float32",
    )
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=dict(_QWEN25_VISION_SIZES),
                              tie_word_embeddings=True, **token_ids)
    return _random_model(config, seed, pad_id, end_of_turn_id)


def _random_model(config, seed: int, pad_id: int, end_of_turn_id: int):
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=end_of_turn_id,
                                               pad_token_id=pad_id)
    return model
