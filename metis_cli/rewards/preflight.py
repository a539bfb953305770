"""Preflight: before a stage loads any model, check every outside endpoint it will call.

A stage that scores with the LLM judge (`reward.judge`, or curate's `curate.filters.judge`) or
runs a web search tool (`tools.search.backend: http`) first asks each endpoint once:
  judge   GET <base_url>/models with the key: reachable, key accepted, `model` listed;
  search  POST {"q": ...} to `tools.search.http.url` with the key: reachable, key accepted, a
          JSON object back (one search query per start).
Every problem is reported at once as an EndpointError (exit 2) naming the recipe field and the
URL, instead of minutes of model loading followed by a run that trains on nothing
(docs/faults.md). Only the endpoints the stage will call are checked (`stage_endpoints`).

Must not touch: scoring (rewards/judge.py) or the tools themselves (agent/tools/search.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from metis_cli.errors import EndpointError

PREFLIGHT_TIMEOUT_S = 10.0
"""At most this long per endpoint (less when its own timeout_s is shorter)."""
SEARCH_PROBE_QUERY = "metis preflight"

Stage = Literal["hdpo", "eval", "curate"]


@dataclass(frozen=True)
class Endpoint:
    """One outside service a stage will call. `field` is its recipe section (reward.judge)."""

    kind: Literal["judge", "search"]
    field: str
    url: str
    api_key_env: str
    timeout_s: float
    model: str | None = None  # judge: the model that must be listed
    key_header: str | None = None  # search: the header carrying the key (a judge sends a Bearer token)


def judge_endpoint(judge_cfg, field: str) -> Endpoint:
    timeout_s = getattr(judge_cfg, "timeout_s", None) or PREFLIGHT_TIMEOUT_S
    return Endpoint("judge", field, judge_cfg.base_url, judge_cfg.api_key_env, timeout_s, model=judge_cfg.model)


def search_endpoint(tools_cfg) -> Endpoint | None:
    search = tools_cfg.search
    if "search" not in tools_cfg.enabled or getattr(search, "backend", "bm25") != "http" or not search.http.url:
        return None  # no url: building the tool reports it with its own message
    http = search.http
    return Endpoint("search", "tools.search.http", http.url, http.api_key_env, http.timeout_s,
                    key_header=http.api_key_header)


def stage_endpoints(recipe, stage: Stage) -> list[Endpoint]:
    """The endpoints `stage` will call with this recipe."""
    reward_judge = recipe.reward.judge if recipe.reward.checker == "judge" else None
    tools = search_endpoint(recipe.tools)
    if stage in ("hdpo", "eval"):
        found = [judge_endpoint(reward_judge, "reward.judge") if reward_judge is not None else None, tools]
    else:
        curate = recipe.curate
        filters = curate.filters
        if curate.mode == "sft":
            scores = filters.necessity.enabled  # samples tool-free answers and checks them
            runs_tools = filters.execution.enabled
            filter_judge = judge_endpoint(filters.judge, "curate.filters.judge") if filters.judge.enabled else None
        else:
            scores = runs_tools = filters.rl_filter.enabled
            filter_judge = None
        found = [filter_judge, judge_endpoint(reward_judge, "reward.judge") if reward_judge and scores else None,
                 tools if runs_tools else None]
    return [endpoint for endpoint in found if endpoint is not None]


def preflight(recipe, stage: Stage) -> None:
    """Raise EndpointError listing every endpoint of `stage` that is not usable; else nothing."""
    problems = [problem for endpoint in stage_endpoints(recipe, stage) if (problem := check(endpoint))]
    if len(problems) == 1:
        raise EndpointError(problems[0])
    if problems:
        raise EndpointError(f"{len(problems)} endpoints are not usable:\n" + "\n".join(f"  - {p}" for p in problems))


def check(endpoint: Endpoint) -> str | None:
    """What is wrong with `endpoint` (one line naming its field and URL), or None when usable."""
    import httpx

    key = os.environ.get(endpoint.api_key_env)
    timeout_s = min(endpoint.timeout_s, PREFLIGHT_TIMEOUT_S)
    what = "the judge" if endpoint.kind == "judge" else "the search API"
    try:
        if endpoint.kind == "judge":
            response = httpx.get(_models_url(endpoint.url), timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {key or 'EMPTY'}"})
        else:
            headers = {endpoint.key_header: key} if key and endpoint.key_header else {}
            response = httpx.post(endpoint.url, json={"q": SEARCH_PROBE_QUERY}, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        return (f"{_url_field(endpoint)}: {what} at {endpoint.url} did not answer within {timeout_s:g} s; "
                "start it or fix the URL, then rerun")
    except httpx.HTTPError as error:
        return (f"{_url_field(endpoint)}: cannot reach {what} at {endpoint.url} ({type(error).__name__}: {error}); "
                "start it or fix the URL, then rerun")
    status = response.status_code
    if status in (401, 403):
        state = "is unset" if not key else "holds a key it refuses"
        return (f"{endpoint.field}.api_key_env: {what} at {endpoint.url} rejected the API key (HTTP {status}); "
                f"the environment variable {endpoint.api_key_env} {state}: set it to a valid key")
    if endpoint.kind == "search" and status == 429:
        return None  # reachable and the key is accepted; only this minute's quota is used up
    if status in (404, 405):
        hint = "a judge's base_url usually ends in /v1" if endpoint.kind == "judge" else "check the URL"
        return f"{_url_field(endpoint)}: {what} at {endpoint.url} has no such endpoint (HTTP {status}); {hint}"
    if status != 200:
        return f"{_url_field(endpoint)}: {what} at {endpoint.url} answered HTTP {status}; check the service, then rerun"
    if endpoint.kind == "search":
        return None if isinstance(_json(response), dict) else (
            f"{_url_field(endpoint)}: the search API at {endpoint.url} did not reply with a JSON object; "
            "is it a Serper-style search API?")
    return _model_problem(endpoint, _json(response))


def _model_problem(endpoint: Endpoint, listing) -> str | None:
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        return (f"{endpoint.field}.base_url: {_models_url(endpoint.url)} did not return an OpenAI model list; "
                "is it an OpenAI-compatible endpoint (base_url usually ends in /v1)?")
    served = [str(entry.get("id")) for entry in entries if isinstance(entry, dict)]
    if endpoint.model in served:
        return None
    shown = ", ".join(served[:8]) + (f" and {len(served) - 8} more" if len(served) > 8 else "")
    return (f"{endpoint.field}.model: the judge at {endpoint.url} does not serve {endpoint.model!r} "
            f"(it serves: {shown or 'nothing'}); set {endpoint.field}.model to one of those")


def _models_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/models"


def _url_field(endpoint: Endpoint) -> str:
    return f"{endpoint.field}.{'base_url' if endpoint.kind == 'judge' else 'url'}"


def _json(response):
    try:
        return response.json()
    except ValueError:
        return None
