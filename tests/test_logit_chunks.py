"""The LM head in chunks (train/logit_chunks.py): log-probs, entropies and gradients equal the
full-logits pass, in the plain and the grouped (shared-prompt) pass and under LoRA; no head call
sees more than one chunk of positions; models that post-process logits keep the plain head."""

from __future__ import annotations

import pytest
import torch

from metis_cli.train import logit_chunks
from metis_cli.train.logprobs import grouped_token_logprobs, token_logprobs
from tests.test_grouped_logprobs import load, logprobs_and_gradients, make_rows

torch.set_num_threads(1)
CHUNK = 5


def budget_for(model, chunk: int) -> float:
    """A logits budget (MiB) that `chunk_tokens` turns into exactly `chunk` positions."""
    vocab = model.get_output_embeddings().weight.shape[0]
    budget = chunk * vocab * 8 / 2**20
    assert logit_chunks.chunk_tokens(vocab, budget) == chunk
    return budget


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from metis_cli.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("chunks") / "model", hidden_size=64, num_layers=2, num_heads=4,
                            intermediate_size=128)


def compare(model, compute):
    """`compute(budget)` with the plain head (None) and with chunks of CHUNK positions: same
    log-probs, entropies and gradients; the chunked head saw at most CHUNK positions a call."""
    input_ids, attention_mask, prompt_lens = make_rows(model.config.vocab_size)
    continuation = (torch.arange(input_ids.shape[1]) >= prompt_lens.unsqueeze(1)) & (attention_mask > 0)
    plain = logprobs_and_gradients(model, lambda: compute(model, input_ids, attention_mask, prompt_lens, None),
                                   continuation)
    head = model.get_output_embeddings()
    widths = []
    hook = head.register_forward_hook(lambda module, args, out: widths.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        chunked = logprobs_and_gradients(
            model, lambda: compute(model, input_ids, attention_mask, prompt_lens, budget_for(model, CHUNK)), continuation)
    finally:
        hook.remove()
    assert widths and max(widths) <= CHUNK < input_ids.numel()
    assert model.get_output_embeddings() is head, "the original head must be back after the pass"
    (logp, entropy, grads), (logp_c, entropy_c, grads_c) = plain, chunked
    assert (logp_c[continuation] - logp[continuation]).abs().max() < 1e-5
    assert (entropy_c[continuation] - entropy[continuation]).abs().max() < 1e-5
    assert set(grads_c) == set(grads) and grads
    for name, grad in grads.items():
        relative = (grads_c[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert relative < 1e-4, f"{name}: gradient differs by {relative:.2e} (relative)"


def plain_pass(model, input_ids, attention_mask, prompt_lens, budget):
    return token_logprobs(model, input_ids, attention_mask, temperature=0.7, with_entropy=True, logits_budget_mib=budget)


def grouped_pass(model, input_ids, attention_mask, prompt_lens, budget):
    return grouped_token_logprobs(model, input_ids, attention_mask, prompt_lens, temperature=0.7, with_entropy=True,
                                  logits_budget_mib=budget)


@pytest.mark.parametrize("compute", [plain_pass, grouped_pass], ids=["plain", "grouped"])
def test_chunked_head_matches_the_full_logits(model_dir, compute):
    compare(load(model_dir), compute)


def test_chunked_head_under_lora(model_dir):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(load(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    compare(lora, grouped_pass)


def test_a_pass_within_the_budget_and_post_processing_models_keep_the_plain_head(model_dir):
    model = load(model_dir)
    input_ids, attention_mask, prompt_lens = make_rows(model.config.vocab_size)
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(out.shape))
    try:
        token_logprobs(model, input_ids, attention_mask, logits_budget_mib=budget_for(model, input_ids.numel()))
        model.config.final_logit_softcapping = 30.0  # e.g. Gemma: the forward rescales the head's output
        assert not logit_chunks.supports(model)
        token_logprobs(model, input_ids, attention_mask, logits_budget_mib=budget_for(model, CHUNK))
    finally:
        hook.remove()
    assert calls == [(*input_ids.shape, model.config.vocab_size)] * 2  # one whole-tensor head call each


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_sft_losses_and_gradients_with_the_chunked_head(model_dir, packing, monkeypatch):
    from metis_cli.train import logprobs, sft_batch

    model = load(model_dir)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length, prompt in ((14, 6), (9, 4), (17, 8)):
        ids = torch.randint(3, model.config.vocab_size, (length,), generator=generator).tolist()
        rows.append((ids, [0] * prompt + [1] * (length - prompt)))

    def losses_and_grads():
        model.zero_grad(set_to_none=True)
        batch = sft_batch.build(rows, packing=packing, pad_id=0, device="cpu")
        with sft_batch.routing(model, batch):
            total, count = sft_batch.loss_sum(model, batch)
            total.backward()
        per_token = sft_batch.token_losses(model, rows, packing=packing, pad_id=0, device="cpu")
        return float(total.detach()), count, per_token, {n: p.grad.clone() for n, p in model.named_parameters()}

    full = losses_and_grads()
    monkeypatch.setattr(logprobs, "DEFAULT_LOGITS_BUDGET_MIB", budget_for(model, CHUNK))
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape[-2]))
    try:
        chunked = losses_and_grads()
    finally:
        hook.remove()
    assert widths and max(widths) <= CHUNK
    assert chunked[1] == full[1] and abs(chunked[0] - full[0]) < 1e-4
    assert (chunked[2] - full[2]).abs().max() < 1e-5
    for name, grad in full[3].items():
        assert (chunked[3][name] - grad).norm() <= 1e-4 * grad.norm().clamp(min=1e-12), name
