"""Rehearsal during RL (`hdpo.ptx`, the PPO-ptx term of InstructGPT): every optimizer step of the
policy update also trains `coef` x the token-mean SFT cross-entropy of `batch_size` rows of
`hdpo.ptx.data`, so what SFT taught (answers RL only rehearses where a group happens to be mixed)
is not eroded by the policy-gradient steps. Off by default (coef 0), as in the paper.

    L = w_acc * L_acc + w_tool * L_tool + coef * mean_{assistant tokens of the rows} CE

The rows are tokenized like SFT's (`data.chat.tokenize_runs`, the assistant-token mask; rows
longer than `sft.max_seq_len` are dropped), padded, in forwards of `hdpo.micro_batch_size` rows
each (the token mean is over all of them, counted before the first forward). With
`hdpo.ptx.train_after` (e.g. "<answer>") a row trains only its assistant tokens after the first
occurrence of that text (`after_marker`): the rehearsal then keeps the answers sure without also
teaching the choice to answer directly, which would reward skipping the tool under any estimator. Which rows:
the k-th optimizer step of the run (k = step x ppo_epochs x mini_batches + its index in the
step) takes positions k*B .. (k+1)*B - 1 of a seeded walk through the rows in epochs
(`stages.hdpo_step.seeded_walk`), so a resumed run rehearses what the killed one would have.
With several processes each takes positions rank, rank + N, ... of those B (B must be a
multiple of N, `stages.hdpo_dist.check`: each FSDP forward is a collective), the token mean is
over every process's rows, and the gradient equals one process's on all B rows.

Must not touch: the RL loss, advantages, the optimizer step (`stages.hdpo_update` calls
`Rehearsal.backward` before it).
"""

from __future__ import annotations

from dataclasses import dataclass

from metis_cli.errors import DataError
from metis_cli.model.runtime import HDPO_PTX_ORDER_SEED
from metis_cli.stages.hdpo_step import seeded_walk


@dataclass
class Rehearsal:
    rows: list[tuple[list[int], list[int]]]  # (ids, assistant mask) per row
    coef: float
    batch_size: int
    run_seed: int
    pad_token_id: int
    micro_batch_size: int = 16
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_recipe(cls, recipe, tokenizer, tools: list[dict] | None, *, rank: int = 0, world_size: int = 1,
                    quiet: bool = True) -> Rehearsal | None:
        """The rehearsal of `recipe.hdpo.ptx`, or None when it is off. `tools`: the tool specs the
        rollouts render (the registry's), so rehearsed rows are rendered as the prompts are."""
        from metis_cli.data.chat import tokenize_runs
        from metis_cli.data.sources import load_sources
        from metis_cli.telemetry.progress import spinner

        cfg = recipe.hdpo.ptx
        if not cfg.enabled:
            return None
        tools = tools or None
        rows, seen = [], {}
        with spinner("hdpo: tokenizing the rehearsal rows (hdpo.ptx)", quiet=quiet):
            for example in load_sources(cfg.data, recipe, need_answer=False):
                conversation = example.trajectory or example.messages
                if example.images:
                    raise DataError(f"hdpo.ptx.data: example {example.id} has images; rehearsal trains on text rows only")
                if not any(m["role"] == "assistant" for m in conversation):
                    raise DataError(f"hdpo.ptx.data: example {example.id} has no assistant turn to rehearse")
                key = repr(conversation)
                if key not in seen:
                    runs = tokenize_runs(tokenizer, conversation, tools)
                    if cfg.train_after is not None:
                        runs = [(ids, after_marker(tokenizer, ids, mask, cfg.train_after)) for ids, mask in runs]
                    seen[key] = [(list(ids), list(mask)) for ids, mask in runs
                                 if len(ids) <= recipe.sft.max_seq_len and any(mask[1:])]
                rows += seen[key]
        if not rows:
            marker = f", or has no assistant token after train_after {cfg.train_after!r}" if cfg.train_after else ""
            raise DataError(f"hdpo.ptx.data: no row to rehearse (every one is empty or longer than "
                            f"sft.max_seq_len = {recipe.sft.max_seq_len}{marker})")
        return cls(rows, cfg.coef, cfg.batch_size, recipe.run.seed, tokenizer.pad_token_id,
                   recipe.hdpo.micro_batch_size, rank, world_size)

    def rows_for(self, update_index: int) -> list[tuple[list[int], list[int]]]:
        """This process's rows of the run's `update_index`-th optimizer step (from 0)."""
        walk = seeded_walk(len(self.rows), update_index * self.batch_size, self.batch_size,
                           HDPO_PTX_ORDER_SEED, self.run_seed)
        return [self.rows[i] for i in walk[self.rank :: self.world_size]]

    def backward(self, model, update_index: int, device, scope=None) -> float:
        """Backpropagate coef x the token-mean cross-entropy of the step's rows into `model`'s
        gradients, `micro_batch_size` rows per forward; returns this process's share of that mean
        (the shares sum to the step's). Every process runs the same number of forwards (its share
        of the rows is the same size), as FSDP's collectives need."""
        from metis_cli.train.sft_batch import collate_padded, loss_sum

        rows = self.rows_for(update_index)
        count = sum(sum(mask[1:]) for _, mask in rows)  # the targets loss_sum counts
        tokens = max(float(count) if scope is None else scope.total(float(count)), 1.0)
        scale = self.coef / tokens * (1 if scope is None else scope.world_size)  # FSDP averages over processes
        total = 0.0
        for start in range(0, len(rows), self.micro_batch_size):
            part, _ = loss_sum(model, collate_padded(rows[start:start + self.micro_batch_size], self.pad_token_id, device))
            (part * scale).backward()
            total += float(part.detach())
        return total / tokens


def after_marker(tokenizer, ids: list[int], mask: list[int], marker: str) -> list[int]:
    """`mask` with every position up to the end of the first `marker` that starts on an assistant
    token set to 0 (all zeros when there is none). The marker is found as its own token ids, or,
    where the tokenizer merges it with its neighbours, as the shortest decoded prefix holding it."""
    pattern = tokenizer.encode(marker, add_special_tokens=False)
    end = None
    for start in range(len(ids) - len(pattern) + 1):
        if mask[start] and ids[start:start + len(pattern)] == pattern:
            end = start + len(pattern)
            break
    if end is None:
        first = next((t for t, m in enumerate(mask) if m), None)
        if first is None or marker not in tokenizer.decode(ids[first:]):
            return [0] * len(mask)
        low, high = first + 1, len(ids)  # the shortest prefix from `first` whose text holds the marker
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if marker in tokenizer.decode(ids[first:middle]) else (middle + 1, high)
        end = low
    return [0] * end + list(mask[end:])

