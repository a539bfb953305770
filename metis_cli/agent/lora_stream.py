"""A LoRA policy's weights as a vLLM engine loads them, streamed: the merged weight of each adapted
layer (W + scaling * B @ A) under the base model's names, built from the (name, full tensor)
pairs of the trainer's model one layer at a time -- the stream several processes gather from
their FSDP shards (`train.distributed.full_state_dict_iter`), so no rank holds the whole merged
model outside its engine. One process feeds it the unsharded model's state dict
(agent/vllm_backend.py `checkpoint_weights`).

Only plain LoRA on linear layers merges from its parameters alone; DoRA, and adapters on
embeddings or convolutions, are refused by `lora_layers` with a message.

Must not touch: the trainer's model (nothing is merged in place), the engine (the caller loads).
"""

from __future__ import annotations

from typing import Any, Iterator

from metis_cli.errors import ModelError

def merged_lora_stream(model, named_tensors) -> Iterator[tuple[str, Any]]:
    """(checkpoint name, tensor) pairs as vLLM loads them, from `named_tensors`: the (name, full
    tensor) pairs of `model` in `named_parameters` order, e.g. gathered from the FSDP shards one at
    a time (`train.distributed.full_state_dict_iter`). For a peft LoRA model each adapted layer's
    weight comes out once its base weight and adapters have passed, merged (W + scaling * B @ A,
    as peft's merge_and_unload; a layer peft has merged already passes as it is), under the base
    model's own name, so at most one layer's tensors are held at a time; other tensors pass
    through renamed. Any other model: unchanged."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        yield from named_tensors
        return
    layers = lora_layers(model)
    pending: dict[str, dict] = {}
    for name, tensor in named_tensors:
        owner = next((name.split(mark)[0] for mark in (".lora_A.", ".lora_B.", ".base_layer.") if mark in name), None)
        if owner is None or owner not in layers:
            yield _base_name(name), tensor
            continue
        if ".base_layer." in name and not name.endswith(".base_layer.weight"):  # its bias
            yield _base_name(name), tensor
            continue
        parts = pending.setdefault(owner, {})
        parts["weight" if ".base_layer." in name else name[len(owner) + 1 :]] = tensor
        module = layers[owner]
        adapters = [] if module.merged else [a for a in module.active_adapters if a in module.lora_A]
        needed = ["weight", *(f"lora_{ab}.{a}.weight" for a in adapters for ab in "AB")]
        if all(key in parts for key in needed):
            merged = parts["weight"].clone()
            for adapter in adapters:
                delta = parts[f"lora_B.{adapter}.weight"].float() @ parts[f"lora_A.{adapter}.weight"].float()
                delta = delta.T if module.fan_in_fan_out else delta
                merged += (delta * module.scaling[adapter]).to(merged.dtype)
            del pending[owner]
            yield _base_name(f"{owner}.weight"), merged


def lora_layers(model) -> dict:
    """{parameter-name prefix: layer} of a peft LoRA model's adapted layers; a ModelError for an
    adapter `merged_lora_stream` cannot merge from its parameters alone (DoRA, LoRA on embeddings
    or convolutions)."""
    from peft.tuners.lora import Linear, LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, Linear) or any(module.use_dora.get(a) for a in module.active_adapters):
            raise ModelError(f"model.lora: the adapter on {name} ({type(module).__name__}"
                             f"{', DoRA' if isinstance(module, Linear) else ''}) cannot be merged into the "
                             "weights a vLLM engine serves, only plain LoRA on linear layers; use "
                             "rollout.backend: hf")
        layers[name] = module
    return layers


def _base_name(name: str) -> str:
    """A peft model's parameter name as the base model's checkpoint has it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")
