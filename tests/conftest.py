"""Shared fixtures: one tiny model folder for the whole session, and the "training moved every
parameter" check.

`tiny_model_dir` is the 2-layer, 32-wide tiny Qwen3 (random weights, seed 0, 512 positions) that
tests needing a real tokenizer and a cheap forward pass share; tests that need other sizes (a
longer context, head_dim 32 for vLLM, the recipe's default sizes) build their own. Tests must not
write into it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
"""The sizes of `tiny_model_dir`."""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch

    from metis_cli.model.tiny import build_tiny_model

    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", **TINY_SIZES)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def unchanged_parameters(before_dir: Path, after_dir: Path) -> list[str]:
    """Names of the trainable parameters that are bit-identical in two saved model folders (all
    parameters are trainable in full fine-tuning). TRL checks every parameter this way: one
    frozen or skipped tensor fails, where "some tensor changed" would still pass."""
    import torch
    from transformers import AutoModelForCausalLM

    before, after = (dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).named_parameters())
                     for folder in (before_dir, after_dir))
    assert before and before.keys() == after.keys(), "the two folders hold different architectures"
    return [name for name, parameter in before.items()
            if parameter.requires_grad and torch.equal(parameter, after[name])]


@pytest.fixture(scope="session")
def parameters_left_unchanged():
    """`unchanged_parameters` as a fixture: `assert not parameters_left_unchanged(base, tuned)`."""
    return unchanged_parameters
