"""How many rows a stacked forward may hold (``interventions.stack``)."""

from __future__ import annotations

import numpy as np
import torch

from diffcircuit.interventions.stack import CPU_STACK_ROWS, rows_per_forward, tile


def test_rows_on_a_cpu_are_capped_and_never_below_the_batch():
    record = {"states": [torch.zeros(8, 16, 4, 4)]}
    assert rows_per_forward(record, 8, "cpu") == CPU_STACK_ROWS
    assert (
        rows_per_forward(record, 8, "cpu", stack_rows=1) == 8
    )  # below the batch: one variant per forward
    assert rows_per_forward(record, 100, "cpu") == 100


def test_tile_repeats_batch_sized_tensors_and_arrays_only():
    x = torch.arange(6.0).view(3, 2)
    obj = {"x": x, "rows": np.array([4, 5, 6]), "other": torch.zeros(2), "nested": (x, "a")}
    out = tile(obj, 2, 3)
    torch.testing.assert_close(out["x"], torch.cat([x, x]))
    assert out["rows"].tolist() == [4, 5, 6, 4, 5, 6] and out["other"].shape == (2,)
    assert out["nested"][1] == "a" and out["nested"][0].shape == (6, 2)
