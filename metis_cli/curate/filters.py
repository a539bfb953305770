"""The filter contract, dedup (filter 5), and which filters a recipe runs, in which order.

A filter has a `name` and `apply(rows)`, which sees only rows every earlier filter kept, and
calls `row.drop(...)` / `row.note(...)` on them. Order (the order of `curate.filters`):
  sft: validity -> execution -> necessity -> judge -> dedup
  rl:  validity -> dedup -> rl_filter   (dedup first here: rollouts on duplicates would be wasted)
Dedup keeps the first row per normalized prompt among rows that reached it, so in sft mode the
first *good* trajectory of a prompt survives, not merely the first one.
Building a filter may load a model or open a judge client; only enabled filters are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from metis_cli.curate.rows import Candidate

SFT_ORDER = ("validity", "execution", "necessity", "judge", "dedup")
RL_ORDER = ("validity", "dedup", "rl_filter")
ALL_FILTERS = ("validity", "execution", "necessity", "judge", "dedup", "rl_filter")


class RowFilter(Protocol):
    name: str

    def apply(self, rows: list[Candidate]) -> None: ...


class DedupFilter:
    name = "dedup"

    def __init__(self, first_ids: dict[str, str] | None = None):
        # normalized-prompt key -> id of the row kept for it (rebuilt from decisions on --resume)
        self.first_ids: dict[str, str] = dict(first_ids or {})

    def apply(self, rows: list[Candidate]) -> None:
        for row in rows:
            key = row.prompt_key
            if key in self.first_ids:
                row.drop(self.name, "duplicate prompt", f"same prompt as row {self.first_ids[key]!r}")
            else:
                self.first_ids[key] = row.example.id


@dataclass
class FilterPlan:
    """Every filter of the recipe: the ones that run (in order) and why the others do not."""

    active: list[RowFilter]
    skipped: dict[str, str]  # filter name -> "disabled" / "rl mode only" / ...


def planned_filters(curate_cfg) -> tuple[list[str], dict[str, str]]:
    """(names that run, in order; name -> why not) from the recipe alone, without building anything."""
    order = SFT_ORDER if curate_cfg.mode == "sft" else RL_ORDER
    skipped: dict[str, str] = {}
    for name in ALL_FILTERS:
        if name not in order:
            skipped[name] = f"{'rl' if curate_cfg.mode == 'sft' else 'sft'} mode only"
        elif not getattr(curate_cfg.filters, name).enabled:
            skipped[name] = "disabled"
    running = [name for name in order if name not in skipped]
    return running, skipped


def build_filters(recipe, *, dedup_first_ids: dict[str, str] | None = None) -> FilterPlan:
    """Build the enabled filters of `recipe.curate` (models and judge clients are set up here)."""
    cfg = recipe.curate
    running, skipped = planned_filters(cfg)
    filters = cfg.filters
    active: list[RowFilter] = []
    for name in running:
        if name == "validity":
            from metis_cli.curate.validity import ValidityFilter

            active.append(ValidityFilter(cfg.mode, filters.validity.require_gold_answer))
        elif name == "execution":
            from metis_cli.agent.factory import build_registry
            from metis_cli.curate.execution import ExecutionFilter

            active.append(ExecutionFilter(build_registry(recipe), filters.execution.ignore_output_of))
        elif name == "necessity":
            from metis_cli.curate.sampling import NecessityFilter, PassRateSampler

            sampler = PassRateSampler(recipe, filters.necessity.model, field="curate.filters.necessity.model",
                                      use_tools=False)
            active.append(NecessityFilter(sampler, filters.necessity.k))
        elif name == "judge":
            from metis_cli.curate.judge import JudgeFilter

            active.append(JudgeFilter(filters.judge))
        elif name == "dedup":
            active.append(DedupFilter(dedup_first_ids))
        elif name == "rl_filter":
            from metis_cli.curate.sampling import PassRateSampler, RlPassRateFilter

            sampler = PassRateSampler(recipe, filters.rl_filter.model, field="curate.filters.rl_filter.model",
                                      use_tools=True)
            active.append(RlPassRateFilter(sampler, filters.rl_filter.k))
    return FilterPlan(active, skipped)
