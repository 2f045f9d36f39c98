"""lars_export: the offline exporter (needs the `export` extra: torch, transformers, peft, onnx)."""

from .config import ExportConfig

__all__ = ["ExportConfig", "export"]


def export(config: ExportConfig):
    """Export a bundle; returns its path. Raises lars_artifacts.LarsError on bad input."""
    from .pipeline import run

    return run(config)
