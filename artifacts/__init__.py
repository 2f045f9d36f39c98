"""lars_artifacts: the bundle format shared by the exporter (lars_export) and the runtime (lars_ort)."""

from .bundle import (ATTENTION_MASK, CHECKPOINT, EVAL_MODEL, FORMAT_VERSION, IGNORE_INDEX, INPUT_IDS, LABELS, LOGITS,
                     MANIFEST, MODEL_CONFIG, OPTIMIZER_MODEL, ORT_BACKEND, ORT_TRAINING_BACKEND, TOKENIZER,
                     TOKENIZER_CONFIG, TRAINING_MODEL, TRAINING_STEP, WEIGHTS, ZO_FORWARD, ZO_STEP, AdamWConfig, Bundle,
                     Manifest, load_bundle, sha256_file, write_manifest)
from .errors import BundleError, LarsError
from .schema import AdapterParameter, GraphIo, MemoryPlan, OrtStep, SpecialTokens, WeightTensor, ZoModels

__all__ = [
    "ORT_BACKEND", "ORT_TRAINING_BACKEND", "TRAINING_STEP", "ZO_FORWARD", "ZO_STEP",
    "ATTENTION_MASK", "CHECKPOINT", "EVAL_MODEL", "FORMAT_VERSION", "IGNORE_INDEX", "INPUT_IDS", "LABELS", "LOGITS",
    "MANIFEST", "MODEL_CONFIG", "OPTIMIZER_MODEL", "TOKENIZER", "TOKENIZER_CONFIG", "TRAINING_MODEL", "WEIGHTS",
    "AdamWConfig", "AdapterParameter", "Bundle", "GraphIo", "Manifest", "MemoryPlan", "OrtStep", "SpecialTokens",
    "WeightTensor", "ZoModels",
    "load_bundle", "sha256_file", "write_manifest", "BundleError", "LarsError",
]
