"""The eval report's maths: figures per model and subset from finished answers. Torch-free.

Input is one `Answer` per (question, sample) a model produced with tools on, and optionally one
per (question, sample) it produced with tools off (`--redundancy`). Every figure is a plain
function of those, so tests check them on hand-made answers.

Figures of a group of answers (one subset, or "all"):
  accuracy                share of scored answers that are correct (unscored ones are counted
                          separately, never as wrong: docs/algorithm.md)
  pass@k                  (sampling, k = samples per question) unbiased estimator
                          1 - C(n-c, k) / C(n, k) per question, averaged over questions
  tool_call_ratio         share of answers with >= 1 tool call
  tool_calls_mean         tool calls per answer (T, malformed calls included)
  tool_errors             error observations, with a count per kind in tool_error_kinds
  generated_tokens_mean   sampled tokens per answer (tool output excluded)
  prompt_images           (image data only) images the questions showed, summed over answers
  tool_images             (image data only) images tools returned inside the answers (zoom_in crops, ...)
  wall_s_per_question     wall time of the model's pass over the subset / questions in it
Tool economy, from the recipe's per-tool prices (`tools.costs`): every call addressed to a
priced tool is charged, failed calls included (a paid API bills those too):
  cost_usd_per_1k_answers     1000 * mean over answers of sum_tool calls * usd_per_call
  tool_latency_s_per_answer   mean over answers of sum_tool calls * latency_s
  tool_s_mean                 tool runtime measured here, per answer
Redundancy (needs the tools-off answers). A question is "solved alone" when at least half of the
model's scored tools-off answers to it are correct (with greedy decoding: its one answer is):
  no_tool_accuracy            accuracy of the tools-off answers
  solved_alone_share          share of questions solved alone
  redundant_tool_share        of the answers that called a tool, the share to questions solved
                              alone: calls the model did not need (the paper's target)
  needed_tool_share           of the answers to questions not solved alone, the share that
                              called a tool: the tool was needed and the model used it
  redundant_cost_usd_per_1k_answers   what the redundant calls cost, per 1000 answers
Undefined figures (no answers to average) are None, so report.json never holds NaN.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

ALL_SUBSETS = "all"


@dataclass
class Answer:
    """One finished answer of one model to one question (one sample of it)."""

    question_id: str
    subset: str
    correct: bool | None  # None: the checker could not score it
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)  # error kind -> count
    calls_by_tool: dict[str, int] = field(default_factory=dict)  # tool name -> calls addressed to it
    generated_tokens: int = 0
    tool_s: float = 0.0  # tool runtime measured on this machine
    sample: int = 0
    prompt_images: int = 0  # images the question showed (vision-language data)
    tool_images: int = 0  # images tools returned inside the answer


@dataclass(frozen=True)
class ToolPrice:
    usd_per_call: float = 0.0
    latency_s: float = 0.0


@dataclass
class ModelAnswers:
    """Everything one model produced in one eval: its answers, tools-off answers, pass wall times."""

    name: str
    path: str
    answers: list[Answer]
    no_tool_answers: list[Answer] | None = None
    wall_s_by_subset: dict[str, float] = field(default_factory=dict)


def tool_prices(costs: Mapping[str, Any] | None) -> dict[str, ToolPrice]:
    """The recipe's `tools.costs` (ToolCost objects or plain dicts) as ToolPrices."""
    prices = {}
    for name, cost in (costs or {}).items():
        if isinstance(cost, Mapping):
            prices[name] = ToolPrice(float(cost.get("usd_per_call", 0.0)), float(cost.get("latency_s", 0.0)))
        else:
            prices[name] = ToolPrice(float(cost.usd_per_call), float(cost.latency_s))
    return prices


def calls_by_tool(messages: Iterable[dict]) -> dict[str, int]:
    """Tool name -> calls, counted from the `tool` turns of a trajectory (each answers one call).

    Turns without a name answer calls that named no tool (malformed ones): nobody is billed.
    """
    counts = Counter(m["name"] for m in messages if m.get("role") == "tool" and m.get("name"))
    return dict(counts)


def answer_cost_usd(answer: Answer, prices: Mapping[str, ToolPrice]) -> float:
    return sum(calls * prices[name].usd_per_call for name, calls in answer.calls_by_tool.items() if name in prices)


