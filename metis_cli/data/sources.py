"""Resolve a recipe `DataSource` into examples: files and `datasets` sources via `datasets.py`,
`synthetic:<name>` via the built-in task `data.synthetic.task` names (arithmetic: data/synthetic.py;
vision: data/synthetic_vl.py), materialised once in the run folder (`<run>/data/<name>-<digest>.jsonl`,
plus `<name>-<digest>_images/` with the PNGs of a vision set) so every stage, `metis curate` and
a curious user read the same rows.
"""

from __future__ import annotations

from pathlib import Path

from metis_cli.data.datasets import Example, load_examples
from metis_cli.errors import DataError
from metis_cli.recipe.schema import SYNTHETIC_PREFIX, SYNTHETIC_SETS

__all__ = ["SYNTHETIC_PREFIX", "load_source", "load_sources", "materialize_synthetic", "synthetic_rows"]


def synthetic_rows(name: str, synthetic_cfg) -> list[dict]:
    """Rows of one synthetic set (recipe/schema.py `SYNTHETIC_SETS`), generated deterministically
    from the recipe's `data.synthetic`; each set's generator is seeded with its own offset. Rows of
    the vision task hold their images as PIL images (`synthetic_vl.write_set` saves them)."""
    if name not in SYNTHETIC_SETS:
        raise DataError(f"unknown synthetic set '{name}' (known: {', '.join(SYNTHETIC_SETS)})")
    cfg = synthetic_cfg
    if cfg.task == "vision":
        from metis_cli.data import synthetic_vl

        if name == "knowledge":
            return synthetic_vl.knowledge_examples(cfg.knowledge_examples, cfg.seed, closeup_share=cfg.closeup_share)
        if name == "cold_start":
            return synthetic_vl.cold_start_trajectories(cfg.cold_start_examples, cfg.seed + 1, cfg.hard_share,
                                                        cfg.direct_answer_share)
        if name == "rl":
            return synthetic_vl.rl_prompts(cfg.rl_prompts, cfg.seed + 2, cfg.hard_share)
        return synthetic_vl.eval_prompts(cfg.eval_per_subset, cfg.seed + 3)

    from metis_cli.data import synthetic

    easy_noise = cfg.answer_noise if cfg.task == "mixed" else 0.0  # mixed: the easy SFT answers are imperfect too
    if name == "knowledge":
        rows = synthetic.knowledge_examples(cfg.knowledge_examples, cfg.seed)
        return synthetic.with_easy_answer_noise(rows, easy_noise, cfg.seed)
    if name == "cold_start":
        rows = synthetic.cold_start_trajectories(
            cfg.cold_start_examples, cfg.seed + 1, cfg.direct_answer_share, cfg.hard_share, cfg.answer_noise
        )
        return synthetic.with_easy_answer_noise(rows, easy_noise, cfg.seed + 1)
    if name == "rl":
        return synthetic.rl_prompts(cfg.rl_prompts, cfg.seed + 2, cfg.hard_share)
    return synthetic.eval_prompts(cfg.eval_per_subset, cfg.seed + 3)


def materialize_synthetic(name: str, recipe) -> Path:
    """Write `synthetic:<name>` to `<run>/data/<name>-<params digest>.jsonl` (atomically, once per
    set of `data.synthetic` parameters, so changing one never reuses a stale file) and return it.
    A vision set's PNGs go to `<name>-<digest>_images/` beside it, written before the JSONL."""
    import hashlib
    import json

    cfg = recipe.data.synthetic
    # The arithmetic digest leaves `task` out, and every task leaves out the fields only another
    # task reads, so file names are those written before such fields existed (runs made then
    # are reused, not regenerated).
    exclude = ({"task"} if cfg.task == "arithmetic" else set()) | cfg.fields_for_other_tasks()
    params = json.dumps(cfg.model_dump(mode="json", exclude=exclude or None), sort_keys=True)
    if cfg.task == "vision":
        from metis_cli.data.synthetic_vl import DIGEST_REVISIONS

        if name in DIGEST_REVISIONS:
            params += f":{DIGEST_REVISIONS[name]}"
    digest = hashlib.blake2b(f"{name}:{params}".encode(), digest_size=4).hexdigest()
    path = Path(recipe.run.output_dir) / "data" / f"{name}-{digest}.jsonl"
    if not path.exists():
        if cfg.task == "vision":
            from metis_cli.data.synthetic_vl import write_set

            write_set(synthetic_rows(name, cfg), path)  # images first, then the JSONL atomically
        else:
            from metis_cli.data.synthetic import write_jsonl

            write_jsonl(synthetic_rows(name, cfg), path)  # atomic itself
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
