"""Checkpoints: atomic HF model folders plus trainer state, and resume.

Layout inside a stage folder: `checkpoints/step_000010/` = model files (`save_pretrained`, or a
peft adapter) + `trainer_state.pt` (optimizer, scheduler, RNG states, data position, step).
Every folder is written under a temporary name and renamed into place, so a killed run never
leaves a half-written checkpoint that resume would pick up.

Several processes (FSDP2) write `torch.distributed.checkpoint` folders instead: each rank its own
shards of the model and optimizer (`*.distcp`, `.metadata`) plus `trainer_state.pt` from rank 0,
and resume reshards them for any number of processes. Their `final/` is still one HF folder,
written by rank 0 from full tensors gathered one at a time (`save_gathered_model_folder`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from metis_cli.files import storage_errors
from metis_cli.model.processor import copy_processor_files

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.pt"


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished folder `tmp` to `dest`, replacing an older `dest`."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _atomic_dir(dest: Path, write) -> Path:
    """Run `write(tmp_dir)`, then move tmp_dir to `dest` (replacing an older `dest`). A full disk
    or an unwritable folder raises a StorageError naming `dest`, and leaves no partial folder."""
    with storage_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            tmp.chmod(0o755)
            write(tmp)
            _move_into_place(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def save_model_folder(model, tokenizer, dest: Path, *, merge_lora: bool = False) -> Path:
    """Save an HF model folder atomically (a peft model saves its adapter; `merge_lora` also
    writes the merged full model to `dest/merged`). Saved into a stage folder (`final/`), it
    gets its model card (`_write_card`)."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        copy_processor_files(model, folder)
        if merge_lora and hasattr(model, "merge_and_unload"):
            import copy

            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(folder / "merged")
            tokenizer.save_pretrained(folder / "merged")
            copy_processor_files(model, folder / "merged")
        _write_card(folder, Path(dest).parent)

    return _atomic_dir(Path(dest), write)


def _write_card(folder: Path, stage_dir: Path) -> None:
    """README.md (model/card.py) for a folder saved into a stage folder (one with inputs.json),
    in place of the card peft's save_pretrained writes for an adapter."""
    from metis_cli.model.card import INPUTS_FILE, write_card

    if (stage_dir / INPUTS_FILE).exists():
        write_card(folder, stage_dir=stage_dir, replace=True)


def save_checkpoint(stage_dir: Path, step: int, model, tokenizer, trainer_state: dict, *, keep: int = 2) -> Path:
    """Write `checkpoints/step_<step>/` atomically and keep only the newest `keep` checkpoints."""
    import torch

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        copy_processor_files(model, folder)
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


# ------------------------------------------------------------------ several processes (FSDP2)
SHARDED_METADATA = ".metadata"
SAFETENSORS_SHARD_BYTES = 2 * 1024**3
"""Largest safetensors file of a gathered final folder (rank 0 holds one file's tensors at a time)."""


def is_sharded(checkpoint: Path) -> bool:
    """Written by several processes (torch.distributed.checkpoint), not an HF folder."""
    return (Path(checkpoint) / SHARDED_METADATA).exists()


def _fresh_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    folder.chmod(0o755)


def save_sharded_checkpoint(stage_dir: Path, step: int, model, optimizer, trainer_state: dict, context,
                            *, keep: int = 2) -> Path:
    """Every rank writes its shards of `model` and `optimizer` into `checkpoints/step_<step>/`;
    rank 0 adds `trainer_state` (with every rank's `trainer_state["rng"]`) and renames the folder
    into place once all shards are written, so the checkpoint is complete or absent."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from metis_cli.train.distributed import all_gather_objects, patient, run_on_main

    dest = Path(stage_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = dest.with_name(f".{dest.name}.partial")
    with patient(context):
        run_on_main(context, lambda: _fresh_dir(tmp))
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        rng_by_rank = all_gather_objects(context, trainer_state.get("rng"))

        def finish() -> Path:
            state = {key: value for key, value in trainer_state.items() if key != "rng"}
            torch.save({**state, "step": step, "rng_by_rank": rng_by_rank, "world_size": context.world_size},
                       tmp / TRAINER_STATE)
            _move_into_place(tmp, dest)
            for old in list_checkpoints(stage_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
            return dest

        return run_on_main(context, finish)


def load_sharded_checkpoint(checkpoint: Path, model, optimizer, context) -> dict:
    """Load this rank's shards of a `save_sharded_checkpoint` folder into `model` and `optimizer`
    (any number of processes); the trainer state, with this rank's `rng` (rank 0's when the
    number of processes changed)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from metis_cli.train.distributed import patient

    with patient(context):
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(checkpoint))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer = torch.load(Path(checkpoint) / TRAINER_STATE, weights_only=False)
    rng_by_rank = trainer.pop("rng_by_rank", None) or [None]
    trainer["rng"] = rng_by_rank[context.rank] if len(rng_by_rank) == context.world_size else rng_by_rank[0]
    return trainer


def save_gathered_model_folder(model, tokenizer, dest: Path, context, *, dtype, merge_lora: bool = False) -> Path:
    """One HF model folder (safetensors) at `dest`, written by rank 0 from the sharded `model`:
    full tensors are gathered one at a time (every rank takes part) and written in files of at
    most SAFETENSORS_SHARD_BYTES. A peft model saves its adapter (and, with `merge_lora`, rank 0
    merges it into the base on the CPU for `dest/merged`)."""
    from metis_cli.train.distributed import full_state_dict_iter, patient, run_on_main, unwrap

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.partial")
    model = unwrap(model)
    peft = hasattr(model, "peft_config")
    with patient(context):
        run_on_main(context, lambda: _fresh_dir(tmp))
        writer = _SafetensorsWriter(tmp) if context.is_main else None
        adapter: dict = {}
        for name, tensor in full_state_dict_iter(model, dtype=dtype):
            if writer is None or (peft and "lora_" not in name):
                continue
            if peft:
                adapter[name] = tensor
            else:
                writer.add(name, tensor)

        def finish() -> Path:
            if peft:
                model.save_pretrained(tmp, state_dict=adapter)
            else:
                writer.close()
                import copy

                config = copy.deepcopy(model.config)
                config.dtype = dtype
                config.save_pretrained(tmp)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            copy_processor_files(model, tmp)
            if peft and merge_lora:
                _merge_adapter_folder(tmp, dtype)
            _write_card(tmp, dest.parent)
            _move_into_place(tmp, dest)
            return dest

        return run_on_main(context, finish)


def _merge_adapter_folder(folder: Path, dtype) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from metis_cli.model.loading import adapter_base, model_class

    base_path = adapter_base(str(folder))
    base = model_class(base_path).from_pretrained(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    merged.save_pretrained(folder / "merged")
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder / "merged")
    copy_processor_files(base, folder / "merged")


class _SafetensorsWriter:
    """Tensors into `model.safetensors`, or `model-0000i-of-0000n.safetensors` files plus
    `model.safetensors.index.json` when they exceed one file (the layout save_pretrained writes)."""

    def __init__(self, folder: Path):
        self.folder, self.pending, self.pending_bytes = folder, {}, 0
        self.files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > SAFETENSORS_SHARD_BYTES:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # save_file leaves it private; model folders are shared like save_pretrained's
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        import json

        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.folder / "part-00000.safetensors", self.folder / "model.safetensors")
            return
        weight_map = {}
        for number, names in enumerate(self.files):
            final = f"model-{number + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(self.folder / f"part-{number:05d}.safetensors", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
