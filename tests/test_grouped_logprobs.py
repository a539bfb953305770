"""Prompt sharing in the RL update: `grouped_token_logprobs` runs each distinct prompt once and
must give the same log-probs, entropies and parameter gradients as one plain forward per rollout,
and `stages.hdpo_update.policy_update` built on it must produce the full-batch HDPO gradient and figures."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from metis_cli.agent.rollout import Rollout, RolloutBatch
from metis_cli.algo.losses import hdpo_loss, kl_k3, masked_mean
from metis_cli.algo.types import Advantages
from metis_cli.recipe.load import load_recipe
from metis_cli.stages.hdpo_update import policy_update
from metis_cli.train.logprobs import grouped_token_logprobs, micro_batches_by_prompt, token_logprobs
from metis_cli.train.optimizer import MasterWeights
from metis_cli.model.tiny import build_tiny_model

torch.set_num_threads(1)
TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"

# (prompt name, continuation length): prompts of different lengths, groups of 4, 2 and 1 rollouts,
# a rollout with no continuation at all, continuations from 1 to 12 tokens.
PROMPT_LENGTHS = {"a": 7, "b": 4, "c": 9}
ROWS = [("a", 5), ("a", 12), ("a", 1), ("b", 9), ("b", 3), ("c", 6), ("a", 0)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("grouped") / "model", hidden_size=64, num_layers=2, num_heads=4,
                            intermediate_size=128)


def load(model_dir, attention="sdpa"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    return model.train()


def make_rows(vocab_size: int, rows=ROWS, seed: int = 0):
    """(input_ids [N, L] right-padded, attention_mask [N, L], prompt_lens [N])."""
    generator = torch.Generator().manual_seed(seed)
    prompts = {name: torch.randint(3, vocab_size, (n,), generator=generator) for name, n in PROMPT_LENGTHS.items()}
    sequences = [torch.cat([prompts[name], torch.randint(3, vocab_size, (n,), generator=generator)])
                 for name, n in rows]
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = sequence
        attention_mask[row, :len(sequence)] = 1
    return input_ids, attention_mask, torch.tensor([PROMPT_LENGTHS[name] for name, _ in rows])


def logprobs_and_gradients(model, compute, continuation):
    """Run `compute()`, backprop a masked-mean loss over continuation tokens; (logp, entropy, grads)."""
    model.zero_grad(set_to_none=True)
    logp, entropy = compute()
    masked_mean(logp, continuation).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy, grads


def assert_same(model, input_ids, attention_mask, prompt_lens, temperature=1.0):
    continuation = (torch.arange(input_ids.shape[1]) >= prompt_lens.unsqueeze(1)) & (attention_mask > 0)
    plain, plain_entropy, plain_grads = logprobs_and_gradients(model, lambda: token_logprobs(
        model, input_ids, attention_mask, temperature=temperature, with_entropy=True), continuation)
    grouped, grouped_entropy, grouped_grads = logprobs_and_gradients(model, lambda: grouped_token_logprobs(
        model, input_ids, attention_mask, prompt_lens, temperature=temperature, with_entropy=True), continuation)
    assert grouped.shape == plain.shape
    assert (grouped[continuation] - plain[continuation]).abs().max() < 1e-5
    assert (grouped_entropy[continuation] - plain_entropy[continuation]).abs().max() < 1e-5
    assert bool((grouped[~continuation] == 0).all()), "prompt and padding columns must be 0"
    assert set(grouped_grads) == set(plain_grads) and plain_grads
    for name, grad in plain_grads.items():
        relative = (grouped_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert relative < 1e-4, f"{name}: gradient differs by {relative:.2e} (relative)"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_grouped_logprobs_and_gradients_match_plain_forward(model_dir, attention):
    model = load(model_dir, attention)
    assert_same(model, *make_rows(model.config.vocab_size), temperature=0.7)


def test_grouped_logprobs_match_plain_forward_under_lora(model_dir):
    from peft import LoraConfig, get_peft_model

    model = load(model_dir)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False))
    assert_same(lora, *make_rows(model.config.vocab_size))


def test_each_distinct_prompt_runs_once(model_dir):
    model = load(model_dir)
    input_ids, attention_mask, prompt_lens = make_rows(model.config.vocab_size)
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        grouped_token_logprobs(model, input_ids, attention_mask, prompt_lens)
    finally:
        hook.remove()
    longest_prompt, longest_continuation = max(PROMPT_LENGTHS.values()), max(n for _, n in ROWS)
    # 3 distinct prompts once each, then 7 continuations (the last token needs no logits).
    assert seen == [(3, longest_prompt), (len(ROWS), longest_continuation - 1)]


def test_distinct_prompts_and_gradient_checkpointing_fall_back_exactly(model_dir):
    model = load(model_dir)
    rows = [("a", 4), ("b", 6), ("c", 2)]  # nothing to share
    assert_same(model, *make_rows(model.config.vocab_size, rows))
    model.gradient_checkpointing_enable()  # turns the KV cache off while training
    assert_same(model, *make_rows(model.config.vocab_size))


def test_micro_batches_keep_groups_whole_and_bound_their_size():
    group_ids = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 3, 3, 3])
    lengths = torch.tensor([5, 9, 7, 3, 8, 6, 4, 4, 4, 4, 4])
    batches = micro_batches_by_prompt(group_ids, lengths, size=4)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(group_ids)))
    assert all(len(b) <= 4 for b in batches)
    batches_of_group = {int(g): sum(bool((group_ids[b] == g).any()) for b in batches) for g in group_ids.unique()}
    assert batches_of_group == {0: 1, 1: 1, 2: 1, 3: 2}  # only the group of 5 > 4 rollouts is split


def test_micro_batches_under_a_token_budget():
    group_ids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    lengths = torch.tensor([30, 10, 8, 9, 7, 50, 45, 120])
    batches = micro_batches_by_prompt(group_ids, lengths, size=8, max_tokens=60)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(group_ids)))
    padded = [len(b) * int(lengths[b].max()) for b in batches]
    # the 120-token row runs alone (over the budget, it cannot be cut); every other micro-batch fits
    assert [b.tolist() for b in batches if int(lengths[b].max()) > 60] == [[7]]
    assert all(tokens <= 60 for b, tokens in zip(batches, padded) if int(lengths[b].max()) <= 60)
    # group 2 (50 + 45 tokens) is cut in two; group 1 (3 short rows) stays whole, joined by group 0
    assert sum(bool((group_ids[b] == 2).any()) for b in batches) == 2
    assert sum(bool((group_ids[b] == 1).any()) for b in batches) == 1
    assert micro_batches_by_prompt(group_ids, lengths, size=8, max_tokens=None)[0].numel() == 8


def make_rollouts(vocab_size: int):
    """Rollouts of 3 prompts with a forced (tool) stretch inside some continuations."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in (6, 9, 4)]
    rollouts = []
    for prompt_index, sample_index, continuation in [(0, 0, 7), (0, 1, 11), (0, 2, 3), (1, 0, 5), (1, 1, 8),
                                                     (2, 0, 10), (2, 1, 2), (2, 2, 6)]:
        tokens = torch.randint(3, vocab_size, (continuation,), generator=generator).tolist()
        sampled = [0 if 2 <= t < 4 else 1 for t in range(continuation)]  # tokens 2-3: a tool turn
        prompt = prompts[prompt_index]
        rollouts.append(Rollout(
            prompt_index=prompt_index, sample_index=sample_index, token_ids=prompt + tokens, prompt_len=len(prompt),
            loss_mask=[0] * len(prompt) + sampled,
            sampler_logprobs=[0.0] * len(prompt) + [-1.5 * s for s in sampled], messages=[]))
    return rollouts


