"""Files written so that a crash leaves either the old content or the new, never a part: to a temporary name, synced,
renamed over the target (os.replace is atomic), and the directory synced so the rename survives a power cut."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable without it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes | Iterable[bytes], sync_dir: bool = False) -> None:
    """Replace `path` with `data` (text is UTF-8) through `.<name>.tmp` beside it; the temporary goes on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    parts = [data.encode() if isinstance(data, str) else data] if isinstance(data, (str, bytes)) else data
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
