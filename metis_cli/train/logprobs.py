"""Per-token log-probs (and entropy) of a batch under a model, the trainer's side of the
log-prob definition in agent/backend.py: `log_softmax(logits / temperature)[token]`.

Two ways to get them for a batch of rollouts:
- `token_logprobs`: one forward over every full row.
- `grouped_token_logprobs`: the rollouts of one prompt (a group, G of them) share their prompt
  tokens, so each distinct prompt runs once, its KV cache is copied to the group's rows and only
  the continuations (assistant turns and tool turns) run per row. Forward and backward over the
  prompt cost 1/G of the plain way; with long system prompts and tool listings that is most of the
  update. Same numbers as `token_logprobs` on every continuation token (float rounding aside).
`micro_batches_by_prompt` splits a batch so that whole groups land in one micro-batch.

Images (vision-language policies): both take `vision` (model/vision.py) and `images`, each row's
images in order of its expanded image pads. The plain pass gives the model every row's pixel
values and multimodal position ids. The grouped pass computes the rows' position ids once over
the full rows, gives the prompt pass the distinct prompts' images (rows share a prompt only when
their prompt tokens *and* prompt images are the same) and the continuation pass the images tools
returned inside the rollouts, each with its slice of those positions.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from metis_cli.model.loading import unwrapped
from metis_cli.train import logit_chunks

DEFAULT_LOGITS_BUDGET_MIB = 1024.0
"""fp32 logits a pass may hold at once before its LM head runs in chunks (train/logit_chunks.py);
None: never chunk."""


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   temperature: float = 1.0, with_entropy: bool = False, vision=None, images=None,
                   logits_budget_mib: float | None = DEFAULT_LOGITS_BUDGET_MIB):
    """Log-prob of every token given its prefix.

    Args: input_ids, attention_mask: [N, L].
    Returns: logp [N, L] float32 where column t is log p(input_ids[:, t] | input_ids[:, :t]) and
    column 0 is 0 (no prefix); entropy [N, L] of the same distributions (or None).
    """
    extra = vision.forward_inputs(model, input_ids, attention_mask, images) if vision is not None and images else {}
    chunk = logit_chunks.chunk_for(model, input_ids.numel(), logits_budget_mib)
    if chunk:  # the last position predicts nothing: target 0, dropped below
        targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
        with logit_chunks.chunked_head(model, targets, temperature=temperature, with_entropy=with_entropy, chunk=chunk):
            out = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, :-1]
        picked, entropy = logit_chunks.split(out, with_entropy)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, :-1]
        picked, entropy = _pick(logits, input_ids[:, 1:], temperature, with_entropy)
    zeros = torch.zeros_like(picked[:, :1])
    return torch.cat([zeros, picked], dim=1), (torch.cat([zeros, entropy], dim=1) if with_entropy else None)


def grouped_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
                           *, temperature: float = 1.0, with_entropy: bool = False, vision=None, images=None,
                           logits_budget_mib: float | None = DEFAULT_LOGITS_BUDGET_MIB):
    """`token_logprobs` on the continuation tokens, running each distinct prompt once.

    Rows whose first `prompt_lens` tokens are identical share one prompt pass (rows are grouped by
    those tokens themselves, so a wrong grouping cannot happen). The prompt pass is batched over
    the distinct prompts, left-padded; its KV cache is indexed out to the rows (autograd flows back
    through it, so the prompt's hidden states get their gradient); then the continuations run
    right-padded against the full attention mask with explicit position ids. The first
    continuation token's log-prob comes from the prompt's last-position logits.

    Args:
        input_ids, attention_mask: [N, L] right-padded rows (as in agent.rollout.RolloutBatch).
        prompt_lens: [N] long, tokens of each row's prompt; each >= 1 and <= its row's length.
    Returns:
        logp [N, L] float32: column t (prompt_lens[i] <= t < row length) is
        log p(input_ids[i, t] | input_ids[i, :t]), as `token_logprobs` gives it; prompt columns and
        padding are 0 (the prompt is never trained on). entropy [N, L] likewise (or None).
    Falls back to one plain forward (prompt columns then zeroed too) when no prompt is shared by
    two rows, no row has a continuation, or the model cannot share a prompt (`_shares_prompts`).
    """
    rows, width = input_ids.shape
    lengths = attention_mask.sum(1)
    prompt_lens = prompt_lens.to(input_ids.device)
    if bool((prompt_lens < 1).any()) or bool((prompt_lens > lengths).any()):
        raise ValueError("grouped_token_logprobs: every prompt_lens must be in [1, row length]")
    if vision is None or not images or not any(images):
        vision = images = None
    split = _split_images(vision, input_ids, prompt_lens, images) if vision is not None else None
    prompt_of_row, prompts = _distinct_prompts(input_ids, prompt_lens, None if split is None else split[0])
    continuation_width = int((lengths - prompt_lens).max())
    plain = {"vision": vision, "images": images, "logits_budget_mib": logits_budget_mib}
    if len(prompts) == rows or continuation_width == 0 or not _shares_prompts(model):
        return _plain_continuations(model, input_ids, attention_mask, prompt_lens, temperature, with_entropy, plain)
    prompt_extra, rest_extra = {}, {}
    if vision is not None:
        prompt_extra, rest_extra = _vision_passes(model, vision, input_ids, attention_mask, prompt_lens, prompt_of_row,
                                                  prompts, split, continuation_width)

    # Prompt pass: [P, Lp] left-padded, positions counted over real tokens only.
    prompt_width = max(len(p) for p in prompts)
    prompt_ids = input_ids.new_zeros((len(prompts), prompt_width))
    prompt_mask = attention_mask.new_zeros((len(prompts), prompt_width))
    for number, tokens in enumerate(prompts):
        prompt_ids[number, prompt_width - len(tokens):] = tokens
        prompt_mask[number, prompt_width - len(tokens):] = 1
    prompt_positions = prompt_extra.pop("position_ids", None)
    if prompt_positions is None:
        prompt_positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    prompt_out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                       use_cache=True, **keep_last, **prompt_extra)
    cache = prompt_out.past_key_values
    if not _is_plain_dynamic_cache(cache) or cache.get_seq_length() != prompt_width:
        return _plain_continuations(model, input_ids, attention_mask, prompt_lens, temperature, with_entropy, plain)
    first_logits = prompt_out.logits[:, -1][prompt_of_row]  # [N, V]: predicts each row's first continuation token
    cache.batch_select_indices(prompt_of_row)  # [P, H, Lp, D] -> [N, H, Lp, D] per layer, differentiable

    # Continuation pass: [N, Lc] right-padded; column j is row token prompt_lens + j.
    columns = prompt_lens.unsqueeze(1) + torch.arange(continuation_width, device=input_ids.device)  # [N, Lc]
    continuation_mask = (columns < lengths.unsqueeze(1)).to(attention_mask.dtype)
    continuation_ids = input_ids.gather(1, columns.clamp(max=width - 1))
    first, first_entropy = _pick(first_logits.unsqueeze(1), continuation_ids[:, :1], temperature, with_entropy)
    picked, entropy = first, first_entropy
    if continuation_width > 1:
        rest_positions = rest_extra.pop("position_ids", columns[:, :-1])
        chunk = logit_chunks.chunk_for(model, continuation_ids[:, 1:].numel(), logits_budget_mib)
        with (logit_chunks.chunked_head(model, continuation_ids[:, 1:], temperature=temperature,
                                        with_entropy=with_entropy, chunk=chunk) if chunk else nullcontext()):
            rest_out = model(input_ids=continuation_ids[:, :-1], attention_mask=torch.cat(
                                 [prompt_mask[prompt_of_row], continuation_mask[:, :-1]], dim=1),
                             position_ids=rest_positions, past_key_values=cache, use_cache=True, **rest_extra).logits
        rest, rest_entropy = (logit_chunks.split(rest_out, with_entropy) if chunk else
                              _pick(rest_out, continuation_ids[:, 1:], temperature, with_entropy))
        picked = torch.cat([first, rest], dim=1)
        entropy = torch.cat([first_entropy, rest_entropy], dim=1) if with_entropy else None

    # Back to the rows' own columns; padded continuation columns land past each row's end (and
    # past L when needed), so every scatter target is distinct.
    def place(values):
        values = torch.where(continuation_mask > 0, values, torch.zeros_like(values))
        return values.new_zeros((rows, width + continuation_width)).scatter(1, columns, values)[:, :width]

    return place(picked), (place(entropy) if with_entropy else None)


def micro_batches_by_prompt(group_ids: torch.Tensor, lengths: torch.Tensor, size: int,
                            max_tokens: int | None = None) -> list[torch.Tensor]:
    """Row indices of micro-batches of at most `size` rows that keep groups (rows with one
    group id) together, so `grouped_token_logprobs` runs each prompt once per micro-batch.

    With `max_tokens`, a micro-batch also holds at most that many padded tokens (its rows x its
    longest row), as verl's token-budget micro-batches do: short rollouts share a forward, long
    ones get one of their own (a single row longer than the budget still runs, alone).
    Groups are taken longest first (micro-batches of similar length pad less) and packed whole;
    a group larger than `size` (or than the budget allows) is cut into pieces.
    Args: group_ids, lengths: [N]. Returns: list of [n_b] long tensors covering every row once.
    """
    pieces = []
    for group in group_ids.unique():
        rows = (group_ids == group).nonzero().squeeze(-1)
        rows = rows[torch.argsort(lengths[rows], descending=True)]
        pieces += list(rows.split(_rows_that_fit(size, max_tokens, int(lengths[rows].max()))))
    pieces.sort(key=lambda piece: -int(lengths[piece].max()))
    batches, current = [], []
    for piece in pieces:
        count = sum(len(p) for p in current) + len(piece)
        if current and count > _rows_that_fit(size, max_tokens, int(lengths[current[0]].max())):
            batches.append(torch.cat(current))
            current = []
        current.append(piece)
    if current:
        batches.append(torch.cat(current))
    return batches


def _rows_that_fit(size: int, max_tokens: int | None, longest: int) -> int:
    """Rows of `longest` tokens a micro-batch may hold: `size`, fewer under `max_tokens`, >= 1."""
    return size if max_tokens is None else max(1, min(size, max_tokens // max(longest, 1)))


def _pick(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """logits [N, T, V] predicting targets [N, T] -> (log-prob [N, T], entropy [N, T] or None)."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    log_probs = F.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
    return picked, entropy


def _plain_continuations(model, input_ids, attention_mask, prompt_lens, temperature, with_entropy, plain=None):
    """`token_logprobs` with prompt and padding columns zeroed, so both paths return one layout."""
    logp, entropy = token_logprobs(model, input_ids, attention_mask, temperature=temperature, with_entropy=with_entropy,
                                   **(plain or {}))
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    continuation = (columns >= prompt_lens.unsqueeze(1)) & (attention_mask > 0)
    return logp * continuation, (entropy * continuation if entropy is not None else None)


def _distinct_prompts(input_ids: torch.Tensor, prompt_lens: torch.Tensor, prompt_images: list[list] | None = None):
    """([N] long index of each row's prompt, list of P distinct prompts as 1-D token tensors).
    With `prompt_images` (each row's prompt images) a prompt is its tokens and those image objects."""
    index: dict[tuple, int] = {}
    prompt_of_row = []
    for number, (row, length) in enumerate(zip(input_ids, prompt_lens.tolist())):
        seen = tuple(id(image) for image in prompt_images[number]) if prompt_images is not None else ()
        prompt_of_row.append(index.setdefault((tuple(row[:length].tolist()), seen), len(index)))
    prompts = [torch.tensor(key[0], dtype=input_ids.dtype, device=input_ids.device) for key in index]
    return torch.tensor(prompt_of_row, device=input_ids.device), prompts


def _split_images(vision, input_ids, prompt_lens, images):
    """(each row's prompt images, each row's continuation images): a row's first k images are
    its prompt's, k the image runs within its prompt tokens."""
    prompt_images, continuation_images = [], []
    for row, length, row_images in zip(input_ids, prompt_lens.tolist(), images):
        k = vision.count_images(row[:length].tolist())
        prompt_images.append(list(row_images[:k]))
        continuation_images.append(list(row_images[k:]))
    return prompt_images, continuation_images


def _vision_passes(model, vision, input_ids, attention_mask, prompt_lens, prompt_of_row, prompts, split,
                   continuation_width):
    """Extra kwargs (pixel values, image grid, 3-D position ids) of the prompt pass and of the
    continuation pass, the positions cut from the full rows' own (module docstring)."""
    prompt_images, continuation_images = split
    all_images = [p + c for p, c in zip(prompt_images, continuation_images)]
    positions = vision.positions(model, input_ids, attention_mask, all_images)
    if positions is None:
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    # Prompt pass: the first row of each distinct prompt stands for it; left-padded like the tokens.
    first_row = [prompt_of_row.tolist().index(number) for number in range(len(prompts))]
    prompt_width = max(len(p) for p in prompts)
    prompt_positions = positions.new_zeros((3, len(prompts), prompt_width))
    for number, row in enumerate(first_row):
        length = len(prompts[number])
        prompt_positions[:, number, prompt_width - length:] = positions[:, row, :length]
    prompt_extra = {"position_ids": prompt_positions}
    distinct_images = [prompt_images[row] for row in first_row]
    if any(distinct_images):
        prompt_extra.update(_pixels(model, vision, distinct_images, input_ids.device))
    # Continuation pass: columns prompt_lens + j, j < continuation_width - 1 (the last is only predicted).
    width = input_ids.shape[1]
    columns = prompt_lens.unsqueeze(1) + torch.arange(continuation_width - 1, device=input_ids.device)
    rest_extra = {"position_ids": positions.gather(2, columns.clamp(max=width - 1)[None].expand(3, -1, -1))}
    if any(continuation_images):
        rest_extra.update(_pixels(model, vision, continuation_images, input_ids.device))
    return prompt_extra, rest_extra


def _pixels(model, vision, images: list[list], device) -> dict:
    features = [vision.features(image) for row in images for image in row]
    dtype = next(model.parameters()).dtype
    return {"pixel_values": torch.cat([f.pixel_values for f in features]).to(device, dtype),
            "image_grid_thw": torch.tensor([f.grid_thw for f in features], dtype=torch.long, device=device)}


def _accepts(model, argument: str) -> bool:
    return argument in inspect.signature(unwrapped(model).forward).parameters


def _shares_prompts(model) -> bool:
    """Whether a KV cache of the prompt can stand in for re-running it: not for recurrent-state
    models, nor sliding-window layers (their cache keeps only a window: rather be plain and exact),
    nor under gradient checkpointing while training (transformers turns the cache off then)."""
    base = unwrapped(model)
    if getattr(base, "_is_stateful", False):
        return False
    if base.training and getattr(base, "is_gradient_checkpointing", False):
        return False
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None) or []
    return all(kind == "full_attention" for kind in layer_types)


def _is_plain_dynamic_cache(cache) -> bool:
    """A cache we can index per row: transformers' DynamicCache of full-attention layers (None e.g.
    when gradient checkpointing turned use_cache off)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)
