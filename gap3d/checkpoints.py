"""Where model checkpoints come from, and checks that fail with a message naming what is missing.

A checkpoint is named by a local directory, an object-storage URI (downloaded once into the cache, see
gap3d.storage.local_dir), or `tiny://NAME`: a tiny random checkpoint built with the real transformers
classes on first use (gap3d.tiny), which is what the tiny preset and the tests load.
"""

import json
from pathlib import Path

from gap3d import storage

TINY_SCHEME = "tiny://"


def resolve(uri: str) -> Path:
    """A local directory holding the checkpoint named by `uri` (downloaded or built once per machine)."""
    if str(uri).startswith(TINY_SCHEME):
        from gap3d.tiny import tiny_checkpoint  # builds with transformers: imported only when asked for

        return tiny_checkpoint(str(uri)[len(TINY_SCHEME) :])
    return storage.local_dir(uri)


def require_files(directory: Path, names: list[str], what: str) -> None:
    """Raise FileNotFoundError naming `directory` and each missing file of `names`."""
    missing = [name for name in names if not (Path(directory) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} at {directory} is missing {', '.join(missing)}")


def read_json(uri: str, name: str) -> dict:
    """The JSON file `name` of a checkpoint, read without downloading the rest of a remote one."""
    if str(uri).startswith(TINY_SCHEME) or not storage.is_remote(uri):
        path = resolve(uri) / name
        if not path.is_file():
            raise FileNotFoundError(f"no {name} in checkpoint {uri}")
        return json.loads(path.read_text())
    fs, root = storage.filesystem(uri)
    path = storage.join(root, name)
    if not fs.isfile(path):
        raise FileNotFoundError(f"no {name} in checkpoint {uri}")
    with fs.open(path, "r") as handle:
        return json.load(handle)


def transformers_config(uri: str):
    """A transformers checkpoint's config, from its config.json alone (no weights loaded)."""
    from transformers import AutoConfig

    values = read_json(uri, "config.json")
    return AutoConfig.for_model(values.pop("model_type"), **values)
