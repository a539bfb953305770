"""The processor of a vision-language policy (tokenizer + image processor), images only.

`load_processor` returns transformers' own processor class for the model (`Qwen3VLProcessor`,
`Qwen2_5_VLProcessor`, ...). Where torchvision is installed (GPU machines) it is exactly what
`AutoProcessor.from_pretrained` gives. Where it is not (torchvision cannot be installed beside
torch 2.13.0+cpu), those classes cannot be built, because their video processor needs
torchvision; metis then builds the same class without its video processor (video is out of scope)
and with the image processor's PIL backend (`Qwen2VLImageProcessorPil`). Images, placeholder
expansion, `image_grid_thw` and `mm_token_type_ids` come out the same either way.

`save_processor` writes a processor next to a model, and keeps the folder loadable by
`AutoProcessor` and vLLM on machines with torchvision: an images-only processor has no video
settings of its own, so the source folder's are written back (`video_preprocessor_config.json`).

Must not touch: model weights (loading.py) or how images are read and sized (data/images.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from metis_cli.errors import ModelError
from metis_cli.model.loading import unwrapped

VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
_PROCESSOR_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def is_vision_language(path: str, *, trust_remote_code: bool = False) -> bool:
    """True when the model at `path` (a model folder, an adapter folder or a hub id) has a
    vision tower, i.e. its config has a `vision_config` (Qwen3-VL, Qwen2.5-VL, Qwen2-VL)."""
    from transformers import AutoConfig

    from metis_cli.model.loading import adapter_base

    source = adapter_base(path) if (Path(path) / "adapter_config.json").exists() else path
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False  # the model loader reports the unreadable folder with its field name
    return getattr(config, "vision_config", None) is not None


def load_processor(path: str, *, field: str = "model.name_or_path", trust_remote_code: bool = False):
    """The model's processor: `processor(images=..., text=..., return_tensors="pt")` gives
    input_ids, attention_mask, mm_token_type_ids, pixel_values and image_grid_thw."""
    from transformers.utils import is_torchvision_available

    from metis_cli.model.loading import adapter_base, check_model_path
    from metis_cli.model.runtime import quiet_libraries

    quiet_libraries()
    check_model_path(path, field)
    source = path
    if (Path(path) / "adapter_config.json").exists() and not _has_processor_files(Path(path)):
        source = adapter_base(path)
    try:
        if is_torchvision_available():
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        else:
            processor = _images_only_processor(source, trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"{field}: cannot load a processor from {source}: {error}") from None
    if getattr(processor, "image_processor", None) is None:
        raise ModelError(f"{field}: {source} has no image processor; a vision-language model folder "
                         "holds preprocessor_config.json or processor_config.json beside its weights")
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def save_processor(processor, folder: str | Path) -> None:
    """`processor.save_pretrained(folder)`, plus the video settings an images-only processor
    lacks, so transformers' own `AutoProcessor` (and vLLM) load the folder where torchvision is."""
    folder = Path(folder)
    processor.save_pretrained(folder)
    video_config = getattr(processor, "video_config", None)
    if getattr(processor, "video_processor", None) is None and video_config:
        (folder / VIDEO_CONFIG_FILE).write_text(json.dumps(video_config, indent=2) + "\n", encoding="utf-8")


def images_only(processor_class):
    """`processor_class` (e.g. Qwen3VLProcessor) built without its video processor.

    ProcessorMixin takes its sub-processors from `get_attributes()`; leaving `video_processor`
    out there makes the class's own `__init__` drop it, while every image code path (placeholder
    expansion, `mm_token_type_ids`) stays the class's own. The subclass keeps the class name, so
    `save_pretrained` records the real `processor_class`.
    """

    class ImagesOnly(processor_class):
        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__
    ImagesOnly.__doc__ = f"{processor_class.__name__} for images only (metis_cli/model/processor.py)."
    return ImagesOnly


def _images_only_processor(source: str, trust_remote_code: bool):
    import transformers
    from transformers import AutoImageProcessor

    from metis_cli.model.loading import load_tokenizer

    class_name = _processor_class_name(source, trust_remote_code)
    processor_class = getattr(transformers, class_name, None) if class_name else None
    if processor_class is None:
        raise ValueError(f"no processor class known for this model (processor_class {class_name!r})")
    image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    if "video_processor" not in processor_class.get_attributes():
        return processor_class(image_processor=image_processor, tokenizer=tokenizer,
                               chat_template=tokenizer.chat_template)
    processor = images_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=tokenizer.chat_template)
    processor.video_config = _video_config(source)  # not a processor setting: never serialised by it
    return processor


def _processor_class_name(source: str, trust_remote_code: bool) -> str | None:
    for name in _PROCESSOR_CONFIG_FILES:
        config_file = Path(source) / name
        if config_file.is_file():
            recorded = json.loads(config_file.read_text(encoding="utf-8")).get("processor_class")
            if recorded:
                return recorded
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).model_type
    return PROCESSOR_MAPPING_NAMES.get(model_type)


def _video_config(source: str) -> dict | None:
    """The source folder's video processor settings (kept to be written back on save)."""
    video_file = Path(source) / VIDEO_CONFIG_FILE
    if video_file.is_file():
        return json.loads(video_file.read_text(encoding="utf-8"))
    processor_file = Path(source) / "processor_config.json"
    if processor_file.is_file():
        return json.loads(processor_file.read_text(encoding="utf-8")).get("video_processor")
    return None


def _has_processor_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", VIDEO_CONFIG_FILE)
"""A vision-language model folder's processor settings beside the tokenizer files."""


def copy_processor_files(model, folder: str | Path) -> None:
    """Copy the processor settings of the folder `model` was loaded from into `folder`, so a
    saved vision-language model loads with its processor (transformers, vLLM, every metis stage).
    Nothing happens for a text-only model or one not loaded from a folder."""
    import shutil

    base = unwrapped(model)
    config = getattr(base, "config", None)
    if getattr(config, "vision_config", None) is None:
        return
    source = Path(getattr(base, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")
    if not source.is_dir() or source.resolve() == Path(folder).resolve():
        return
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, Path(folder) / name)
