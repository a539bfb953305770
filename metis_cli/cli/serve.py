"""`metis serve`: an OpenAI-compatible endpoint for a trained agent (stages/serve.py)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer

from metis_cli.cli.common import SetOpt, cli_command
from metis_cli.errors import MetisError

ServeModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model folder, checkpoint or LoRA adapter to serve.",
                                            show_default=False)]
ServeRecipeOpt = Annotated[
    Path | None,
    typer.Option("--recipe", "-r", help="Recipe for tools, tool limits, rollout.backend and the chat section's "
                 "limits (max_new_tokens, max_turns, temperature). Default: calculator, greedy, built-in limits."),
]
HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 for every interface.")]
PortOpt = Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")]
ApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option("--api-key-env", help="Environment variable holding the API key clients must send "
                 "(Authorization: Bearer KEY). Default: no key."),
]
NameOpt = Annotated[
    str | None, typer.Option("--served-model-name", help="Model id clients send as `model`. Default: the --model path."),
]
ConcurrentOpt = Annotated[
    int, typer.Option("--max-concurrent", min=1, help="Requests worked on at once; more wait their turn."),
]


@cli_command
def serve(model: ServeModelOpt, recipe: ServeRecipeOpt = None, host: HostOpt = "127.0.0.1", port: PortOpt = 8000,
          api_key_env: ApiKeyEnvOpt = None, served_model_name: NameOpt = None, max_concurrent: ConcurrentOpt = 16,
          overrides: SetOpt = None) -> None:
    """Serve a model and its tools as an OpenAI-compatible API (POST /v1/chat/completions)."""
    from metis_cli.cli.chat import recipe_or_defaults

    if overrides and recipe is None:
        raise MetisError("--set needs --recipe RECIPE (without one, serve uses the built-in settings)")
    api_key = _api_key(api_key_env)
    loaded = recipe_or_defaults(model, recipe, overrides)
    from rich.console import Console

    from metis_cli.stages.serve import ServerSettings, serve as run_server

    settings = ServerSettings(model_id=served_model_name or model, api_key=api_key, max_concurrent=max_concurrent)
    console = Console(stderr=True, highlight=False)
    if api_key is None and not _is_loopback(host):
        console.print(f"[yellow]warning:[/] serving on {host} without an API key: anyone who can reach this port "
                      "can use the model and its tools (pass --api-key-env VAR)")
    console.print(f"metis serve: model [bold]{settings.model_id}[/] at http://{host}:{port}/v1 "
                  f"({'API key from $' + api_key_env if api_key else 'no API key'}); Ctrl-C stops")
    run_server(model, loaded, host=host, port=port, settings=settings)


def _api_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable, "").strip()
    if not value:
        raise MetisError(f"--api-key-env {variable}: the environment variable {variable} is not set or empty; "
                         f"export {variable}=<key> first")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
