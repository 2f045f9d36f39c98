"""SplitTraining lowered equals the training build's kernel: sizes from a graph input, an initializer and a
ConcatTraining's lengths (ORT's Concat gradient, as our graphs hold it); axes -1, 0 and 1."""

import numpy as np

from ._testing import check, make_model, ms


def test_split_training_matches_kernel(tmp_path):
    rng = np.random.default_rng(4)
    feeds = {"x": rng.normal(size=(4, 9)).astype(np.float32), "sizes": np.array([2, 3, 4], np.int64),
             "y": rng.normal(size=(6, 2, 3)).astype(np.float32),
             "p": rng.normal(size=(2, 3, 1)).astype(np.float32), "q": rng.normal(size=(2, 3, 5)).astype(np.float32),
             "dz": rng.normal(size=(2, 3, 6)).astype(np.float32)}
    nodes = [ms("SplitTraining", ["x", "sizes"], ["x0", "x1", "x2"], axis=-1),
             ms("SplitTraining", ["y", "y_sizes"], ["y0", "y1"]),  # axis 0 by default
             ms("ConcatTraining", ["p", "q"], ["z", "z_len"], axis=-1),
             ms("SplitTraining", ["dz", "z_len"], ["dp", "dq"], axis=-1)]
    outputs = ["x0", "x1", "x2", "y0", "y1", "z", "dp", "dq"]
    model = make_model(nodes, feeds, outputs, {"y_sizes": np.array([1, 5], np.int64)})
    diffs = check(model, feeds, tmp_path, "SplitTraining", strict_too=False)
    print("SplitTraining max abs diff", diffs)
