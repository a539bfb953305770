"""How a micro-batch of SFT rows becomes one forward pass and a loss sum.

The loss of a micro-batch is the sum, over every assistant token t >= 1 of every row, of the
cross-entropy of predicting token t from tokens 0..t-1 of its own row. Two layouts compute it:

- **padded** (every row type, `sft.packing: false`): one tensor row per sequence, right-padded,
  with an attention mask; vision rows pass their images (`train/vision_rows.forward_inputs`).
- **packed** (text rows, `sft.packing: true`): all rows of the micro-batch in one padding-free
  sequence. Tokens after a row's last target are dropped (they predict nothing that is trained).
  Rows that begin alike (system prompt, tool listing, the same question) share those tokens: the
  sequence holds the prefix tree of the rows, each distinct (prefix, token) once, at the
  position it has in its rows; logits are computed only where a target is predicted, once per
  row that trains on it. Attention is `packed_attention_forward`, registered with transformers
  as `metis_packed` for the packed forward (and any recomputation in backward) only: a token
  attends exactly to the tokens before it in its own rows, never to another row's. So every
  target is predicted from exactly the inputs it has in the padded layout, and the loss (and its
  gradient) is the same up to float rounding -- tests/test_sft_packing.py compares per-token
  losses and gradients of both layouts.

A micro-batch is packed only when all its rows are text rows `(ids, mask)`; a row of another
type (e.g. `(ids, mask, images)`, train/vision_rows.py) sends the whole micro-batch through the
padded layout, decided on the global micro-batch so every rank runs the same layout.
`check_packing` runs both layouts on a few rows once before training and turns packing off with
a warning for a model where they disagree (an attention variant the packed attention does not
reproduce, such as a sliding window shorter than a row).

Must not touch: tokenization (data/chat.py), the step's loss normalisation (stages/sft.py).
"""

from __future__ import annotations

import contextvars
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import islice

import torch
import torch.nn.functional as F

from metis_cli.errors import ModelError
from metis_cli.train import logit_chunks

ATTENTION_NAME = "metis_packed"
CHECK_ROWS = 8
"""Rows `check_packing` compares."""
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
"""Largest per-token loss difference (nats) between the layouts that counts as equal; other
dtypes (bf16, fp16) round far more and get `CHECK_TOLERANCE_LOW_PRECISION`."""
CHECK_TOLERANCE_LOW_PRECISION = 5e-2

_LAYOUT: contextvars.ContextVar["PackLayout | None"] = contextvars.ContextVar("metis_pack_layout", default=None)


def is_packable(row) -> bool:
    """Text rows `(ids, mask)` pack; any other row type (images, ...) goes through padding."""
    return len(row) == 2


@dataclass
class PackLayout:
    """Which tokens each query of a packed sequence may attend to.

    The packed sequence holds the N distinct nodes of the prefix tree of the rows (a token shared
    by rows that agree up to and including it is stored once). A row owns the nodes it added, a
    run of tokens at its end, cut into S pieces (grid rows) of at most L queries; a piece's keys
    are its row's whole path from the root. queries: [S * L] packed positions of each piece's
    nodes, padded to L (padding repeats a real position and is discarded). keys: [S * K] packed
    positions of each piece's path, padded to K. mask: [S, 1, L, K] bool, a query sees the path
    up to its own depth. order: [N] indices into the S x L query grid of the real queries, in
    packed order."""

    rows: int
    width: int
    depth: int
    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    order: torch.Tensor


