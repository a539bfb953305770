"""The `zoom_in` tool: crop a box of one of the conversation's images and return it enlarged.

Arguments follow DeepEyes' zoom-in tool: `{"bbox_2d": [x1, y1, x2, y2], "image_index": 0}` (an
optional `label` is accepted and ignored). Coordinates are pixels of that image, or, with
`coordinates: relative`, Qwen3-VL's grounding scale (0-1000 of each side). The crop (data/images.py
`zoom`: clipped to the image, widened to 32 px like the official tool code) is scaled to
`min_pixels`..`max_pixels` pixels and returned as the next image of the conversation; the
observation text says which box was cropped and the new image's index.

A box that cannot be cropped (reversed, outside the image, not four numbers) or an image index
the conversation does not have is a tool error the model sees.
"""

from __future__ import annotations

import time

from metis_cli.agent.tools.base import ToolContext, ToolErrorKind, ToolResult, error_result
from metis_cli.data.images import zoom, zoom_text

RELATIVE_SCALE = 1000
DEFAULT_MIN_PIXELS = 256 * 32 * 32
DEFAULT_MAX_PIXELS = 1024 * 32 * 32
"""256 to 1024 Qwen3-VL image tokens (32x32 pixels each after the 2x2 merge)."""


class ZoomInTool:
    """Crops and enlarges a region of an image in the conversation."""

    name = "zoom_in"
    needs_context = True
    description = "Crop a region of an image and return it enlarged."

    def __init__(self, *, coordinates: str = "pixels", min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if coordinates not in ("pixels", "relative"):
            raise ValueError(f"coordinates must be 'pixels' or 'relative', got {coordinates!r}")
        self.coordinates = coordinates
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        unit = "in pixels of the image" if coordinates == "pixels" else \
            f"in 0-{RELATIVE_SCALE} of the image's width and height"
        # The pixel spec is data/synthetic_vl.py's ZOOM_IN_TOOL_SPEC (kept equal by a test): the
        # tiny vision tokenizer is trained on its text.
        self.parameters = {
            "type": "object",
            "properties": {
                "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                            "description": f"The region [x1, y1, x2, y2] {unit}."},
                "image_index": {"type": "integer", "minimum": 0,
                                "description": "Which image of the conversation (0 = the first)."},
                "label": {"type": "string", "description": "What the region shows (optional)."},
            },
            "required": ["bbox_2d"],
            "additionalProperties": False,
        }

    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        started = time.perf_counter()
        images = context.images
        index = arguments.get("image_index", 0)
        if not images:
            return error_result(ToolErrorKind.TOOL_ERROR, "there is no image in this conversation to zoom into")
        if index >= len(images):
            return error_result(ToolErrorKind.TOOL_ERROR, f"image_index {index} does not exist; the conversation "
                                f"has {len(images)} image(s), numbered 0 to {len(images) - 1}")
        image = images[index]
        bbox = arguments["bbox_2d"]
        if self.coordinates == "relative":
            if not all(0 <= value <= RELATIVE_SCALE for value in bbox):
                return error_result(ToolErrorKind.TOOL_ERROR, f"bbox_2d values must lie within 0-{RELATIVE_SCALE} "
                                    "(relative coordinates)")
            bbox = [value * side / RELATIVE_SCALE for value, side in zip(bbox, image.size * 2)]
        try:
            zoomed, box = zoom(image, bbox, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as problem:
            return error_result(ToolErrorKind.TOOL_ERROR, str(problem), time.perf_counter() - started)
        if self.coordinates == "relative":
            box = tuple(round(value * RELATIVE_SCALE / side) for value, side in zip(box, image.size * 2))
        return ToolResult(text=zoom_text(box, index, len(images)), images=[zoomed],
                          runtime_s=time.perf_counter() - started)
