"""lars_ort: the on-device runtime. Needs onnxruntime (plain), numpy and tokenizers; never torch.

    from lars_ort import Trainer, TrainingArgs, train
"""

from lars_artifacts import LarsError

from .config import TrainingArgs

__all__ = ["LarsError", "Trainer", "TrainingArgs", "train", "evaluate_file", "export_run_adapter"]


def __getattr__(name):  # onnxruntime loads on first use, so `import lars_ort` stays cheap
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name == "train":
        from .loop import train

        return train
    if name in ("evaluate_file", "export_run_adapter"):
        from . import commands

        return getattr(commands, name)
    raise AttributeError(name)