@dataclass
class PackedRows:
    """input_ids, position_ids: [1, N] (a node's position is its depth in its rows). keep: [T]
    positions whose logits predict a target (a shared node once per row that trains on what
    follows it). targets: [T] token ids."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor
    targets: torch.Tensor
    layout: PackLayout


def _targets(ids: list[int], mask: list[int]) -> list[int]:
    return [t for t in range(1, len(ids)) if mask[t]]


def pack_rows(rows: list[tuple[list[int], list[int]]], device) -> PackedRows:
    """The packed layout of text rows (module docstring)."""
    tokens, depths, children = [], [], []
    root: dict[int, int] = {}
    paths, owned_from, keep, targets = [], [], [], []
    for ids, mask in rows:
        row_targets = _targets(ids, mask)
        row = ids[: row_targets[-1]] if row_targets else ids  # inputs 0..t-1 predict the last target t
        level, path, start = root, [], len(row)
        for depth, token in enumerate(row):
            node = level.get(token)
            if node is None:  # the row leaves the tree here; every later node is new too
                start = min(start, depth)
                node = len(tokens)
                level[token] = node
                tokens.append(token)
                depths.append(depth)
                children.append({})
            path.append(node)
            level = children[node]
        paths.append(path)
        owned_from.append(start)
        keep += [path[t - 1] for t in row_targets]
        targets += [ids[t] for t in row_targets]
    owned = sorted((len(path) - start for path, start in zip(paths, owned_from)), reverse=True)
    # The first row owns its whole path; cut long runs into pieces of the next-longest run's size
    # so that the query grid is not padded to one row's length (a piece keeps the row's keys).
    width = max(owned[1] if len(owned) > 1 else owned[0], 1)
    owners = [(path, begin, min(begin + width, len(path))) for path, start in zip(paths, owned_from)
              for begin in range(start, len(path), width)]
    depth = max(len(path) for path, _, _ in owners)
    queries = [path[min(begin + j, end - 1)] for path, begin, end in owners for j in range(width)]
    keys = [path[min(k, len(path) - 1)] for path, _, _ in owners for k in range(depth)]
    order = [s * width + j for s, (_, begin, end) in enumerate(owners) for j in range(end - begin)]
    own = torch.arange(width)[None, :, None]
    key = torch.arange(depth)[None, None, :]
    begin = torch.tensor([begin for _, begin, _ in owners])[:, None, None]
    length = torch.tensor([len(path) for path, _, _ in owners])[:, None, None]
    mask = (key <= begin + own) & (key < length)
    layout = PackLayout(len(owners), width, depth, *(torch.tensor(x, device=device) for x in (queries, keys)),
                        mask[:, None].to(device), torch.tensor(order, device=device))
    return PackedRows(torch.tensor([tokens], device=device), torch.tensor([depths], device=device),
                      torch.tensor(keep, dtype=torch.long, device=device),
                      torch.tensor(targets, dtype=torch.long, device=device), layout)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, **kwargs):
    """transformers attention function (`metis_packed`) for a packed sequence: query [1, H, N, D],
    key/value [1, H_kv, N, D] -> ([1, N, H, D], None). Each node attends to its path from the
    root (`PackLayout`), as in its own row."""
    layout = _LAYOUT.get()
    if layout is None:
        raise ModelError(f"{ATTENTION_NAME} attention was called outside a packed SFT forward")
    if sliding_window is not None and sliding_window < layout.depth:
        raise ModelError(f"a packed SFT row spans {layout.depth} tokens, more than the model's sliding window "
                         f"({sliding_window}); set sft.packing: false")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: as transformers' repeat_kv
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    heads, dim, rows = query.shape[1], query.shape[-1], layout.rows

    def grid(x, index, width):  # [1, H, N, D] -> [S, H, width, D]
        return x[0].index_select(1, index).view(heads, rows, width, dim).transpose(0, 1)

    queries = grid(query, layout.queries, layout.width)
    keys, values = grid(key, layout.keys, layout.depth), grid(value, layout.keys, layout.depth)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=layout.mask, dropout_p=dropout, scale=scaling)
    out = out.transpose(1, 2).reshape(rows * layout.width, heads, dim).index_select(0, layout.order)
    return out[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)


@contextmanager
def packed_attention(model, layout: PackLayout):
    """Route `model`'s attention through `packed_attention_forward` with `layout` inside the block.
    Wrap the backward too: with gradient checkpointing, backward runs the layers again.
    (No mask is built: transformers skips mask creation for an attention it has no mask for.)"""
    _register()
    configs = _configs(model.config)
    before = [config._attn_implementation_internal for config in configs]
    token = _LAYOUT.set(layout)
    for config in configs:
        config._attn_implementation_internal = ATTENTION_NAME
    try:
        yield
    finally:
        for config, name in zip(configs, before):
            config._attn_implementation_internal = name
        _LAYOUT.reset(token)


def _configs(config) -> list:
    """A model config and its sub-configs (a vision-language model's text config), each once."""
    found = [config]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation_internal"):
            found += [c for c in _configs(sub) if all(c is not f for f in found)]
    return found


@contextmanager
def routing(model, batch):
    """The context a batch's forward and backward run in: packed attention for `PackedRows`."""
    if isinstance(batch, PackedRows):
        with packed_attention(model, batch.layout):
            yield
    else:
        yield


def build(rows: list, *, packing: bool, pad_id: int, device):
    """`PackedRows` when `packing` and every row is a text row, else the padded tensors
    (input_ids, attention_mask, labels, rows)."""
    if packing and all(is_packable(row) for row in rows):
        return pack_rows(rows, device)
    return collate_padded(rows, pad_id, device)


def collate_padded(rows: list, pad_id: int, device):
    """(input_ids, attention_mask, labels, rows): one right-padded tensor row per row; labels
    hold the token where the mask is 1, else -100."""
    width = max(len(row[0]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for index, (ids, mask) in enumerate(row[:2] for row in rows):
        n = len(ids)
        input_ids[index, :n] = torch.tensor(ids)
        attention[index, :n] = 1
        labels[index, :n] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100)
    return input_ids.to(device), attention.to(device), labels.to(device), rows


def loss_sum(model, batch, vision=None) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of the batch's targets, their count) for a batch from `build`; run it
    inside `routing(model, batch)`."""
    losses = _target_losses(model, batch, vision, reduction="sum")
    count = batch.targets.numel() if isinstance(batch, PackedRows) else (batch[2][:, 1:] != -100).sum()
    return losses, int(count)


def token_losses(model, rows: list, *, packing: bool, pad_id: int, device) -> torch.Tensor:
    """Per-target losses of `rows` (row by row, target by target, in either layout), without
    gradient: what `check_packing` and the tests compare between layouts."""
    batch = build(rows, packing=packing, pad_id=pad_id, device=device)
    with torch.no_grad(), routing(model, batch):
        return _target_losses(model, batch, None, reduction="none")


def _target_losses(model, batch, vision, *, reduction: str) -> torch.Tensor:
    from metis_cli.train.logprobs import DEFAULT_LOGITS_BUDGET_MIB

    if isinstance(batch, PackedRows):
        chunk = logit_chunks.chunk_for(model, batch.targets.numel(), DEFAULT_LOGITS_BUDGET_MIB)
        with _chunked(model, batch.targets[None], chunk):
            out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                        logits_to_keep=batch.keep).logits[0]
        if chunk:  # the head gave each target's log-prob (train/logit_chunks.py)
            losses = -out[:, 0]
            return losses.sum() if reduction == "sum" else losses
        return F.cross_entropy(out.float(), batch.targets, reduction=reduction)
    from metis_cli.train.vision_rows import forward_inputs

    input_ids, attention, labels, rows = batch
    images = forward_inputs(vision, model, input_ids, attention, rows)  # {} for text rows
    chunk = logit_chunks.chunk_for(model, input_ids.numel(), DEFAULT_LOGITS_BUDGET_MIB)
    if chunk:
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        with _chunked(model, shifted.clamp(min=0), chunk):
            logp = model(input_ids=input_ids, attention_mask=attention, **images).logits[..., 0]
        losses = -logp[shifted != -100]
        return losses.sum() if reduction == "sum" else losses
    logits = model(input_ids=input_ids, attention_mask=attention, **images).logits[:, :-1]
    targets = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets, ignore_index=-100,
                             reduction=reduction)
    return losses if reduction == "sum" else losses[targets != -100]


def _chunked(model, targets: torch.Tensor, chunk: int):
    """The LM head in chunks of `chunk` positions for `targets` (train/logit_chunks.py), or no change for 0."""
    if not chunk:
        return nullcontext()
    return logit_chunks.chunked_head(model, targets, temperature=1.0, with_entropy=False, chunk=chunk)


def check_packing(model, rows: list, *, pad_id: int, device, dtype=None) -> str | None:
    """None when the packed layout reproduces the padded one's per-token losses on `rows` (the
    first `CHECK_ROWS` text rows), else why not (packing is then turned off). `dtype`: the dtype
    the forward computes in when it is not the parameters' (FSDP's bf16 over fp32 shards)."""
    rows = list(islice((row for row in rows if is_packable(row) and _targets(*row)), CHECK_ROWS))
    if len(rows) < 2:
        return None
    was_training = model.training
    model.eval()
    try:
        packed = token_losses(model, rows, packing=True, pad_id=pad_id, device=device)
        padded = token_losses(model, rows, packing=False, pad_id=pad_id, device=device)
    except Exception as error:  # an architecture the packed forward does not fit
        return f"the packed forward failed ({type(error).__name__}: {error})"
    finally:
        model.train(was_training)
    dtype = dtype or next(model.parameters()).dtype
    tolerance = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE_LOW_PRECISION)
    if packed.shape != padded.shape:
        return f"the packed forward scored {packed.numel()} tokens, the padded one {padded.numel()}"
    gap = float((packed - padded).abs().max())
    if gap > tolerance:
        return f"per-token losses of the packed and padded layouts differ by up to {gap:.2e} (tolerance {tolerance:g})"
    return None


def warn_unpacked(reason: str, model_name: str) -> None:
    warnings.warn(f"sft.packing: {reason} for {model_name}; training with padded batches instead "
                  "(same losses, slower). Set sft.packing: false to silence this.", stacklevel=2)
