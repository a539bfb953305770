"""Checkpoints: atomic HF model folders plus trainer state, and resume.

Layout inside a stage folder: `checkpoints/step_000010/` = model files (`save_pretrained`, or a
peft adapter) + `trainer_state.pt` (optimizer, scheduler, RNG states, data position, step).
Every folder is written under a temporary name and renamed into place, so a killed run never
leaves a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.pt"


def _atomic_dir(dest: Path, write) -> Path:
    """Run `write(tmp_dir)`, then move tmp_dir to `dest` (replacing an older `dest`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)
        write(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def save_model_folder(model, tokenizer, dest: Path, *, merge_lora: bool = False) -> Path:
    """Save an HF model folder atomically (a peft model saves its adapter; `merge_lora` also
    writes the merged full model to `dest/merged`)."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if merge_lora and hasattr(model, "merge_and_unload"):
            import copy

            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(folder / "merged")
            tokenizer.save_pretrained(folder / "merged")

    return _atomic_dir(Path(dest), write)


def save_checkpoint(stage_dir: Path, step: int, model, tokenizer, trainer_state: dict, *, keep: int = 2) -> Path:
    """Write `checkpoints/step_<step>/` atomically and keep only the newest `keep` checkpoints."""
    import torch

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save({**trainer_state, "step": step}, folder / TRAINER_STATE)

    dest = _atomic_dir(Path(stage_dir) / "checkpoints" / f"step_{step:06d}", write)
    for old in list_checkpoints(stage_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def list_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(stage_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).exists():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(stage_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(stage_dir)
    return checkpoints[-1] if checkpoints else None


def load_trainer_state(checkpoint: Path) -> dict:
    import torch

    return torch.load(Path(checkpoint) / TRAINER_STATE, weights_only=False)
