"""Worker of tests/test_distributed.py::test_one_hdpo_update_on_two_processes_equals_one_process
(run by torchrun, 2 processes): the same fixed, teacher-forced rollouts go through one RL update
on one unsharded model (every rank computes it alone) and through `stages.hdpo_dist.update_share`
on the FSDP2-sharded model, each rank training only its own groups. Groups have uneven sizes (a
lone rollout, a rollout not kept), so one rank has fewer micro-batches than the other and the
ranks disagree on prompt KV reuse at some positions: padding and the agreed forward passes are
exercised. The `ptx` setting adds the rehearsal loss (`stages.hdpo_ptx`, 4 rows per optimizer
step, 2 on each rank). Prints one JSON line per setting on rank 0: figures of both, the worst
weight difference after the update, and how far the least moved tensor moved (the update is real)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from metis_cli.agent.rollout import Rollout
from metis_cli.algo.types import Advantages, ScoredBatch
from metis_cli.recipe.load import load_recipe
from metis_cli.stages.hdpo_dist import Replicas, share, update_share
from metis_cli.stages.hdpo_ptx import Rehearsal
from metis_cli.stages.hdpo_update import policy_update
from metis_cli.train.distributed import init_distributed, shard_model, teardown
from metis_cli.train.optimizer import MasterWeights

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
GROUP_SIZES = [3, 2, 1, 3, 2]  # rank 0 trains groups 0, 2, 4 (6 rollouts), rank 1 groups 1, 3 (5)
SETTINGS = {
    "on_policy": ["hdpo.micro_batch_size=2"],
    "off_policy": ["hdpo.micro_batch_size=2", "hdpo.mini_batches=2", "hdpo.ppo_epochs=2", "hdpo.dual_clip_c=3"],
    "ptx": ["hdpo.micro_batch_size=2", "hdpo.mini_batches=2"],
}


def fixed_rollouts(vocab_size: int) -> list[Rollout]:
    """Each group: one 5-token prompt, continuations of 6-9 sampled tokens around a 2-token tool turn."""
    generator = torch.Generator().manual_seed(11)
    rollouts = []
    for group, size in enumerate(GROUP_SIZES):
        prompt = torch.randint(3, vocab_size, (5,), generator=generator).tolist()
        for sample in range(size):
            length = 6 + (group + sample) % 4
            continuation = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
            sampled = [0 if 2 <= t < 4 else 1 for t in range(length)]
            rollouts.append(Rollout(group, sample, prompt + continuation, 5, [0] * 5 + sampled,
                                    [0.0] * 5 + [-1.5 * s for s in sampled], messages=[]))
    return rollouts


def step_batch(rollouts: list[Rollout]) -> tuple[ScoredBatch, Advantages]:
    n = len(rollouts)
    generator = torch.Generator().manual_seed(5)
    keep = torch.ones(n, dtype=torch.bool)
    keep[4] = False  # group 1's second rollout is not trained on
    a_tool = torch.randn(n, generator=generator) * (torch.arange(n) % 3 == 0)
    zeros = torch.zeros(n)
    batch = ScoredBatch(zeros, zeros, torch.ones(n, dtype=torch.bool), torch.tensor([r.prompt_index for r in rollouts]),
                        zeros, keep)
    return batch, Advantages(torch.randn(n, generator=generator), a_tool)


def rehearsal(vocab_size: int, rank: int, world_size: int) -> Rehearsal:
    """Seven rows of 6-8 tokens, the last 3-5 trained; 4 per optimizer step, so the walk wraps."""
    generator = torch.Generator().manual_seed(3)
    rows = []
    for i in range(7):
        ids = torch.randint(3, vocab_size, (6 + i % 3,), generator=generator).tolist()
        rows.append((ids, [0] * 3 + [1] * (len(ids) - 3)))
    return Rehearsal(rows, coef=0.5, batch_size=4, run_seed=0, pad_token_id=0, micro_batch_size=1,  # several forwards
                     rank=rank, world_size=world_size)


def compare(model_dir: str, overrides: list[str], context, ptx: bool = False) -> dict:
    cfg = load_recipe(TINY_RECIPE, overrides).hdpo
    recipe = load_recipe(TINY_RECIPE, ["model.dtype=float32"])
    common = dict(pad_token_id=0, temperature=1.0, device=torch.device("cpu"))

    torch.manual_seed(0)
    alone = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    rollouts = fixed_rollouts(alone.config.vocab_size)
    batch, advantages = step_batch(rollouts)
    index = batch.keep.nonzero().squeeze(-1)
    device = common["device"]
    alone_rehearsal = rehearsal(alone.config.vocab_size, 0, 1)
    rehearse_one = (lambda i, scope: alone_rehearsal.backward(alone, i, device, scope)) if ptx else None
    one = policy_update(alone, MasterWeights(alone, lr=1e-3, weight_decay=0.0), [rollouts[i] for i in index.tolist()],
                        advantages.select(index), cfg, rehearse=rehearse_one, **common)

    sharded = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train(), recipe, context)
    groups = share(list(range(len(GROUP_SIZES))), Replicas(context))
    mine = [r for r in rollouts if r.prompt_index in groups]
    shared_rehearsal = rehearsal(alone.config.vocab_size, context.rank, context.world_size)
    rehearse_two = (lambda i, scope: shared_rehearsal.backward(sharded, i, device, scope)) if ptx else None
    two = update_share(sharded, MasterWeights(sharded, lr=1e-3, weight_decay=0.0), mine, rollouts, batch, advantages,
                       cfg, context, rehearse=rehearse_two, **common)
    expected = dict(alone.named_parameters())
    worst = max(float((p.detach().full_tensor() - expected[name].detach()).abs().max())
                for name, p in sharded.named_parameters())
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters()
    moved = min(float((expected[name].detach() - p.detach()).abs().max()) for name, p in initial)
    return {"loss": [one.loss, two.loss], "loss_tool": [one.loss_tool, two.loss_tool],
            "grad_norm": [one.grad_norm, two.grad_norm], "entropy": [one.entropy, two.entropy],
            "ptx_loss": [one.ptx_loss, two.ptx_loss],
            "worst_weight_difference": worst, "least_moved_weight": moved}


def main(model_dir: str) -> None:
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    for name, overrides in SETTINGS.items():
        result = compare(model_dir, overrides, context, ptx=name == "ptx")
        if context.is_main:
            print(json.dumps({"setting": name, **result}), flush=True)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
