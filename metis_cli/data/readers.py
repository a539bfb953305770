"""Reading raw rows from a data source: files, `datasets` save_to_disk folders, `hf:` datasets.

  - a `.jsonl` file (streamed line by line), a `.json` file (a JSON array of rows, or JSON lines),
    a `.parquet` file (streamed in batches);
  - a folder written by `datasets` `save_to_disk` (a Dataset, or a DatasetDict + `split`);
  - `hf:NAME` or `hf:NAME:CONFIG`, loaded with `datasets.load_dataset` (offline here, so it must
    already be in the local Hugging Face cache).
`iter_rows` yields (where, position, row): `where` names the file and line (JSONL, 1-based) or
row (tables, 0-based) for error messages, `position` is that number, and a row that cannot even
be parsed is yielded as a DataError (so malformed_rows="skip" can move on). A missing file, an
unsupported type or an unloadable dataset raises DataError. Rows are plain Python values as Arrow
stores them (images as `{bytes, path}` structs, never decoded). What a row means is
data/datasets.py's.
`datasets` and `pyarrow` are imported only inside functions so that the CLI starts without them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metis_cli.errors import DataError

RawRows = Iterator[tuple[str, int, Any]]


def iter_rows(source) -> RawRows:
    """The rows of a recipe `DataSource` (its path and, for `datasets` sources, its split)."""
    if source.path.startswith("hf:"):
        yield from _iter_dataset(_load_hub(source), source.path)
        return
    path = Path(source.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data file or folder not found; check the data path in the recipe")
    if path.is_dir():
        yield from _iter_dataset(_load_saved(path, source.split), str(path))
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif path.suffix == ".json":
        yield from _iter_json(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DataError(
            f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .json, .parquet, "
            "a `datasets` save_to_disk folder, or hf:NAME"
        )


def _iter_jsonl(path: Path) -> RawRows:
    # Binary lines decoded one by one, so a bad byte is reported on its own line number.
    with path.open("rb") as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            if not raw_line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                row = json.loads(raw_line.decode("utf-8").lstrip("\ufeff"))
            except UnicodeDecodeError:
                row = DataError(f"{where}: not UTF-8 text; save the file as UTF-8 JSON lines")
            except json.JSONDecodeError as error:
                # Yielded, not raised, so that malformed_rows="skip" can move on to the next line.
                row = DataError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno}); "
                    "each line must be one JSON object"
                )
            yield where, line_number, row


def _iter_json(path: Path) -> RawRows:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the file as UTF-8 JSON") from None
    if not text.lstrip().startswith("["):
        yield from _iter_jsonl(path)  # many ".json" files are really JSON lines
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} line {error.lineno}: not valid JSON ({error.msg}); "
            "a .json file must hold one JSON array of row objects, or one object per line"
        ) from None
    for index, row in enumerate(rows):
        yield f"{path} item {index} (0-based)", index, row


def _iter_parquet(path: Path) -> RawRows:
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    index = 0
    for batch in table_file.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{path} row {index} (0-based)", index, row
            index += 1


def _load_saved(path: Path, split: str | None) -> Any:
    import datasets

    if not any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        raise DataError(
            f"{path}: folder is not a `datasets` save_to_disk folder (no dataset_info.json or "
            "dataset_dict.json); point data paths at a file or a saved dataset"
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001
        raise DataError(f"{path}: could not load saved dataset ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, str(path))
    return loaded


def _load_hub(source) -> Any:
    import datasets

    name, _, config = source.path.removeprefix("hf:").partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None, split=source.split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise DataError(
            f"{source.path}: datasets.load_dataset({name!r}) failed: {error}. Without network access "
            "the dataset must already be in the local Hugging Face cache; or save it to a file"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, source.split, source.path)
    return loaded


def _pick_split(splits: Any, split: str | None, label: str) -> Any:
    names = list(splits.keys())
    if split is None:
        if "train" in names:
            return splits["train"]
        if len(names) == 1:
            return splits[names[0]]
        raise DataError(f"{label}: has splits {names}; choose one with `split`")
    if split not in names:
        raise DataError(f"{label}: no split {split!r}; available splits: {names}")
    return splits[split]


def _iter_dataset(dataset: Any, label: str) -> RawRows:
    # Rows decoded as `datasets` decodes them (Json columns, class labels), except that Image
    # features stay the {bytes, path} structs they store, as a parquet file gives them: decoded
    # PIL images of a large set must not sit in memory. Casting the dataset instead would
    # rewrite every row to a cache file.
    features = _undecoded_images(dataset.features)
    index = 0
    for batch in dataset.with_format("arrow").iter(batch_size=256):
        for row in batch.to_pylist():
            yield f"{label} row {index} (0-based)", index, features.decode_example(row)
            index += 1


def _undecoded_images(features: Any) -> Any:
    """`features` with every (nested) `datasets.Image` set to decode=False."""
    import datasets

    def visit(feature: Any) -> Any:
        if isinstance(feature, datasets.Image):
            return datasets.Image(mode=feature.mode, decode=False)
        if isinstance(feature, dict):
            return type(feature)({key: visit(value) for key, value in feature.items()})
        if isinstance(feature, datasets.LargeList):
            return datasets.LargeList(visit(feature.feature))
        if isinstance(feature, datasets.List):
            return datasets.List(visit(feature.feature), length=feature.length)
        if isinstance(feature, list):  # the legacy `[feature]` spelling
            return [visit(feature[0])]
        return feature

    return visit(features)
