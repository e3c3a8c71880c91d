"""Hugging Face Hub repo ids for checkpoint arguments, and uploads: `resolve` turns "owner/name"
into a local snapshot directory through `huggingface_hub`'s own resolver and cache layout;
`push_to_hub` stages a pretrained directory and uploads it.

Framework-free (no jax or torch, and no numpy code here). What `huggingface_hub` reads from the environment
(HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE) it reads once, at import, into `huggingface_hub.constants`;
this module reads those constants at call time, so a process sees the environment it started
with (a test changes the constants, not os.environ).

  resolve("runs/demo/model")        -> Path("runs/demo/model")      an existing directory, as is
  resolve("lusxvr/nanoVLM-222M")    -> .../models--lusxvr--nanoVLM-222M/snapshots/<commit>
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .pretrained import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, copy_tokenizer, read_config
from .safetensors_io import CheckpointError

CARD_FILE = "README.md"
COMMIT_MESSAGE = "Upload nanoVLM checkpoint (jaxvlm)"


def is_repo_id(name: str | Path) -> bool:
    """True for "owner/name" that huggingface_hub's validator accepts (a bare "name" is a path)."""
    name = str(name)
    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve(name_or_path: str | Path, *, what: str = "model") -> Path:
    """The local directory of a checkpoint argument: an existing directory as is, or the cached
    snapshot of a Hub repo id (downloaded unless HF_HUB_OFFLINE=1, then only from the cache).

    Raises CheckpointError (a ValueError: the command lines' exit 2) naming `what` and the
    argument: a missing directory that is not a repo id, a repo id not cached while offline, a
    repo or revision the Hub does not have, a Hub that cannot be reached."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{what} {path} is a file, not a checkpoint directory")
    name = str(name_or_path)
    if not is_repo_id(name):
        # the message read_config gives for a missing directory: one wording for one problem
        raise CheckpointError(f"checkpoint directory not found: {path}")
    offline = constants.HF_HUB_OFFLINE
    try:
        snapshot = huggingface_hub.snapshot_download(name, local_files_only=offline, library_name="jaxvlm")
    except (RepositoryNotFoundError, GatedRepoError):  # GatedRepoError first would read the same
        raise CheckpointError(
            f"{what} {name!r}: no such directory, and no Hugging Face Hub repo {name!r} that this login can read "
            "(a private or gated repo needs `hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{what} {name!r}: the Hub repo has no revision main") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if offline:
            raise CheckpointError(
                f"{what} {name!r}: no such directory, and {name!r} is not in the local Hugging Face cache "
                f"(HF_HUB_OFFLINE=1; cache {constants.HF_HUB_CACHE}): download it once online, or pass a directory"
            ) from None
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(
            f"{what} {name!r}: no such directory, and the Hugging Face Hub cannot be reached nor is the repo "
            f"in the cache {constants.HF_HUB_CACHE}: {cause}"
        ) from None
    except HfHubHTTPError as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{what} {name!r}: the Hugging Face Hub refused the download: {cause}") from None
    return Path(snapshot)


# ---- uploads -------------------------------------------------------------------------------------
def stage_for_upload(
    save: Callable[[Path], None], directory: str | Path, *, tokenizer: str | Path | None = None
) -> Path:
    """Save a model into the new or empty `directory` for an upload and check what is there:
    `save(directory)` writes config.json + model.safetensors + README.md (save_pretrained with
    model_card=True); `tokenizer` (a tokenizer.json or its directory) is copied beside them.
    Returns `directory`, holding exactly the files `push_to_hub` uploads."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"staging directory {directory} is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    save(directory)
    need = [CONFIG_FILE, WEIGHTS_FILE, CARD_FILE]
    if tokenizer is not None:
        if not Path(tokenizer).exists():
            raise FileNotFoundError(f"tokenizer not found: {tokenizer}")
        copy_tokenizer(tokenizer, directory)
        need.append(TOKENIZER_FILE)
    missing = [n for n in need if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"staged upload {directory} lacks {', '.join(missing)}")
    read_config(directory)  # the config that will be uploaded is one this project loads
    return directory


def push_to_hub(
    save: Callable[[Path], None],
    repo_id: str,
    *,
    tokenizer: str | Path | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Stage the model (`stage_for_upload`) in a temporary directory, create the model repo if it
    does not exist and upload the staged folder as one commit (`commit_message`, default
    COMMIT_MESSAGE). Returns the commit's URL."""
    if not is_repo_id(repo_id):
        raise ValueError(f"push_to_hub: {repo_id!r} is not a Hub repo id of the form owner/name")
    with tempfile.TemporaryDirectory(prefix="jaxvlm-upload-") as tmp:
        folder = stage_for_upload(save, Path(tmp) / "upload", tokenizer=tokenizer)
        api = huggingface_hub.HfApi(token=token, library_name="jaxvlm")
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=folder, commit_message=commit_message or COMMIT_MESSAGE
        )
    return str(getattr(commit, "commit_url", commit))
