"""PPO-clip surrogate, HDPO two-channel loss and k3 KL against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from metis_cli.algo.losses import (
    LOG_RATIO_CLAMP,
    MicroBatchNorm,
    clipped_surrogate,
    hdpo_loss,
    kl_k3,
    masked_mean,
    micro_batch_norms,
)

torch.set_num_threads(1)


def test_masked_mean_ignores_masked_positions_even_if_not_finite():
    x = torch.tensor([[1.0, 3.0, float("inf")], [5.0, float("nan"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert masked_mean(x, mask, total=6).item() == pytest.approx(1.5)


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(1, 4)
    # ratios 1.1 (inside), 1.5 (above 1 + eps), 0.5 (below 1 - eps), 1.5 (above, negative A)
    logp = torch.log(torch.tensor([[1.1, 1.5, 0.5, 1.5]]))
    mask = torch.ones(1, 4)
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([2.0]), mask, clip_eps=0.2)
    # A = 2 > 0: -min(r*A, clip(r)*A)
    assert loss.tolist()[0] == pytest.approx([-2.2, -2.4, -1.0, -2.4])
    assert clipped.tolist()[0] == [False, True, False, True]

    loss, clipped = clipped_surrogate(logp, old, torch.tensor([-1.0]), mask, clip_eps=0.2)
    # A = -1 < 0: the pessimistic term is the larger ratio
    assert loss.tolist()[0] == pytest.approx([1.1, 1.5, 0.8, 1.5])
    assert clipped.tolist()[0] == [False, False, True, False]


def test_clipped_tokens_get_no_gradient_and_others_do():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.0, 1.5]])).requires_grad_()
    loss, _ = clipped_surrogate(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.sum().backward()
    assert logp.grad[0, 0].item() == pytest.approx(-1.0)  # d(-r*A)/dlogp = -r*A at r = 1
    assert logp.grad[0, 1].item() == 0.0


def test_masked_tokens_do_not_poison_gradients():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.0, 0.0, 200.0]], requires_grad=True)  # exp(200) overflows float32
    mask = torch.tensor([[1, 1, 0]])
    parts = hdpo_loss(logp, old, mask, torch.tensor([1.0]), None, 1.0, 0.0, 0.2)
    parts.loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 2].item() == 0.0


def test_hdpo_loss_tool_channel_averages_only_rollouts_with_nonzero_a_tool():
    old = torch.zeros(3, 2)
    logp = torch.zeros(3, 2, requires_grad=True)  # ratio 1 everywhere: loss = -A per token
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    a_acc = torch.tensor([1.0, -2.0, 0.5])
    a_tool = torch.tensor([0.0, 3.0, -1.0])
    parts = hdpo_loss(logp, old, mask, a_acc, a_tool, w_acc=1.0, w_tool=0.15, clip_eps=0.2)
    # L_acc over 5 tokens: -(1 + 1 - 2 + .5 + .5) / 5
    assert parts.loss_acc.item() == pytest.approx(-1.0 / 5)
    # L_tool over the 3 tokens of rollouts 1 and 2: -(3 - 1 - 1) / 3
    assert parts.loss_tool.item() == pytest.approx(-1.0 / 3)
    assert parts.loss.item() == pytest.approx(-0.2 + 0.15 * (-1.0 / 3))
    parts.loss.backward()
    # rollout 0 gets gradient only from the accuracy channel: -A_acc / 5 per token
    assert logp.grad[0].tolist() == pytest.approx([-0.2, -0.2])
    # rollout 2: -(0.5) / 5 from acc, -0.15 * (-1) / 3 from tool
    assert logp.grad[2, 0].item() == pytest.approx(-0.1 + 0.05)
    assert logp.grad[1, 1].item() == 0.0  # masked token


def test_hdpo_loss_tool_channel_is_zero_when_no_rollout_has_a_tool_advantage():
    logp = torch.zeros(2, 2, requires_grad=True)
    parts = hdpo_loss(
        logp, torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([1.0, -1.0]),
        torch.zeros(2), w_acc=1.0, w_tool=0.15, clip_eps=0.2,
    )
    assert parts.loss_tool.item() == 0.0
    assert parts.clip_frac_tool == 0.0
    parts.loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_clip_fractions_are_reported_per_channel():
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [1.0, 1.0]]))
    parts = hdpo_loss(
        logp, old, torch.ones(2, 2), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]),
        w_acc=1.0, w_tool=0.15, clip_eps=0.2,
    )
    assert parts.clip_frac_acc == pytest.approx(1 / 4)
    assert parts.clip_frac_tool == pytest.approx(1 / 2)  # only rollout 0's two tokens count


def test_micro_batches_with_full_batch_totals_sum_to_the_full_batch_loss():
    torch.manual_seed(0)
    logp, old = torch.randn(4, 3) * 0.1, torch.randn(4, 3) * 0.1
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    a_acc, a_tool = torch.tensor([1.0, -1.0, 0.5, 0.2]), torch.tensor([0.0, 1.0, -1.0, 0.0])
    full = hdpo_loss(logp, old, mask, a_acc, a_tool, 1.0, 0.15, 0.2)
    acc_total = float(mask.sum())
    tool_total = float((mask * (a_tool != 0).unsqueeze(-1)).sum())
    halves = [
        hdpo_loss(logp[s], old[s], mask[s], a_acc[s], a_tool[s], 1.0, 0.15, 0.2,
                  acc_token_total=acc_total, tool_token_total=tool_total)
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert sum(h.loss.item() for h in halves) == pytest.approx(full.loss.item(), abs=1e-6)


def test_single_loss_estimators_pass_no_tool_advantage():
    logp = torch.zeros(1, 2)
    parts = hdpo_loss(logp, logp, torch.ones(1, 2), torch.tensor([2.0]), None, 1.0, 0.15, 0.2)
    assert parts.loss.item() == pytest.approx(-2.0)
    assert parts.loss_tool.item() == 0.0


def test_kl_k3_hand_computed_and_zero_at_equal_policies():
    logp = torch.tensor([[0.0, math.log(0.5), 5.0]])
    ref = torch.tensor([[0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 1: d = ref - logp = log 2; k3 = 2 - log 2 - 1
    assert kl_k3(logp, ref, mask).item() == pytest.approx((1 - math.log(2)) / 2)
    assert kl_k3(ref, ref, mask).item() == 0.0


def test_dual_clip_caps_the_loss_of_negative_advantages_hand_computed():
    old = torch.zeros(1, 4)
    # ratios 1.5 (above 1 + eps), 4.0 (above c = 3), 0.5 (below 1 - eps), 2.5 (between 1 + eps and c)
    logp = torch.log(torch.tensor([[1.5, 4.0, 0.5, 2.5]])).requires_grad_()
    mask = torch.ones(1, 4)
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([-2.0]), mask, clip_eps=0.2, dual_clip_c=3.0)
    # A = -2: max(-r*A, -clip(r)*A) = 2 * max(r, clip(r)), then at most -c*A = 6
    assert loss.tolist()[0] == pytest.approx([3.0, 6.0, 1.6, 5.0])
    assert clipped.tolist()[0] == [False, True, True, False]
    loss.sum().backward()
    # d(-r*A)/dlogp = -r*A = 2r where unclipped; 0 where either clip is active
    assert logp.grad[0].tolist() == pytest.approx([3.0, 0.0, 0.0, 5.0])

    plain, plain_clipped = clipped_surrogate(logp.detach(), old, torch.tensor([-2.0]), mask, clip_eps=0.2)
    assert plain.tolist()[0] == pytest.approx([3.0, 8.0, 1.6, 5.0])  # without dual-clip ratio 4 keeps pushing
    assert plain_clipped.tolist()[0] == [False, False, True, False]


def test_dual_clip_leaves_positive_advantages_alone():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[4.0, 0.5]]))
    dual, _ = clipped_surrogate(logp, old, torch.tensor([2.0]), torch.ones(1, 2), 0.2, dual_clip_c=3.0)
    plain, _ = clipped_surrogate(logp, old, torch.tensor([2.0]), torch.ones(1, 2), 0.2)
    assert dual.tolist() == plain.tolist()
    assert dual.tolist()[0] == pytest.approx([-2.4, -1.0])


def test_log_ratio_is_clamped_before_exp():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[30.0, -30.0]], requires_grad=True)  # far outside +-20
    loss, _ = clipped_surrogate(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), clip_eps=0.2)
    # A = -1: token 0's loss is r = e^20, not e^30; token 1 is clipped at 1 - eps
    assert loss[0, 0].item() == pytest.approx(math.exp(LOG_RATIO_CLAMP), rel=1e-5)
    assert loss[0, 1].item() == pytest.approx(0.8)
    loss.sum().backward()
    assert logp.grad.tolist() == [[0.0, 0.0]]  # no gradient through the clamp: no blow-up


def test_micro_batch_norms_hand_computed():
    acc, tool, rollouts = [4.0, 2.0, 6.0], [2.0, 0.0, 3.0], [2, 1, 3]
    assert micro_batch_norms(acc, tool, rollouts, "batch_token_mean") == [MicroBatchNorm(12.0, 5.0, 1.0)] * 3
    assert micro_batch_norms(acc, [0.0] * 3, rollouts, "batch_token_mean")[0].tool_token_total is None
    micro = micro_batch_norms(acc, tool, rollouts, "micro_batch_token_mean")
    assert [(n.acc_token_total, n.tool_token_total) for n in micro] == [(None, None)] * 3
    assert [n.scale for n in micro] == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    # the KL term (a token mean over the micro-batch) is weighted like the loss
    assert micro_batch_norms(acc, tool, rollouts, "batch_token_mean")[0].token_mean_weight(4.0) == pytest.approx(1 / 3)
    assert micro[0].token_mean_weight(4.0) == pytest.approx(1 / 3)
    assert micro[1].token_mean_weight(2.0) == pytest.approx(1 / 6)


def _aggregated_loss(loss_agg: str) -> float:
    """The HDPO loss of two micro-batches at ratio 1 (token loss -A): [a, b] and [c].
    a: 2 tokens, A_acc 1, A_tool 0.5; b: 1 token, A_acc -1, A_tool 0; c: 3 tokens, A_acc 0.5, A_tool 0."""
    chunks = [
        (torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.0])),
        (torch.tensor([[1, 1, 1]]), torch.tensor([0.5]), torch.tensor([0.0])),
    ]
    norms = micro_batch_norms([float(m.sum()) for m, _, _ in chunks],
                              [float(m[t != 0].sum()) for m, _, t in chunks], [len(a) for _, a, _ in chunks], loss_agg)
    total = 0.0
    for (mask, a_acc, a_tool), norm in zip(chunks, norms):
        logp = torch.zeros(mask.shape)
        parts = hdpo_loss(logp, logp, mask, a_acc, a_tool, 1.0, 0.15, 0.2,
                          acc_token_total=norm.acc_token_total, tool_token_total=norm.tool_token_total)
        total += parts.loss.item() * norm.scale
    return total


def test_loss_aggregation_modes_hand_computed():
    # batch_token_mean: L_acc = -(1 + 1 - 1 + 3 * 0.5) / 6, L_tool = -(0.5 + 0.5) / 2
    assert _aggregated_loss("batch_token_mean") == pytest.approx(-2.5 / 6 + 0.15 * -0.5)
    # micro_batch_token_mean: [a, b] L_acc = -1/3, L_tool = -0.5, share 2/3; [c] L_acc = -0.5, L_tool = 0
    # (no A_tool != 0 rollout), share 1/3
    expected = 2 / 3 * (-1 / 3 + 0.15 * -0.5) + 1 / 3 * (-0.5 + 0.15 * 0.0)
    assert _aggregated_loss("micro_batch_token_mean") == pytest.approx(expected)
