"""Loading policies: HF model folders (full weights or a LoRA adapter), tokenizers, LoRA wrapping.

A model path may be a folder written by `save_pretrained`, a peft adapter folder (its base is read
from adapter_config.json), or a hub id (needs network). For recipes with `model.build_tiny`, the
tiny model is built at `model.name_or_path` the first time it is needed.

Vision-language models (a config with `vision_config`: Qwen3-VL, Qwen2.5-VL) load with
`AutoModelForImageTextToText` (`AutoModelForCausalLM` refuses their configs); their vision tower
is frozen when `model.freeze_vision` is set and never gets LoRA adapters. Their processor is
model/processor.py's.
"""

from __future__ import annotations

from pathlib import Path

from metis_cli.errors import ModelError


def ensure_base_model(recipe) -> str:
    """Build the tiny base model if the recipe asks for one and it is not there yet."""
    path = recipe.model.name_or_path
    tiny = recipe.model.build_tiny
    if tiny is not None and not (Path(path) / "config.json").exists():
        from metis_cli.model.tiny import build_tiny_model

        if tiny.kind in ("vision", "vision-qwen2.5"):
            from metis_cli.model.tiny_vl import build_tiny_vl_model

            family = "qwen2.5-vl" if tiny.kind == "vision-qwen2.5" else "qwen3-vl"
            build_tiny_vl_model(Path(path), seed=recipe.run.seed, family=family)
            return path

        build_tiny_model(
            Path(path),
            hidden_size=tiny.hidden_size,
            num_layers=tiny.num_layers,
            num_heads=tiny.num_heads,
            intermediate_size=tiny.intermediate_size,
            seed=recipe.run.seed,
        )
    return path


def check_model_path(path: str, field: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1
    if looks_local and not Path(path).exists():
        raise ModelError(f"{field}: model folder not found: {path} (train the stage that writes it first, or fix the path)")


def load_tokenizer(path: str, *, field: str = "model.name_or_path", trust_remote_code: bool = False,
                   chat_template_kwargs: dict | None = None):
    """The tokenizer of a model folder; `chat_template_kwargs` (the recipe's
    `model.chat_template_kwargs`) go to its chat template in every render (data/chat.py)."""
    from transformers import AutoTokenizer

    from metis_cli.data.chat import set_chat_template_kwargs
    from metis_cli.model.runtime import quiet_libraries

    quiet_libraries()
    check_model_path(path, field)
    source = path
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.exists() and not (Path(path) / "tokenizer_config.json").exists():
        source = adapter_base(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"{field}: cannot load a tokenizer from {source}: {error}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_chat_template_kwargs(tokenizer, chat_template_kwargs)
    return tokenizer


def adapter_base(path: str) -> str:
    import json

    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path}/adapter_config.json names no base_model_name_or_path")
    return base


def model_class(path: str, *, trust_remote_code: bool = False):
    """The transformers auto class that loads `path`: image-text-to-text for a vision-language
    config, causal LM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from metis_cli.model.processor import is_vision_language

    if is_vision_language(path, trust_remote_code=trust_remote_code):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def load_model(path: str, *, dtype, device: str, field: str = "model.name_or_path", trust_remote_code: bool = False):
    """A causal LM (or vision-language model) from a model folder or a LoRA adapter folder."""
    from metis_cli.model.runtime import quiet_libraries

    quiet_libraries()
    check_model_path(path, field)
    auto_class = model_class(path, trust_remote_code=trust_remote_code)
    try:
        if (Path(path) / "adapter_config.json").exists():
            from peft import PeftModel

            base = auto_class.from_pretrained(adapter_base(path), dtype=dtype, trust_remote_code=trust_remote_code)
            model = PeftModel.from_pretrained(base, path)
        else:
            model = auto_class.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"{field}: cannot load a model from {path}: {error}") from None
    return model.to(device)


def unwrapped(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def vision_tower_name(model) -> str | None:
    """The module name of the model's vision tower (`model.visual` in Qwen3-VL and Qwen2.5-VL,
    projector included), or None for a text-only model."""
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in _VISION_TOWER_NAMES:
            return name
    return None


_VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")


def freeze_vision_tower(model) -> int:
    """Stop training the vision tower; returns how many parameters were frozen (0: none there)."""
    tower = vision_tower_name(model)
    if tower is None:
        return 0
    parameters = list(model.get_submodule(tower).parameters())
    for parameter in parameters:
        parameter.requires_grad_(False)
    return sum(parameter.numel() for parameter in parameters)


def apply_lora(model, lora_cfg):
    """Wrap `model` with a fresh LoRA adapter from the recipe (`model.lora`).

    Adapters go on the language model only: `target_modules` names (q_proj, ...) also occur in
    vision towers (Qwen2.5-VL's vision MLP has gate/up/down_proj), so the tower is excluded.
    """
    import re

    from peft import LoraConfig, get_peft_model

    tower = vision_tower_name(model)
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        exclude_modules=rf"{re.escape(tower)}\..*" if tower else None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ModelError(f"model.lora.target_modules: {error}") from None


def load_policy(path: str, recipe, *, device: str, field: str, trainable: bool = True):
    """(model, tokenizer) for training: full weights, or LoRA on top when `model.lora.enabled`.

    An adapter folder is loaded trainable (continuing LoRA training); a full model gets a new
    adapter when LoRA is enabled.
    """
    from metis_cli.model.runtime import pick_dtype

    dtype = pick_dtype(recipe.model.dtype, device)
    tokenizer = load_tokenizer(path, field=field, trust_remote_code=recipe.model.trust_remote_code,
                               chat_template_kwargs=recipe.model.chat_template_kwargs)
    if (Path(path) / "adapter_config.json").exists():
        from peft import PeftModel

        auto_class = model_class(path, trust_remote_code=recipe.model.trust_remote_code)
        base = auto_class.from_pretrained(adapter_base(path), dtype=dtype)
        model = PeftModel.from_pretrained(base, path, is_trainable=trainable).to(device)
    else:
        model = load_model(path, dtype=dtype, device=device, field=field,
                           trust_remote_code=recipe.model.trust_remote_code)
        if recipe.model.lora.enabled and trainable:
            model = apply_lora(model, recipe.model.lora)
        elif recipe.model.freeze_vision:
            freeze_vision_tower(model)
    return model, tokenizer
