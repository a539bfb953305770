"""The RL update's optimizer steps: `hdpo.mini_batches` mini-batches of whole groups per PPO epoch,
old log-probs fixed before the first step (so later steps are off-policy and clipping acts), and
`hdpo.loss_agg` (the batch-wide token mean is independent of the micro-batch size, the per-micro-batch
mean is not)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from metis_cli.agent.rollout import Rollout
from metis_cli.algo.types import Advantages
from metis_cli.recipe.load import load_recipe
from metis_cli.stages.hdpo_update import mini_batch_rows, policy_update
from metis_cli.train.optimizer import MasterWeights

torch.set_num_threads(1)
TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
A_ACC = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.2, -1.2, 0.8, -0.8])
A_TOOL = torch.tensor([0.7, -0.3, 0.0, 0.0, 0.0, 0.0, 0.4, -0.4])


class CountingWeights(MasterWeights):
    """MasterWeights that counts its optimizer steps."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.steps = 0

    def step(self, grad_clip: float):
        self.steps += 1
        return super().step(grad_clip)


def make_rollouts(vocab_size: int, *, repeat_groups: bool = False) -> list[Rollout]:
    """4 groups of 2 rollouts, each a 5-token prompt and an 8-token continuation with a 2-token
    tool turn; with `repeat_groups`, groups 2 and 3 hold the very tokens of groups 0 and 1."""
    generator = torch.Generator().manual_seed(3)
    sequences = {}
    for prompt_index in range(4):
        prompt = torch.randint(3, vocab_size, (5,), generator=generator).tolist()
        for sample_index in range(2):
            continuation = torch.randint(3, vocab_size, (8,), generator=generator).tolist()
            sequences[prompt_index, sample_index] = prompt + continuation
    sampled = [0 if 3 <= t < 5 else 1 for t in range(8)]
    return [Rollout(prompt_index=g, sample_index=k, token_ids=sequences[g % 2 if repeat_groups else g, k], prompt_len=5,
                    loss_mask=[0] * 5 + sampled, sampler_logprobs=[0.0] * 5 + [-1.0 * s for s in sampled], messages=[])
            for g in range(4) for k in range(2)]


def run_update(model_dir, *overrides: str, lr: float = 0.05, advantages: Advantages = Advantages(A_ACC, A_TOOL),
               repeat_groups: bool = False):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    recipe = load_recipe(TINY_RECIPE, ["hdpo.micro_batch_size=2", *overrides])
    weights = CountingWeights(model, lr=lr, weight_decay=0.0)
    rollouts = make_rollouts(model.config.vocab_size, repeat_groups=repeat_groups)
    figures = policy_update(model, weights, rollouts, advantages, recipe.hdpo, pad_token_id=0, temperature=1.0,
                            device=torch.device("cpu"))
    return figures, weights.steps, model


def test_mini_batches_hold_whole_groups_in_order():
    group_ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    assert [rows.tolist() for rows in mini_batch_rows(group_ids, 2)] == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert [rows.tolist() for rows in mini_batch_rows(group_ids, 1)] == [list(range(8))]
    # more mini-batches asked than groups kept: one per group
    assert [rows.tolist() for rows in mini_batch_rows(group_ids, 6)] == [[0, 1], [2, 3, 4], [5], [6, 7]]


@pytest.mark.parametrize("mini_batches,ppo_epochs,steps", [(1, 1, 1), (2, 1, 2), (2, 2, 4), (4, 1, 4)])
def test_each_mini_batch_is_one_optimizer_step(tiny_model_dir, mini_batches, ppo_epochs, steps):
    _, taken, _ = run_update(tiny_model_dir, f"hdpo.mini_batches={mini_batches}", f"hdpo.ppo_epochs={ppo_epochs}")
    assert taken == steps


def test_later_mini_batches_are_off_policy_so_clipping_acts(tiny_model_dir):
    on_policy, _, _ = run_update(tiny_model_dir, "hdpo.mini_batches=1")
    assert on_policy.clip_frac_acc == 0.0 and on_policy.clip_frac_tool == 0.0  # ratio 1: nothing to clip
    off_policy, _, _ = run_update(tiny_model_dir, "hdpo.mini_batches=2")
    # The second mini-batch is scored against log-probs taken before the first step moved the
    # weights (lr 0.05 moves them far): some of its tokens leave the clip range.
    assert off_policy.clip_frac_acc > 0.0


def test_dual_clip_changes_an_off_policy_update_only(tiny_model_dir):
    # Groups 2 and 3 repeat groups 0 and 1 with the opposite advantage: the first step raises the
    # very tokens the second (A < 0) then sees at a ratio > c.
    advantages = Advantages(torch.tensor([1.0] * 4 + [-1.0] * 4))

    def weights_after(*overrides):
        _, _, model = run_update(tiny_model_dir, *overrides, lr=0.2, advantages=advantages, repeat_groups=True)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    for mini_batches, should_differ in ((1, False), (2, True)):
        dual = weights_after(f"hdpo.mini_batches={mini_batches}", "hdpo.dual_clip_c=1.5")
        plain = weights_after(f"hdpo.mini_batches={mini_batches}", "hdpo.dual_clip_c=null")
        assert (not torch.equal(dual, plain)) == should_differ


def test_batch_token_mean_is_independent_of_micro_batch_size_and_micro_mode_is_not(tiny_model_dir):
    def loss(loss_agg: str, micro_batch_size: int) -> float:
        figures, _, _ = run_update(tiny_model_dir, f"hdpo.loss_agg={loss_agg}",
                                   f"hdpo.micro_batch_size={micro_batch_size}", lr=0.0)
        return figures.loss

    whole = loss("batch_token_mean", 8)
    assert loss("batch_token_mean", 2) == pytest.approx(whole, abs=1e-6)
    # one micro-batch holding everything: the per-micro-batch mean is the batch mean
    assert loss("micro_batch_token_mean", 8) == pytest.approx(whole, abs=1e-6)
    # micro-batches of one group: a group without A_tool != 0 adds 0 to L_tool, so it differs
    assert loss("micro_batch_token_mean", 2) != pytest.approx(whole, abs=1e-4)
