"""Packed SFT batches (train/sft_batch.py) give the padded layout's per-token losses and gradients,
compute each shared token once, leave rows they cannot pack to the padded layout, and `metis sft`
trains alike with `sft.packing` on and off (and resumes to identical metrics)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from metis_cli.train import sft_batch

REPO = Path(__file__).resolve().parents[1]

# (ids, mask) rows over a 40-token vocabulary. Rows 0-2 share a 4-token "system prompt" and rows 0-1
# a longer question; row 3 is row 0 again (a duplicate); row 4 ends inside row 1's path (it owns
# no token of its own) and trains on a token of the shared part; row 5 has no shared prefix and a
# target right after its first token; row 6 trains on nothing.
ROWS = [
    ([1, 2, 3, 4, 10, 11, 12, 20, 21, 22, 5], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]),
    ([1, 2, 3, 4, 10, 11, 13, 23, 24, 5, 6], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]),
    ([1, 2, 3, 4, 14, 25, 26, 27, 28, 29, 30, 31, 5], [0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]),
    ([1, 2, 3, 4, 10, 11, 12, 20, 21, 22, 5], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]),
    ([1, 2, 3, 4, 10, 11, 13, 23], [0, 0, 0, 0, 0, 1, 0, 1]),
    ([7, 32, 33, 34], [0, 1, 1, 1]),
    ([1, 2, 3, 4, 15, 16], [0, 0, 0, 0, 0, 0]),
]


def tiny_model(*, kv_heads: int = 4, sliding_window: int | None = None):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8,
                         max_position_embeddings=64, attn_implementation="sdpa",
                         use_sliding_window=sliding_window is not None, sliding_window=sliding_window,
                         layer_types=["sliding_attention" if sliding_window else "full_attention"] * 2)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so a leak between rows shows
        for param in model.parameters():
            param.mul_(5.0)
    return model.train()


def losses(model, rows, packing: bool):
    return sft_batch.token_losses(model, rows, packing=packing, pad_id=0, device="cpu")


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_packed_per_token_losses_equal_the_padded_ones(kv_heads):
    model = tiny_model(kv_heads=kv_heads)
    packed, padded = losses(model, ROWS, True), losses(model, ROWS, False)
    assert packed.shape == padded.shape == (sum(sum(mask[1:]) for _, mask in ROWS),)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    # a row's loss does not depend on the rows packed with it
    alone = torch.cat([losses(model, [row], True) for row in ROWS if sum(row[1][1:])])
    torch.testing.assert_close(alone, packed, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_the_padded_ones():
    model = tiny_model(kv_heads=2).double()  # float64 up to the (float32) cross-entropy: little rounding to hide in
    grads = {}
    for packing in (True, False):
        model.zero_grad()
        batch = sft_batch.build(ROWS, packing=packing, pad_id=0, device="cpu")
        assert isinstance(batch, sft_batch.PackedRows) == packing
        with sft_batch.routing(model, batch):
            loss, count = sft_batch.loss_sum(model, batch)
            loss.backward()
        assert count == 19
        grads[packing] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads[False].items():  # relative to each tensor's largest entry
        gap = float((grads[True][name] - grad).abs().max())
        assert gap <= 1e-6 * float(grad.abs().max()), (name, gap)


def test_shared_tokens_are_computed_once_and_tokens_after_the_last_target_dropped():
    batch = sft_batch.pack_rows(ROWS, "cpu")
    # rows 0-2 share [1, 2, 3, 4]; rows 0, 1, 3, 4 share [10, 11]; row 3 adds nothing; trailing
    # tokens after each row's last target (the final 5s and 6, row 6 keeps its whole self) go
    shared_tree = 4 + 2 + (1 + 2) + (1 + 2) + (1 + 6) + 3 + 2
    assert batch.input_ids.shape == (1, shared_tree)
    assert batch.position_ids[0].tolist()[:6] == [0, 1, 2, 3, 4, 5]
    assert max(batch.position_ids[0].tolist()) == 10  # row 2's last kept token sits at position 10, as in its row
    assert batch.keep.numel() == batch.targets.numel() == 19


def test_rows_with_images_take_the_padded_layout():
    with_image = ([1, 2, 3], [0, 1, 1], ("an image",))
    batch = sft_batch.build([ROWS[0], with_image], packing=True, pad_id=0, device="cpu")
    assert not isinstance(batch, sft_batch.PackedRows)
    assert batch[0].shape == (2, len(ROWS[0][0]))


def test_check_packing_accepts_full_attention_and_refuses_a_short_sliding_window():
    assert sft_batch.check_packing(tiny_model(), ROWS, pad_id=0, device="cpu") is None
    reason = sft_batch.check_packing(tiny_model(sliding_window=3), ROWS, pad_id=0, device="cpu")
    assert reason and "sliding window" in reason


def _sft(run_dir: Path, *extra: str) -> list[dict]:
    from metis_cli.cli.main import app

    settings = {
        "run.output_dir": str(run_dir), "run.threads": "1", "run.seed": "0",
        "model.build_tiny.hidden_size": "32", "model.build_tiny.num_layers": "2",
        "model.build_tiny.num_heads": "2", "model.build_tiny.intermediate_size": "64",
        "data.synthetic.knowledge_examples": "96", "data.synthetic.cold_start_examples": "32",
        "sft.phases.0.epochs": "1", "sft.phases.1.epochs": "1", "sft.batch_size": "16", "sft.lr": "1e-2",
        "sft.eval_share": "0.1", "sft.eval_every": "3", "sft.save_every": "3",
    }
    args = [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["sft", "recipes/tiny.yaml", "--quiet", *args, *extra])
    assert result.exit_code == 0, result.output
    path = run_dir / "sft" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sft_trains_alike_packed_and_padded_and_resumes_identically(tmp_path):
    os.chdir(REPO)
    packed = _sft(tmp_path / "packed")
    padded = _sft(tmp_path / "padded", "--set", "sft.packing=false")
    done = {name: json.loads((tmp_path / name / "sft" / "DONE.json").read_text()) for name in ("packed", "padded")}
    assert done["packed"]["packing"] is True and done["padded"]["packing"] is False
    steps = [r["step"] for r in packed]
    assert steps == [r["step"] for r in padded] and len(steps) >= 9
    for a, b in zip(packed, padded):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
    evals = [(a["eval_loss"], b["eval_loss"]) for a, b in zip(packed, padded) if "eval_loss" in a]
    assert len(evals) >= 3 and all(abs(a - b) < 1e-4 for a, b in evals)
    # as if killed before the last checkpoint: drop it and the finished marks, then --resume
    stage = tmp_path / "packed" / "sft"
    checkpoints = sorted((stage / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 2
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(stage / "final")
    (stage / "DONE.json").unlink()
    resumed = _sft(tmp_path / "packed", "--resume")
    assert int(checkpoints[0].name.split("_")[1]) < len(steps)  # steps after it were trained again
    keys = ("step", "loss", "eval_loss", "grad_norm", "lr")
    assert [{k: r.get(k) for k in keys} for r in resumed] == [{k: r.get(k) for k in keys} for r in packed]
