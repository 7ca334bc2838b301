"""The Hugging Face Hub: a saved model folder fetched by repo id (data files only, never code), and uploads."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import FrozenPrefixError

# "user/name": one slash, the Hub's characters; "runs/x/model" (two slashes) or "./model" is a path, never a repo id.
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_URL = "https://huggingface.co"


def looks_like_repo_id(name: str) -> bool:
    """Whether name has the shape of a Hub repo id ('user/repo')."""
    return bool(REPO_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".gguf")


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the Hub was not reached: offline mode, no cached copy, the HTTP client's failures."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, LocalEntryNotFoundError]
    # huggingface_hub has used requests, httpx and httpx2 for HTTP; whichever is installed may raise its own error.
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _reason(e: BaseException) -> str:
    """Why the Hub was not reached, short enough for one line."""
    if _offline_mode():
        return "offline mode: HF_HUB_OFFLINE is set"
    cause = e.__cause__ or e
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first[:100]}" if first else type(cause).__name__


def download_model(repo_id: str, files: Sequence[str]) -> Path:
    """The local folder (in the Hub cache) holding repo_id's given files; only those are downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(files)))
    except RepositoryNotFoundError as e:  # also private and gated repos without access
        raise FrozenPrefixError(
            f"Hub repo {repo_id!r} not found or not accessible; check the id, or log in (hf auth login) if private"
        ) from e
    except HfHubHTTPError as e:
        raise FrozenPrefixError(f"the Hugging Face Hub refused {repo_id!r} ({_reason(e)}); check id and access") from e
    except _network_errors() as e:
        raise FrozenPrefixError(
            f"cannot reach the Hugging Face Hub for {repo_id!r} ({_reason(e)}); give a local folder or connect"
        ) from e


def upload_folder(
    folder: str | Path, repo_id: str, private: bool = False, token: str | None = None, message: str | None = None
) -> str:
    """Create repo_id if needed and upload a folder's files to it as one commit; return the repo's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if not looks_like_repo_id(repo_id):
        raise FrozenPrefixError(f"{repo_id!r} is not a Hub repo id; use the form 'user/name'")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message or "frozen_prefix model")
    except (HfHubHTTPError, LocalTokenNotFoundError) as e:
        raise FrozenPrefixError(
            f"the Hugging Face Hub refused the push to {repo_id!r} ({_reason(e)}); log in (hf auth login) or pass token"
        ) from e
    except _network_errors() as e:
        raise FrozenPrefixError(
            f"cannot reach the Hugging Face Hub to push to {repo_id!r} ({_reason(e)}); connect and try again, "
            "or save_pretrained to a folder and upload it later"
        ) from e
    return f"{HUB_URL}/{repo_id}"
