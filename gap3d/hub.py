"""Checkpoints named on the Hugging Face hub: `org/name` or `org/name@revision`, resolved through huggingface_hub.

A name is what every user of transformers and TRELLIS types (`Qwen/Qwen2.5-VL-3B-Instruct`,
`microsoft/TRELLIS-image-large@<commit>`). It is a hub name when it has no scheme (`://`), does not start with
`/`, `.` or `~`, has exactly one `/` before an optional `@revision`, and is not an existing local path: a relative
directory such as `runs/export` stays local as long as it exists (write `./runs/export` to say so always).

Resolution is huggingface_hub's own (`snapshot_download`, `hf_hub_download`): its cache (`HF_HOME`,
`HF_HUB_CACHE`), token (`HF_TOKEN`), endpoint (`HF_ENDPOINT`) and offline switch (`HF_HUB_OFFLINE`) apply. Each
node downloads a name once, under a lock in the gap3d cache, as remote checkpoints are (gap3d.storage.local_dir).
"""

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from gap3d import storage

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[\w./-]+))?$")


@dataclass(frozen=True)
class HubName:
    """A checkpoint on the hub: its repository and, when pinned, the branch, tag or commit."""

    repo_id: str  # "org/name"
    revision: str | None  # None: the repository's default branch

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse(uri: str) -> HubName | None:
    """The hub name `uri` spells (see the module's rule), or None for a path, a URI or an existing local directory."""
    text = str(uri)
    if "://" in text or text[:1] in ("/", ".", "~"):
        return None
    match = _NAME.match(text)
    if match is None or ".." in match["repo"] or Path(text).exists():
        return None
    return HubName(match["repo"], match["revision"])


def snapshot(name: HubName) -> Path:
    """A local directory holding every file of `name` (huggingface_hub's snapshot folder), downloaded once."""
    from huggingface_hub import snapshot_download

    with storage.cache_lock(_lock_path(name)):
        logger.info("resolving %s through the hub cache", name)
        return Path(_hub_call(name, None, lambda: snapshot_download(name.repo_id, revision=name.revision)))


def file(name: HubName, filename: str) -> Path:
    """The local path of one file of `name`, downloaded alone (a config.json without the weights)."""
    from huggingface_hub import hf_hub_download

    with storage.cache_lock(_lock_path(name)):
        return Path(_hub_call(name, filename, lambda: hf_hub_download(name.repo_id, filename, revision=name.revision)))


def _lock_path(name: HubName) -> Path:
    return storage.cache_root() / "hub" / hashlib.sha256(str(name).encode()).hexdigest()[:24]


def fetch_hint(name: HubName) -> str:
    """How a user gets `name` onto a machine that cannot reach the hub."""
    revision = f" --revision {name.revision}" if name.revision else ""
    return (
        f"fetch it once where the hub is reachable, with the same HF_HOME: `hf download {name.repo_id}{revision}`; "
        f"or mirror it into object storage (`python -m cli mirror-checkpoints --to s3://BUCKET/models {name}`) and "
        f"name the copy, s3://BUCKET/models/{name.repo_id}"
    )


def _hub_call(name: HubName, filename: str | None, call):
    """Run a huggingface_hub download, turning its errors into ones that name the checkpoint and what to do."""
    from huggingface_hub import errors

    what = f"{filename} of checkpoint {name}" if filename else f"checkpoint {name}"
    try:
        return call()
    except errors.GatedRepoError as error:
        raise PermissionError(f"{what} is gated on the hub: accept its licence and set HF_TOKEN ({error})") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{what}: no hub repository {name.repo_id} (or it is private: set HF_TOKEN); a local directory of that "
            "name does not exist either"
        ) from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{what}: the hub repository has no revision {name.revision!r}") from None
    except errors.LocalEntryNotFoundError:
        where = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "the default hub cache"
        raise FileNotFoundError(
            f"{what} is not in the hub cache ({where}) and the hub cannot be reached (HF_HUB_OFFLINE or no network); "
            + fetch_hint(name)
        ) from None
    except errors.EntryNotFoundError:
        raise FileNotFoundError(f"{what}: the hub repository has no such file") from None
