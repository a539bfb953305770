"""What a vision-language policy's forward takes besides token ids: image features, placeholder
expansion and multimodal (3-D, "mrope") position ids. Qwen3-VL, Qwen2.5-VL and Qwen2-VL alike.

The token side of metis (data/chat.py, the rollout engine) renders one `<|image_pad|>` token per
image, where the chat template puts it. `Vision.expand` then repeats each pad as many times as the
image has tokens after the vision tower's patch merge (`image_grid_thw`: t * h * w / merge**2),
which is what the processor itself does to text; the copies inherit the pad's loss mask (0) and
log-prob (0.0). A row's images are numbered in order of appearance, the prompt's first, then the
ones tools returned inside the rollout.

`Vision.forward_inputs(input_ids, attention_mask, images)` gives the extra forward arguments of a
batch: `pixel_values` of every image of every row in row order, `image_grid_thw`, and
`position_ids` [3, B, L] from the model's own `get_rope_index` (so padding on either side is
handled the model's way); text-only batches get none (a 1-D position layout is then the same).
`Vision.positions` gives those position ids alone, for a caller that feeds the pixels in pieces.

Image features are computed once per image object (the prompt image of a group serves its G
rollouts and every turn) and kept in a bounded cache.

Must not touch: reading or sizing images (data/images.py), where images sit in a conversation
(data/chat.py), loading the processor (model/processor.py).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from collections import OrderedDict
from dataclasses import dataclass

from metis_cli.errors import DataError, ModelError

IMAGE_PAD = "<|image_pad|>"
_CACHE_SIZE = 4096


@dataclass(frozen=True)
class ImageFeatures:
    """One image as the vision tower takes it: pixel_values [patches, D], grid_thw [3], tokens."""

    pixel_values: object
    grid_thw: tuple[int, int, int]
    tokens: int


class Vision:
    """A vision-language policy's image handling, built from its processor and config."""

    def __init__(self, processor, config):
        self.image_processor = processor.image_processor
        tokenizer = processor.tokenizer
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        vision_config = getattr(config, "vision_config", None)
        self.merge_size = int(getattr(vision_config, "spatial_merge_size", None)
                              or getattr(self.image_processor, "merge_size", 2))
        self._cache: OrderedDict[int, tuple[object, ImageFeatures]] = OrderedDict()
        # Tokens only the processor and templates write; a sampler must never produce them.
        self.special_token_ids = {self.image_token_id} | {
            token_id for name in ("video_token_id", "vision_start_token_id", "vision_end_token_id")
            if (token_id := getattr(config, name, None)) is not None}

    # --------------------------------------------------------------------------- per image
    def features(self, image) -> ImageFeatures:
        """The image's pixel patches and grid (cached per image object)."""
        key = id(image)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is image:
            self._cache.move_to_end(key)
            return hit[1]
        out = self.image_processor(images=[image], return_tensors="pt")
        grid = tuple(int(v) for v in out["image_grid_thw"][0].tolist())
        features = ImageFeatures(out["pixel_values"], grid, grid[0] * grid[1] * grid[2] // self.merge_size ** 2)
        self._cache[key] = (image, features)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return features

    def token_counts(self, images) -> list[int]:
        return [self.features(image).tokens for image in images]

    # ------------------------------------------------------------------------- token lists
    def expand(self, token_ids: list[int], images, *, mask: list[int] | None = None,
               logprobs: list[float] | None = None, where: str = "the conversation"):
        """`token_ids` with its i-th image pad repeated images[i]'s token count times; `mask` and
        `logprobs` (when given) stretched alike. Returns (ids, mask, logprobs) for what was given.

        Already-expanded runs are not expected: every pad must stand for one image, and their
        number must equal len(images) (a DataError naming `where` otherwise)."""
        pads = [index for index, token in enumerate(token_ids) if token == self.image_token_id]
        if len(pads) != len(images):
            raise DataError(f"{where} has {len(pads)} image placeholder(s) but {len(images)} image(s)")
        if not pads:
            return token_ids, mask, logprobs
        counts = self.token_counts(images)
        out_ids, out_mask, out_logprobs, start = [], [], [], 0
        for pad, count in zip(pads, counts):
            out_ids += token_ids[start:pad] + [self.image_token_id] * count
            if mask is not None:
                out_mask += mask[start:pad] + [0] * count
            if logprobs is not None:
                out_logprobs += logprobs[start:pad] + [0.0] * count
            start = pad + 1
        out_ids += token_ids[start:]
        if mask is not None:
            out_mask += mask[start:]
        if logprobs is not None:
            out_logprobs += logprobs[start:]
        return out_ids, (out_mask if mask is not None else None), (out_logprobs if logprobs is not None else None)

    def count_images(self, token_ids) -> int:
        """How many images an expanded token sequence holds (runs of pads after a non-pad)."""
        count, previous = 0, None
        for token in token_ids:
            if token == self.image_token_id and previous != self.image_token_id:
                count += 1
            previous = token
        return count

    # ------------------------------------------------------------------------ batch inputs
    def forward_inputs(self, model, input_ids, attention_mask, images: list[list]) -> dict:
        """Extra forward kwargs for the batch: pixel_values, image_grid_thw and position_ids
        [3, B, L]; {} when no row has an image. `images[b]` are row b's images in order."""
        import torch

        features, grid = self._checked_grid(input_ids, images)
        if not features:
            return {}
        pixel_values = torch.cat([f.pixel_values for f in features]).to(input_ids.device)
        dtype = next(model.parameters()).dtype
        return {"pixel_values": pixel_values.to(dtype), "image_grid_thw": grid,
                "position_ids": self.position_ids(model, input_ids, attention_mask, grid)}

    def positions(self, model, input_ids, attention_mask, images: list[list]):
        """`forward_inputs`'s position_ids [3, B, L] alone, without gathering pixel values; None
        when no row has an image."""
        features, grid = self._checked_grid(input_ids, images)
        return self.position_ids(model, input_ids, attention_mask, grid) if features else None

    def _checked_grid(self, input_ids, images: list[list]):
        """(features of every image in row order, image_grid_thw [n, 3]); ([], None) without images.
        A ModelError when the batch's image tokens do not match its images."""
        import torch

        flat = [image for row in images for image in row]
        if not flat:
            return [], None
        features = [self.features(image) for image in flat]
        grid = torch.tensor([f.grid_thw for f in features], dtype=torch.long, device=input_ids.device)
        expected = sum(f.tokens for f in features)
        found = int((input_ids == self.image_token_id).sum())
        if found != expected:
            raise ModelError(f"the batch holds {found} image tokens but its {len(flat)} image(s) need {expected}; "
                             "image placeholders were not expanded (model/vision.py Vision.expand)")
        return features, grid

    def position_ids(self, model, input_ids, attention_mask, grid):
        """[3, B, L] multimodal positions from the model's own `get_rope_index`."""
        owner = rope_owner(model)
        token_types = (input_ids == self.image_token_id).int()
        kwargs = {"image_grid_thw": grid, "attention_mask": attention_mask}
        if "mm_token_type_ids" in inspect.signature(owner.get_rope_index).parameters:
            kwargs["mm_token_type_ids"] = token_types
        positions, _ = owner.get_rope_index(input_ids, **kwargs)
        return positions


def rope_owner(model):
    """The module with `get_rope_index` (Qwen*-VL's inner model), under peft or FSDP wrappers."""
    seen, queue = set(), [model]
    while queue:
        module = queue.pop(0)
        if id(module) in seen or module is None:
            continue
        seen.add(id(module))
        if callable(getattr(module, "get_rope_index", None)):
            return module
        for name in ("model", "base_model", "module"):
            queue.append(getattr(module, name, None))
    raise ModelError(f"{type(model).__name__} has no get_rope_index; metis handles images for Qwen2-VL, "
                     "Qwen2.5-VL and Qwen3-VL style models")


def vision_for(model, processor) -> Vision | None:
    """A `Vision` for a vision-language model (its config has vision_config), else None."""
    config = getattr(model, "config", None)
    if processor is None or getattr(config, "vision_config", None) is None:
        return None
    return Vision(processor, config)


def load_vision(path: str, *, model=None, trust_remote_code: bool = False, field: str = "model.name_or_path"):
    """`Vision` for the model folder at `path` when it is a vision-language model, else None; the
    config comes from `model` when it is loaded, else from the folder (vLLM holds the weights)."""
    from metis_cli.model.processor import is_vision_language, load_processor

    if not is_vision_language(path, trust_remote_code=trust_remote_code):
        return None
    processor = load_processor(path, field=field, trust_remote_code=trust_remote_code)
    if model is not None:
        return Vision(processor, model.config)
    from transformers import AutoConfig

    from metis_cli.model.loading import adapter_base

    source = adapter_base(path) if (Path(path) / "adapter_config.json").exists() else path
    return Vision(processor, AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code))
