"""Checks on checkpoint directories, so a bad path fails with a message naming what is missing."""

from pathlib import Path


def require_files(directory: Path, names: list[str], what: str) -> None:
    """Raise FileNotFoundError naming `directory` and each missing file of `names`."""
    missing = [name for name in names if not (Path(directory) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} at {directory} is missing {', '.join(missing)}")
