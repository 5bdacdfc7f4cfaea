"""Where model checkpoints come from, and checks that fail with a message naming what is missing.

A checkpoint is named by a local directory, an object-storage URI (downloaded once into the cache, see
gap3d.storage.local_dir), a Hugging Face hub name `org/name[@revision]` (resolved through huggingface_hub, see
gap3d.hub for the rule that tells a name from a relative path), or a URI of a scheme another package registers
under the entry-point group
`gap3d.checkpoint_schemes` (`NAME -> module:function`, the function mapping the rest of the URI to a local
directory), as fsspec finds its filesystems: the miniature package registers `tiny://`, the checkpoints of the
tiny preset. The library itself imports no such package.
"""

import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path

from gap3d import hub, storage

SCHEME_GROUP = "gap3d.checkpoint_schemes"


@functools.cache
def registered_schemes() -> dict[str, importlib.metadata.EntryPoint]:
    """Scheme name -> the entry point that resolves it, from every installed distribution."""
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=SCHEME_GROUP)}


def _registered(uri: str) -> tuple[importlib.metadata.EntryPoint, str] | None:
    scheme, separator, rest = str(uri).partition("://")
    entry = registered_schemes().get(scheme) if separator else None
    return None if entry is None else (entry, rest)


def resolve(uri: str) -> Path:
    """A local directory holding the checkpoint named by `uri` (downloaded once per machine, or given by the
    package that registered its scheme)."""
    registered = _registered(uri)
    if registered is not None:
        entry, rest = registered
        return Path(entry.load()(rest))
    name = hub.parse(uri)
    return hub.snapshot(name) if name is not None else storage.local_dir(uri)


def require_files(directory: Path, names: list[str], what: str) -> None:
    """Raise FileNotFoundError naming `directory` and each missing file of `names`."""
    missing = [name for name in names if not (Path(directory) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} at {directory} is missing {', '.join(missing)}")


def read_text(uri: str, name: str) -> str:
    """The text file `name` of a checkpoint, read without downloading the rest of a remote or hub one."""
    hub_name = hub.parse(uri)
    if hub_name is not None:
        return hub.file(hub_name, name).read_text()
    if _registered(uri) is not None or not storage.is_remote(uri):
        path = resolve(uri) / name
        if not path.is_file():
            raise FileNotFoundError(f"no {name} in checkpoint {uri}")
        return path.read_text()
    fs, root = storage.filesystem(uri)
    path = storage.join(root, name)
    if not fs.isfile(path):
        raise FileNotFoundError(f"no {name} in checkpoint {uri}")
    with fs.open(path, "r") as handle:
        return handle.read()


def read_json(uri: str, name: str) -> dict:
    """The JSON file `name` of a checkpoint (see read_text)."""
    return json.loads(read_text(uri, name))


def transformers_config(uri: str):
    """A transformers checkpoint's config, from its config.json alone (no weights loaded)."""
    from transformers import AutoConfig

    values = read_json(uri, "config.json")
    return AutoConfig.for_model(values.pop("model_type"), **values)


# Saved by the library that wrote config.json, not part of the model: a copy elsewhere or a re-save keeps its identity.
_UNIDENTIFYING_CONFIG_KEYS = ("_name_or_path", "transformers_version")
_HASH_BLOCK = 2**24


def fingerprint(uri: str) -> str:
    """What a checkpoint's outputs depend on, by content: sha256 over its config.json (less where it was saved from)
    and the sha256 of every other file, so identical weights anywhere match and other weights at one path do not."""
    directory = resolve(uri)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = path.relative_to(directory).as_posix()
        if name == "config.json":
            values = {k: v for k, v in json.loads(path.read_text()).items() if k not in _UNIDENTIFYING_CONFIG_KEYS}
            content = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
        else:
            content = _file_sha256(path)
        digest.update(f"{name}\0{content}\n".encode())
    return digest.hexdigest()[:32]


_file_hashes: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file's content, remembered per (path, size, mtime) for the life of the process (weights run to
    gigabytes). A .safetensors file counts by its tensors: the header's free-form `__metadata__` is left out."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            if path.suffix == ".safetensors":
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
                header.pop("__metadata__", None)
                digest.update(json.dumps(header, sort_keys=True).encode())
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]
