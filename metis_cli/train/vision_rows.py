"""SFT rows of conversations with images: token ids, assistant mask and the images they show.

`tokenize_runs` (data/chat.py) cuts a conversation into sequences with one `<|image_pad|>` per
image; here each pad is expanded to its image's token count (model/vision.py `Vision.expand`,
mask 0 on every copy), so the ids are exactly what the rollout engine feeds the model for the
same conversation. A sequence that re-renders the conversation from its start (a new question
under a Qwen3-style template) shows the conversation's first k images again, k its pads.

`forward_inputs` is the extra forward arguments of a collated batch of such rows.

Must not touch: the chat cut itself (data/chat.py) or reading images (data/images.py).
"""

from __future__ import annotations

from metis_cli.data.chat import tokenize_runs

VisionRow = tuple
"""(ids, mask, images): an SFT sequence of a vision-language conversation, a text row's
`(ids, mask)` plus its images in order of their expanded pads."""


def tokenize_with_images(tokenizer, vision, conversation: list[dict], tools: list[dict] | None, images: list,
                         *, where: str) -> list[VisionRow]:
    """(ids, mask, images) rows of `conversation` whose images (PIL, in order of appearance) are `images`."""
    rows = []
    for ids, mask in tokenize_runs(tokenizer, conversation, tools):
        shown = sum(token == vision.image_token_id for token in ids)
        if shown > len(images):
            vision.expand(ids, images, where=where)  # raises: more placeholders than images
        row_images = list(images[:shown])
        expanded, expanded_mask, _ = vision.expand(ids, row_images, mask=mask, where=where)
        rows.append((expanded, expanded_mask, tuple(row_images)))
    if rows and max(len(row[2]) for row in rows) != len(images):
        vision.expand([], images, where=where)  # raises: fewer placeholders than images
    return rows


def forward_inputs(vision, model, input_ids, attention_mask, rows) -> dict:
    """pixel_values, image_grid_thw and position_ids of a collated batch of `rows` ({} when
    no row is a VisionRow with images)."""
    images = [list(row[2]) if len(row) > 2 else [] for row in rows]
    if vision is None or not any(images):
        return {}
    return vision.forward_inputs(model, input_ids, attention_mask, images)
