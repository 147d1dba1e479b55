"""Push an export folder to the Hugging Face Hub.

The token comes from ``huggingface_hub`` itself (``HF_TOKEN`` or ``hf auth login``); it is
passed to nothing else, never written to disk and scrubbed from error messages.
"""

from __future__ import annotations

from pathlib import Path

from lmssl.errors import UserError


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; return the repo URL."""
    from huggingface_hub import HfApi, get_token

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"--push-to-hub expects USER/NAME (or ORG/NAME), got '{repo_id}'")
    token = get_token()
    keep = f"the export in {folder} is complete; push it later with `hf upload {repo_id} {folder}`"
    if not token:
        raise UserError(f"not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN; {keep}")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload model exported with lmssl")
    except Exception as e:  # network, offline mode, auth, permissions: all end the same way
        raise UserError(f"could not push to the Hub repo {repo_id} ({_describe(e, token)}); {keep}") from None
    return str(url)


def _describe(error: BaseException, token: str) -> str:
    """One short line naming the failure, with the token scrubbed out."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        text = "HF_HUB_OFFLINE is set: no network access allowed"
    elif isinstance(error, HfHubHTTPError) and getattr(error, "response", None) is not None:
        status = error.response.status_code
        hint = {401: "the token is invalid or expired", 403: "the token may not write to this namespace",
                404: "unknown user or organisation"}.get(status, "")
        text = f"HTTP {status}" + (f": {hint}" if hint else "")
    else:
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:  # reach the root network error
            cause = cause.__cause__ or cause.__context__
        text = f"{type(cause).__name__}: {' '.join(str(cause).split())}" or type(error).__name__
        if any(w in type(cause).__name__.lower() for w in ("connect", "timeout", "network")):
            text = f"no connection to the Hub: {text}"
    text = text.replace(token, "***")
    return text if len(text) <= 200 else text[:197] + "..."
