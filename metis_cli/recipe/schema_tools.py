"""The recipe's `tools` section: which tools the agent may call and their limits (python sandbox,
search backend, image tools, per-call costs). Part of the recipe schema (recipe/schema.py re-exports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metis_cli.recipe.section import Section


class PythonToolConfig(Section):
    wall_timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit per python call.")
    cpu_time_s: int = Field(5, gt=0, description="CPU-seconds limit per python call.")
    memory_mb: int = Field(512, gt=0, description="Address-space cap of the sandboxed process.")
    output_bytes: int = Field(16384, gt=0, description="Output kept from stdout+stderr; the rest is cut.")
    max_processes: int = Field(16, gt=0, description="Process/thread cap inside the sandbox.")
    sandbox: Literal["auto", "bwrap", "unshare", "none"] = Field(
        "auto", description="auto = strongest available (bwrap > unshare > in-process socket denial)."
    )
    persistent: bool = Field(
        False, description="One long-lived sandboxed interpreter per rollout, like a notebook kernel: variables "
        "survive between calls; ended with the rollout. Limits stay per call (wall clock, CPU, output) or per "
        "session (memory, processes); a call that hits the wall clock or output cap restarts the session."
    )
    packages: list[str] = Field(
        default_factory=list, description="Import names made importable read-only from metis's environment "
        "(e.g. [numpy, PIL]); every other installed package stays invisible. Empty = standard library only."
    )
    images: bool = Field(
        False, description="Give the code the conversation's images as image_1.png, image_2.png, ... in its folder, "
        "and show the model the images it saves under outputs/ (add PIL to packages to open them)."
    )
    max_images: int = Field(4, gt=0, description="Images from outputs/ shown per call; the rest are noted and dropped.")
    max_image_pixels: int = Field(1048576, gt=0, description="Images from outputs/ are shrunk to at most this many pixels.")


class SearchHttpConfig(Section):
    """A Serper-style web search API: POST {"q": query} -> {"organic": [{title, link, snippet}, ...]}."""

    url: str | None = Field(None, description="Search API endpoint, e.g. https://google.serper.dev/search.")
    api_key_env: str = Field("SERPER_API_KEY", description="Environment variable holding the API key.")
    api_key_header: str = Field("X-API-KEY", description="Request header that carries the API key.")
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout (keep attempts x timeout under tools.timeout_s).")
    retries: int = Field(2, ge=0, description="Retries after a timeout, connection error, 429 or 5xx; then a tool error.")
    backoff_s: float = Field(1.0, ge=0, description="First backoff delay; doubles each retry.")
    cache_dir: str | None = Field(
        "${run.output_dir}/search_cache", description="Folder caching results per query on disk; null = no cache."
    )


class SearchToolConfig(Section):
    backend: Literal["bm25", "http"] = Field(
        "bm25", description="bm25: keyword search over the local `corpus` (offline); http: a web search API (`http`)."
    )
    corpus: str | None = Field(None, description="JSONL corpus with {id, text[, title]} per line (bm25).")
    top_k: int = Field(3, gt=0, description="Documents returned per query (official Metis: 10 web results).")
    http: SearchHttpConfig = Field(default_factory=SearchHttpConfig, description="Web search API settings (backend http).")


class ZoomInToolConfig(Section):
    coordinates: Literal["pixels", "relative"] = Field(
        "pixels", description="What bbox_2d numbers mean: pixels of the image (DeepEyes), or relative = 0-1000 of "
        "its width and height (Qwen3-VL's grounding scale)."
    )
    min_pixels: int = Field(262144, gt=0, description="Crops smaller than this many pixels are enlarged to it "
                            "(default 256 Qwen3-VL image tokens).")
    max_pixels: int = Field(1048576, gt=0, description="Crops larger than this are shrunk to it (default 1024 tokens).")


class ImageSearchToolConfig(Section):
    corpus: str | None = Field(
        None, description="JSONL of {image, caption[, id]} rows (paths relative to it), or a folder of images "
        "captioned by same-named .txt files; BM25 over the captions."
    )
    top_k: int = Field(3, gt=0, description="Images returned per query.")
    max_pixels: int = Field(262144, gt=0, description="Returned images are shrunk to at most this many pixels.")


class ToolCost(Section):
    usd_per_call: float = Field(0.0, ge=0, description="Price of one call, for eval's tool economy.")
    latency_s: float = Field(0.0, ge=0, description="Typical latency of one call in production.")


class ToolsConfig(Section):
    enabled: list[Literal["calculator", "python", "search", "zoom_in", "image_search"]] = Field(
        default_factory=lambda: ["calculator"], description="Tools the agent may call."
    )
    timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit of one tool call.")
    max_calls_per_rollout: int = Field(4, ge=0, description="Calls beyond this get an error observation.")
    max_concurrency: int = Field(8, gt=0, description="Tool calls in flight at once across rollouts.")
    python: PythonToolConfig = Field(default_factory=PythonToolConfig, description="Python sandbox limits.")
    search: SearchToolConfig = Field(default_factory=SearchToolConfig, description="Search backend and settings.")
    zoom_in: ZoomInToolConfig = Field(default_factory=ZoomInToolConfig, description="Image zoom: coordinates, output size.")
    image_search: ImageSearchToolConfig = Field(
        default_factory=ImageSearchToolConfig, description="Image corpus searched by caption."
    )
    costs: dict[str, ToolCost] = Field(default_factory=dict, description="Per-tool price/latency for eval.")
