"""Where the data folder is, and file fingerprints for the run record.

The trainer writes the data files it read, with their sha256, into the run folder; comparing those
hashes with ``shared/data/SOURCES.md`` proves which bytes a number was computed on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DATA_DIR_ENV = "BAYESLORA_DATA_DIR"
"""Environment variable naming the data folder (the one ``SOURCES.md`` describes)."""


def default_data_dir() -> Path:
    """``$BAYESLORA_DATA_DIR`` if set, else ``<repo>/../shared/data`` (the CI layout).

    The fallback only makes sense for a source checkout; installed copies should set the variable or
    pass a data dir explicitly. The path is returned even if it does not exist (callers report that).
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]  # .../src/bayeslora/data/files.py -> repo root
    return repo.parent / "shared" / "data"


def require_data_dir(data_dir: Path | str | None) -> Path:
    """Return ``data_dir`` (or the default) as a Path, raising FileNotFoundError if it is not a folder."""
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if not path.is_dir():
        how = "" if data_dir is not None else f" (set ${DATA_DIR_ENV} or pass the data folder explicitly)"
        raise FileNotFoundError(f"data folder {path} does not exist{how}")
    return path


def sha256_of(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large files do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(paths: list[Path]) -> list[dict[str, object]]:
    """``[{"path", "bytes", "sha256"}, ...]`` for the run folder's data manifest, in the given order."""
    return [{"path": str(p), "bytes": Path(p).stat().st_size, "sha256": sha256_of(p)} for p in paths]
