"""Worker of tests/test_distributed.py::test_shared_prompt_logprobs_under_fsdp (run by torchrun,
2 processes): each rank takes one group of rollouts that share a prompt, computes
`grouped_token_logprobs` through the FSDP2-sharded model and backpropagates; the gathered
gradient must equal one process's gradient over both groups. Prints the worst difference."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from metis_cli.train.distributed import init_distributed, shard_model, teardown
from metis_cli.train.logprobs import grouped_token_logprobs


def batch(rows, prompts):
    width = max(len(tokens) for _, tokens in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (_, tokens) in enumerate(rows):
        ids[i, : len(tokens)], mask[i, : len(tokens)] = tokens, 1
    return ids, mask, torch.tensor([len(prompts[group]) for group, _ in rows])


def logprob_sum(model, rows, prompts) -> torch.Tensor:
    logp, _ = grouped_token_logprobs(model, *batch(rows, prompts))
    return logp.sum()


def main(model_dir: str) -> None:
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    torch.manual_seed(0)
    prompts = [torch.randint(5, 200, (7,)), torch.randint(5, 200, (9,))]
    rows = [(g, torch.cat([prompts[g], torch.randint(5, 200, (3 + k + g,))])) for g in range(2) for k in range(2)]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    logprob_sum(reference, rows, prompts).backward()
    recipe = SimpleNamespace(model=SimpleNamespace(dtype="float32"),
                             run=SimpleNamespace(distributed=SimpleNamespace(strategy="fsdp", gradient_checkpointing=False)))
    model = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), recipe, context)
    mine = [row for row in rows if row[0] == context.rank]  # a group never splits across ranks
    (logprob_sum(model, mine, prompts) * context.world_size).backward()  # FSDP averages over ranks
    expected = dict(reference.named_parameters())
    worst = max(float((p.grad.full_tensor() - expected[name].grad).abs().max()) for name, p in model.named_parameters())
    if context.is_main:
        print(f"worst gradient difference {worst}")
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
