"""What the server does with the clients' adapters: check each update, then average the accepted ones.

Plain numpy, no Flower: the ServerApp's strategy (server_app.py) calls these, and so can any other aggregator.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def update_problem(reference: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], weight) -> str | None:
    """Why `update` (a client's adapter tensors, weighted by `weight` tokens) cannot be averaged into an adapter
    shaped like `reference`; None when it can. A wrong name set, shape or dtype, a NaN/inf value or a weight that is
    not a finite number > 0 would corrupt the average for every client."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = ([f"lacks {len(missing)} tensor(s) ({missing[0]}{', ...' if len(missing) > 1 else ''})"]
                 if missing else []) + ([f"has {len(extra)} unknown tensor(s) ({extra[0]}"
                                         f"{', ...' if len(extra) > 1 else ''})"] if extra else [])
        return "it " + " and ".join(parts)
    for name, ref in reference.items():
        value = update[name]
        if not isinstance(value, np.ndarray):
            return f"{name} is a {type(value).__name__}, not an array"
        if value.shape != ref.shape:
            return f"{name} has shape {list(value.shape)}, the adapter's is {list(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{name} is {value.dtype}, the adapter's is {ref.dtype}"
        if not np.isfinite(value).all():
            return f"{name} holds NaN or inf"
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)) \
            or not math.isfinite(weight) or weight <= 0:
        return f"its weight (token count) {weight!r} is not a finite number > 0"
    return None


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg: sum_i w_i * update_i / sum_i w_i per tensor, accumulated in float64, returned in each tensor's dtype
    (updates already checked with update_problem)."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates and {len(weights)} weights: need one weight per update, >= 1")
    total = math.fsum(float(w) for w in weights)
    mean = {}
    for name, first in updates[0].items():
        acc = np.zeros(first.shape, np.float64)
        for update, w in zip(updates, weights):
            acc += update[name].astype(np.float64) * (float(w) / total)
        mean[name] = acc.astype(first.dtype)
    return mean