def answer_tool_latency_s(answer: Answer, prices: Mapping[str, ToolPrice]) -> float:
    return sum(calls * prices[name].latency_s for name, calls in answer.calls_by_tool.items() if name in prices)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which `correct` are right (Chen et al. 2021)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def solved_alone(no_tool_answers: Iterable[Answer]) -> dict[str, bool]:
    """question_id -> solved without tools (>= half of its scored tools-off answers correct).

    Questions whose tools-off answers were all unscored are left out.
    """
    outcomes: dict[str, list[bool]] = defaultdict(list)
    for answer in no_tool_answers:
        if answer.correct is not None:
            outcomes[answer.question_id].append(answer.correct)
    return {question: 2 * sum(results) >= len(results) for question, results in outcomes.items()}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def figures(
    answers: list[Answer],
    prices: Mapping[str, ToolPrice],
    *,
    samples: int = 1,
    wall_s: float | None = None,
    no_tool_answers: list[Answer] | None = None,
) -> dict[str, Any]:
    """The figures of one group of answers (module docstring has the definitions)."""
    scored = [a for a in answers if a.correct is not None]
    questions = {a.question_id for a in answers}
    error_kinds: Counter[str] = Counter()
    for answer in answers:
        error_kinds.update(answer.tool_errors)
    result: dict[str, Any] = {
        "questions": len(questions),
        "answers": len(answers),
        "unscored": len(answers) - len(scored),
        "accuracy": _share(sum(a.correct for a in scored), len(scored)),
        "tool_call_ratio": _share(sum(a.tool_calls >= 1 for a in answers), len(answers)),
        "tool_calls_mean": _mean([a.tool_calls for a in answers]),
        "tool_errors": sum(error_kinds.values()),
        "tool_error_kinds": dict(sorted(error_kinds.items())),
        "generated_tokens_mean": _mean([a.generated_tokens for a in answers]),
        "wall_s_per_question": wall_s / len(questions) if wall_s is not None and questions else None,
        "tool_s_mean": _mean([a.tool_s for a in answers]),
        "cost_usd_per_1k_answers": _scaled(_mean([answer_cost_usd(a, prices) for a in answers]), 1000),
        "tool_latency_s_per_answer": _mean([answer_tool_latency_s(a, prices) for a in answers]),
    }
    if any(a.prompt_images or a.tool_images for a in answers):  # image data: what the answers looked at
        result["prompt_images"] = sum(a.prompt_images for a in answers)
        result["tool_images"] = sum(a.tool_images for a in answers)
    if samples > 1:
        result[f"pass@{samples}"] = _pass_at(scored, samples)
    if no_tool_answers is not None:
        result.update(redundancy_figures(answers, no_tool_answers, prices))
    return result


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _pass_at(scored: list[Answer], k: int) -> float | None:
    """Mean unbiased pass@k over questions with at least k scored samples."""
    outcomes: dict[str, list[bool]] = defaultdict(list)
    for answer in scored:
        outcomes[answer.question_id].append(bool(answer.correct))
    per_question = [pass_at_k(len(r), sum(r), k) for r in outcomes.values() if len(r) >= k]
    return _mean(per_question)


def redundancy_figures(answers: list[Answer], no_tool_answers: list[Answer],
                       prices: Mapping[str, ToolPrice]) -> dict[str, float | None]:
    """Tools-on answers judged against what the same model solves with tools off."""
    alone = solved_alone(no_tool_answers)
    judged = [a for a in answers if a.question_id in alone]
    tool_using = [a for a in judged if a.tool_calls >= 1]
    redundant = [a for a in tool_using if alone[a.question_id]]
    needed = [a for a in judged if not alone[a.question_id]]
    questions = {a.question_id for a in judged}
    scored_off = [a for a in no_tool_answers if a.correct is not None]
    return {
        "no_tool_accuracy": _share(sum(a.correct for a in scored_off), len(scored_off)),
        "solved_alone_share": _share(sum(alone[q] for q in questions), len(questions)),
        "redundant_tool_share": _share(len(redundant), len(tool_using)),
        "needed_tool_share": _share(sum(a.tool_calls >= 1 for a in needed), len(needed)),
        "redundant_cost_usd_per_1k_answers": (
            1000 * sum(answer_cost_usd(a, prices) for a in redundant) / len(judged) if judged else None
        ),
    }


def model_figures(model: ModelAnswers, prices: Mapping[str, ToolPrice], *, samples: int = 1) -> dict[str, dict]:
    """Subset -> figures for one model, plus "all" over every subset."""
    subsets = sorted({a.subset for a in model.answers})
    result = {}
    for subset in subsets + [ALL_SUBSETS]:
        everything = subset == ALL_SUBSETS
        answers = [a for a in model.answers if everything or a.subset == subset]
        no_tool = None
        if model.no_tool_answers is not None:
            no_tool = [a for a in model.no_tool_answers if everything or a.subset == subset]
        walls = list(model.wall_s_by_subset.values()) if everything else [model.wall_s_by_subset.get(subset)]
        wall_s = sum(walls) if walls and None not in walls else None
        result[subset] = figures(answers, prices, samples=samples, wall_s=wall_s, no_tool_answers=no_tool)
    return result


def build_report(
    models: list[ModelAnswers],
    costs: Mapping[str, Any] | None,
    *,
    samples: int = 1,
    temperature: float | None = None,
    recipe_name: str | None = None,
    training_run: str | None = None,
) -> dict[str, Any]:
    """The whole report (what report.json holds and `--json` prints)."""
    prices = tool_prices(costs)
    entries = []
    for model in models:
        called = {name for a in model.answers for name in a.calls_by_tool}
        entries.append({
            "name": model.name,
            "path": model.path,
            "subsets": model_figures(model, prices, samples=samples),
            "unpriced_tools": sorted(called - set(prices)),
        })
    subsets = sorted({a.subset for m in models for a in m.answers})
    return {
        "recipe": recipe_name,
        "created": time.time(),
        "samples": samples,
        "decoding": "greedy" if samples == 1 else f"sampling, temperature {temperature}",
        "redundancy": any(m.no_tool_answers is not None for m in models),
        "subsets": subsets,
        "tool_costs": {name: {"usd_per_call": p.usd_per_call, "latency_s": p.latency_s} for name, p in prices.items()},
        "models": entries,
        "training_run": training_run,
    }


def unscored_subsets(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(model, subset) of every subset with answers of which none could be scored (the judge gave
    no verdict): its accuracy is unknown, not 0. The "all" row is left out."""
    return [(model["name"], subset) for model in report["models"] for subset, figures in model["subsets"].items()
            if subset != ALL_SUBSETS and figures["answers"] and figures["unscored"] == figures["answers"]]
