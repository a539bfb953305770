"""`hdpo.ptx` (rehearsal of SFT rows during RL, stages/hdpo_ptx.py): which rows each optimizer
step and each process takes, that its gradient is coef x the gradient of the rows' token-mean
cross-entropy, and the recipe errors. A run with it (metrics, resume) is in tests/test_training.py;
two processes against one in tests/test_distributed.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.errors import DataError
from metis_cli.recipe import load_recipe
from metis_cli.stages.hdpo_ptx import Rehearsal, after_marker

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"


def rows(count: int, vocab: int = 50) -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        ids = torch.randint(3, vocab, (5 + i % 4,), generator=generator).tolist()
        out.append((ids, [0, 0] + [1] * (len(ids) - 2)))
    return out


def rehearsal(count: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> Rehearsal:
    return Rehearsal(rows(count), coef=0.5, batch_size=batch_size, run_seed=seed, pad_token_id=0, rank=rank,
                     world_size=world_size)


def test_each_epoch_rehearses_every_row_once_and_resumes_the_same_walk():
    one = rehearsal(10, 4)
    seen = [tuple(ids) for k in range(5) for ids, _ in one.rows_for(k)]  # 20 positions = two epochs
    counts = Counter(seen)
    assert len(counts) == 10 and set(counts.values()) == {2}
    first_epoch = seen[:10]
    assert len(set(first_epoch)) == 10 and first_epoch != [tuple(r[0]) for r in one.rows]  # shuffled
    assert rehearsal(10, 4).rows_for(3) == one.rows_for(3)  # a pure function of the step: resume-safe
    assert rehearsal(10, 4, seed=1).rows_for(0) != one.rows_for(0)


def test_processes_split_each_step_s_rows_between_them():
    alone = rehearsal(9, 4).rows_for(2)
    parts = [rehearsal(9, 4, rank, 2).rows_for(2) for rank in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    assert sorted(parts[0] + parts[1]) == sorted(alone)


@pytest.mark.parametrize("micro_batch_size", [1, 2, 16])
def test_backward_is_coef_times_the_token_mean_cross_entropy(tiny_model_dir, micro_batch_size):
    """In forwards of 1, 2 (the last one short) or all 3 rows: the same token mean over all."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rehearse = Rehearsal(rows(6, model.config.vocab_size), coef=0.25, batch_size=3, run_seed=0, pad_token_id=0,
                         micro_batch_size=micro_batch_size)
    figure = rehearse.backward(model, 1, torch.device("cpu"))
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    losses, count = [], 0
    for ids, mask in rehearse.rows_for(1):  # row by row, unpadded: what the rows' SFT loss is
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        losses.append(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    mean = torch.stack(losses).sum() / count
    (0.25 * mean).backward()
    assert abs(figure - float(mean.detach())) < 1e-5
    worst = max(float((got[name] - p.grad).abs().max()) for name, p in model.named_parameters())
    assert worst < 1e-6 and max(float(g.abs().max()) for g in got.values()) > 1e-4


def test_rows_come_from_the_recipe_s_sources_rendered_with_the_tools(tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(TINY, ["hdpo.ptx.coef=0.1", 'hdpo.ptx.data=[{path: "synthetic:knowledge", limit: 12}]',
                                "hdpo.ptx.batch_size=4"])
    with_tools = Rehearsal.from_recipe(recipe, tiny_tokenizer, [{"type": "function", "function": {
        "name": "calculator", "description": "d", "parameters": {"type": "object", "properties": {}}}}])
    plain = Rehearsal.from_recipe(recipe, tiny_tokenizer, None)
    assert len(with_tools.rows) == 12 and with_tools.coef == 0.1 and with_tools.batch_size == 4
    assert with_tools.micro_batch_size == recipe.hdpo.micro_batch_size
    assert all(len(a[0]) > len(b[0]) for a, b in zip(with_tools.rows, plain.rows))  # the tool listing is in the prompt
    assert all(sum(mask) > 0 for _, mask in with_tools.rows)
    off = load_recipe(TINY, ["hdpo.ptx.coef=0"])
    assert Rehearsal.from_recipe(off, tiny_tokenizer, None) is None


def test_no_row_short_enough_is_a_data_error(tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(TINY, ["hdpo.ptx.coef=0.1", 'hdpo.ptx.data=[{path: "synthetic:knowledge", limit: 4}]',
                                "sft.max_seq_len=3"])
    with pytest.raises(DataError, match="hdpo.ptx.data: no row to rehearse"):
        Rehearsal.from_recipe(recipe, tiny_tokenizer, None)


def test_coef_without_data_exits_2_naming_the_field(monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["validate", "recipes/tiny.yaml", "--set", "hdpo.ptx.coef=0.1",
                                      "--set", "hdpo.ptx.data=[]"])
    assert result.exit_code == 2
    assert "hdpo.ptx" in result.output and "needs data" in result.output


def test_train_after_keeps_only_the_answer_tokens(tiny_tokenizer):
    prompt = tiny_tokenizer.encode("What is 6 + 8?", add_special_tokens=False)
    reply = tiny_tokenizer.encode(" <answer>14</answer>", add_special_tokens=False)
    ids, mask = prompt + reply, [0] * len(prompt) + [1] * len(reply)
    answer = tiny_tokenizer.encode("14</answer>", add_special_tokens=False)
    kept = after_marker(tiny_tokenizer, ids, mask, "<answer>")
    assert [t for t, m in zip(ids, kept) if m] == answer  # the digits and the closing tag, not "<answer>"
    # a marker the tokenizer never emits on its own (inside the <answer> token): found by decoding
    assert tiny_tokenizer.encode("answer>", add_special_tokens=False) != tiny_tokenizer.encode("<answer>",
                                                                                             add_special_tokens=False)
    assert after_marker(tiny_tokenizer, ids, mask, "answer>") == kept
    assert after_marker(tiny_tokenizer, ids, mask, "<tool_call>") == [0] * len(ids)  # not in the row
    assert after_marker(tiny_tokenizer, prompt + reply, [1] * len(ids), "<answer>") == kept  # first one from 0


def test_train_after_in_the_recipe_masks_every_row_and_none_found_is_an_error(tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(REPO)
    sources = ["hdpo.ptx.coef=0.1", 'hdpo.ptx.data=[{path: "synthetic:knowledge", limit: 6}]']
    full = Rehearsal.from_recipe(load_recipe(TINY, [*sources, "hdpo.ptx.train_after=null"]), tiny_tokenizer, None)
    answers = Rehearsal.from_recipe(load_recipe(TINY, [*sources, "hdpo.ptx.train_after=<answer>"]),
                                    tiny_tokenizer, None)
    for (ids, whole), (_, part) in zip(full.rows, answers.rows):
        assert 0 < sum(part) < sum(whole)
        assert "</answer>" in tiny_tokenizer.decode([t for t, m in zip(ids, part) if m])  # and the end of turn
        assert "<answer>" not in tiny_tokenizer.decode([t for t, m in zip(ids, part) if m])
    with pytest.raises(DataError, match="train_after '<nowhere>'"):
        Rehearsal.from_recipe(load_recipe(TINY, [*sources, "hdpo.ptx.train_after=<nowhere>"]), tiny_tokenizer, None)
