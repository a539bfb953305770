"""`metis push`: upload a trained model folder, with its model card, to the Hugging Face Hub.

The card (README.md, model/card.py) is refreshed first, so a folder pushed after `metis eval`
carries the eval report's tool economy. The upload is huggingface_hub's `upload_folder` into a
model repo created if missing; the token is huggingface_hub's (`HF_TOKEN`, or `hf auth login`).
Without network, or with a token the Hub refuses, the command fails with one line (exit 2).

Must not touch: the weights (uploaded as saved).
"""

from __future__ import annotations

from pathlib import Path

from metis_cli.errors import HubError, ModelError
from metis_cli.model.card import HUB_ID, write_card


def push(model_dir: Path, repo_id: str, *, private: bool = False) -> str:
    """Upload `model_dir` to `repo_id`; the URL of the commit."""
    model_dir = Path(model_dir)
    if not ((model_dir / "config.json").exists() or (model_dir / "adapter_config.json").exists()):
        raise ModelError(f"{model_dir} is not a model folder (no config.json or adapter_config.json); "
                         "pass a final/ folder, e.g. runs/NAME/hdpo/final")
    if not HUB_ID.match(repo_id):
        raise HubError(f"--repo-id {repo_id!r} is not a Hub repo id; write it as ORG/NAME (or USER/NAME)")
    write_card(model_dir)
    from huggingface_hub import HfApi

    from metis_cli import __version__

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model",
                                   commit_message=f"metis push (metis {__version__})")
    except Exception as error:  # noqa: BLE001 - every failure here is the network's, the token's or the repo's
        raise HubError(_explain(error, repo_id)) from None
    return str(getattr(commit, "commit_url", commit))


def _explain(error: Exception, repo_id: str) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    endpoint = constants.ENDPOINT
    if isinstance(error, OfflineModeIsEnabled):
        return "cannot push: HF_HUB_OFFLINE is set; unset it and retry with network"
    if isinstance(error, LocalTokenNotFoundError):
        return "cannot push: no Hugging Face token; set HF_TOKEN or run `hf auth login`"
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            return (f"cannot push to {repo_id}: the Hub refused the token ({status}); set HF_TOKEN to a token "
                    "with write access to that namespace")
        return f"cannot push to {repo_id}: the Hub answered {status}: {str(error).splitlines()[0]}"
    return (f"cannot push: the Hugging Face Hub at {endpoint} cannot be reached ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}); check the network (or HF_ENDPOINT)")
