"""Resolve a recipe `DataSource` into examples: files and `datasets` sources via `datasets.py`,
`synthetic:<name>` via the built-in arithmetic task, materialised once as JSONL in the run folder
(`<run>/data/<name>.jsonl`) so every stage, `metis curate` and a curious user read the same rows.
"""

from __future__ import annotations

from pathlib import Path

from metis_cli.data.datasets import Example, load_examples
from metis_cli.errors import DataError
from metis_cli.recipe.schema import SYNTHETIC_PREFIX, SYNTHETIC_SETS

__all__ = ["SYNTHETIC_PREFIX", "load_source", "load_sources", "materialize_synthetic", "synthetic_rows"]


def synthetic_rows(name: str, synthetic_cfg) -> list[dict]:
    """Rows of one synthetic set (recipe/schema.py `SYNTHETIC_SETS`), generated deterministically
    from the recipe's `data.synthetic`; each set's generator is seeded with its own offset."""
    from metis_cli.data import synthetic

    cfg = synthetic_cfg
    if name == "knowledge":
        return synthetic.knowledge_examples(cfg.knowledge_examples, cfg.seed)
    if name == "cold_start":
        return synthetic.cold_start_trajectories(
            cfg.cold_start_examples, cfg.seed + 1, cfg.direct_answer_share, cfg.hard_share, cfg.answer_noise
        )
    if name == "rl":
        return synthetic.rl_prompts(cfg.rl_prompts, cfg.seed + 2, cfg.hard_share)
    if name == "eval":
        return synthetic.eval_prompts(cfg.eval_per_subset, cfg.seed + 3)
    raise DataError(f"unknown synthetic set '{name}' (known: {', '.join(SYNTHETIC_SETS)})")


def materialize_synthetic(name: str, recipe) -> Path:
    """Write `synthetic:<name>` to `<run>/data/<name>-<params digest>.jsonl` (atomically, once per
    set of `data.synthetic` parameters, so changing one never reuses a stale file) and return it."""
    import hashlib
    import json

    from metis_cli.data.synthetic import write_jsonl

    params = json.dumps(recipe.data.synthetic.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.blake2b(f"{name}:{params}".encode(), digest_size=4).hexdigest()
    path = Path(recipe.run.output_dir) / "data" / f"{name}-{digest}.jsonl"
    if not path.exists():
        write_jsonl(synthetic_rows(name, recipe.data.synthetic), path)  # atomic itself
    return path


def load_source(source, recipe, *, need_answer: bool = True) -> list[Example]:
    """All examples of one recipe DataSource (synthetic sets are materialised first)."""
    if source.path.startswith(SYNTHETIC_PREFIX):
        path = materialize_synthetic(source.path[len(SYNTHETIC_PREFIX):], recipe)
        source = source.model_copy(update={"path": str(path)})
    return load_examples(source, need_answer=need_answer, malformed_rows=recipe.data.malformed_rows)


def load_sources(sources, recipe, *, need_answer: bool = True) -> list[Example]:
    examples: list[Example] = []
    for source in sources:
        examples.extend(load_source(source, recipe, need_answer=need_answer))
    return examples