@pytest.mark.parametrize("ppo_epochs,kl_coef", [(1, 0.0), (2, 0.1)])
def test_hdpo_update_gives_the_full_batch_gradient_and_figures(model_dir, ppo_epochs, kl_coef):
    model = load(model_dir)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    recipe = load_recipe(TINY_RECIPE, [
        f"hdpo.ppo_epochs={ppo_epochs}", f"hdpo.kl_coef={kl_coef}", "hdpo.micro_batch_size=3", "hdpo.grad_clip=1e9"])
    optimizer = MasterWeights(model, lr=0.0, weight_decay=0.0)  # weights stay put: the last grads are comparable
    rollouts = make_rollouts(model.config.vocab_size)
    a_acc = torch.tensor([1.0, -0.5, -0.5, 0.7, -0.7, 1.2, 0.0, -1.2])
    a_tool = torch.tensor([0.8, -0.8, 0.0, 0.0, 0.0, 0.5, 0.0, -0.5])
    figures = vars(policy_update(model, optimizer, rollouts, Advantages(a_acc, a_tool), recipe.hdpo, pad_token_id=0,
                                 temperature=recipe.rollout.temperature, device=torch.device("cpu"),
                                 reference=reference if kl_coef > 0 else None))
    update_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    cfg = recipe.hdpo
    batch = RolloutBatch.from_rollouts(rollouts, 0)
    model.zero_grad(set_to_none=True)
    logp, entropy = token_logprobs(model, batch.input_ids, batch.attention_mask,
                                   temperature=recipe.rollout.temperature, with_entropy=True)
    parts = hdpo_loss(logp, logp.detach(), batch.loss_mask, a_acc, a_tool, cfg.w_acc, cfg.w_tool, cfg.clip_eps)
    loss = parts.loss
    if kl_coef > 0:
        with torch.no_grad():
            ref_logp, _ = token_logprobs(reference, batch.input_ids, batch.attention_mask,
                                         temperature=recipe.rollout.temperature)
        kl = kl_k3(logp, ref_logp, batch.loss_mask)
        loss = loss + kl_coef * kl
        assert figures["kl"] == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)
    loss.backward()
    for name, p in model.named_parameters():
        relative = (update_grads[name] - p.grad).norm() / p.grad.norm().clamp(min=1e-12)
        assert relative < 1e-4, f"{name}: update gradient differs by {relative:.2e} (relative)"
    assert figures["loss"] == pytest.approx(parts.loss.item(), rel=1e-5, abs=1e-7)
    assert figures["loss_tool"] == pytest.approx(float(parts.loss_tool), rel=1e-5, abs=1e-7)
    assert figures["entropy"] == pytest.approx(float(masked_mean(entropy, batch.loss_mask)), rel=1e-5)
    mismatch = masked_mean((logp.detach() - batch.sampler_logprobs).abs(), batch.loss_mask)
    assert figures["logprob_mismatch"] == pytest.approx(float(mismatch), rel=1e-5)
