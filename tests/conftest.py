"""Shared fixtures and helpers: one tiny text model folder and one tiny vision-language model
folder for the whole session, the "training moved every parameter" check, and killing a training
subprocess mid-run.

`tiny_model_dir` is the 2-layer, 32-wide tiny Qwen3 (random weights, seed 0, 512 positions) that
tests needing a real tokenizer and a cheap forward pass share; tests that need other sizes (a
longer context, head_dim 32 for vLLM, the recipe's default sizes) build their own. `vl_dir` is
the tiny Qwen3-VL (model/tiny_vl.py, seed 0) with its processor; `vl_model` loads it once per test
module. Tests must not write into either folder.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="session")
def vl_dir(tmp_path_factory) -> Path:
    import torch

    from metis_cli.model.tiny_vl import build_tiny_vl_model

    torch.set_num_threads(1)
    return build_tiny_vl_model(tmp_path_factory.mktemp("tiny-vl") / "model")


@pytest.fixture(scope="module")
def vl_model(vl_dir):
    """The tiny Qwen3-VL in float32 on CPU, in eval mode; one per module, so a test module that
    trains it (and switches it back) does not reach into another's."""
    import torch

    from metis_cli.model.loading import load_model

    return load_model(str(vl_dir), dtype=torch.float32, device="cpu").eval()


@pytest.fixture(scope="session")
def vl_processor(vl_dir):
    from metis_cli.model.processor import load_processor

    return load_processor(str(vl_dir))


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


def kill_when_step_logged(command: list[str], metrics: Path, step: int = 2, timeout_s: float = 240) -> None:
    """Run `command` from the repository root, SIGKILL it once `metrics` (a metrics.jsonl) holds a
    record of `step` or later, and wait for it: a crash in the middle of training. The command
    failing before then fails the test with its stderr; after `timeout_s` it is killed anyway (the
    caller's own checks then say what is missing)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= step
                                    for line in metrics.read_text().splitlines() if line.strip()):
            break
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="session")
def kill_mid_run():
    """`kill_when_step_logged` as a fixture: `kill_mid_run(command, run_dir / "metrics.jsonl")`."""
    return kill_when_step_logged


def default_sigint() -> None:
    """`preexec_fn` for a child a test sends Ctrl-C: SIGINT back to its default. A test run started
    in the background (`cmd &` without job control) ignores SIGINT, children inherit that, and the
    child's Python would then never raise KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
