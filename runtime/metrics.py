"""The memory a new allocation can get, and the metrics.jsonl writer. No onnxruntime import here. (A process's
resident memory and elapsed time, which the exporter measures too: lars_artifacts.measure.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def available_memory_bytes() -> int | None:
    """Memory the kernel says a new allocation can get without swapping (Linux MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class MetricsWriter:
    """Appends one JSON object per line to RUN/metrics.jsonl (flushed each line, so a crash loses nothing)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._f.close()
