"""Stacked interventions: many variants of one batch in one forward.

Each variant is a head set whose heads get a replacement (zero, a reference mean, another image's
activation). Stacked, the batch is repeated once per variant — rows ``v·b .. (v+1)·b − 1`` are variant v's
copy of the ``b`` images, each with its own captions — and at every touched layer a mask
``[rows, heads]`` (``dc.hooks.rows_where``) says which heads each row replaces. A forward of V stacked
variants equals V forwards of one variant each (tested to 1e-5 on every family), restarting, with prefix
reuse, from the first layer any variant of the chunk touches.

How many variants share a forward is a memory budget: ``stack_rows`` rows at most, and on an
accelerator no more rows than ``memory_budget`` bytes hold, counting what one row costs (its share of
the tiled prefix record and of the forward's widest activations). On a CPU the work is compute-bound —
measured on 2 cores, 11.4 ms per image at 16 rows, 9.3 at 64, 12.3 at 256 — so the default caps rows at
64 there; a GPU gains from every row it can hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffcircuit.instrument.hooks import rows_where
from diffcircuit.instrument.registry import HeadAddress, HeadRegistry
from diffcircuit.instrument.session import instrument

__all__ = [
    "CPU_STACK_ROWS",
    "TiledForward",
    "cat_rows",
    "rows_per_forward",
    "stack_chunks",
    "stacked_outputs",
    "take_rows",
    "tile",
]

CPU_STACK_ROWS = (
    64  # rows per forward on a CPU (compute-bound: larger batches are slower per image there)
)
_WORKING_FACTOR = (
    4  # a forward's transient activations, in units of the widest recorded activation per row
)


def take_rows(obj, index: np.ndarray, n: int):
    """``obj`` (tensors, arrays and containers of them) with every ``n``-row tensor or array cut to rows ``index``."""
    if isinstance(obj, torch.Tensor):
        return (
            obj[torch.as_tensor(index, device=obj.device)]
            if obj.ndim and obj.shape[0] == n
            else obj
        )
    if isinstance(obj, np.ndarray):
        return obj[index] if obj.ndim and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: take_rows(v, index, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(take_rows(v, index, n) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj,
            **{f.name: take_rows(getattr(obj, f.name), index, n) for f in dataclasses.fields(obj)},
        )
    return obj


def cat_rows(objs: list):
    """Records of the same structure joined along their rows (anything that is not rows: the first's)."""
    first = objs[0]
    if len(objs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(objs) if first.ndim else first
    if isinstance(first, np.ndarray):
        return np.concatenate(objs) if first.ndim else first
    if isinstance(first, dict):
        return {k: cat_rows([o[k] for o in objs]) for k in first}
    if isinstance(first, (list, tuple)) and not all(isinstance(v, str) for v in first):
        return type(first)(cat_rows(list(vs)) for vs in zip(*objs))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(
            first,
            **{
                f.name: cat_rows([getattr(o, f.name) for o in objs])
                for f in dataclasses.fields(first)
            },
        )
    return first


def tile(obj, copies: int, batch: int):
    """``obj`` (tensors, arrays, and dicts, lists, tuples and dataclasses of them) with every batch-sized tensor or
    array repeated ``copies`` times along its first axis: row r of the result is row r mod ``batch`` of the original."""
    return take_rows(obj, np.tile(np.arange(batch), copies), batch)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


def rows_per_forward(
    record: dict,
    batch: int,
    device: torch.device | str,
    *,
    stack_rows: int | None = None,
    memory_budget: int | None = None,
) -> int:
    """How many rows one stacked forward may hold: ``stack_rows`` (default: ``CPU_STACK_ROWS`` on a CPU, no cap
    on an accelerator), and on an accelerator no more than ``memory_budget`` bytes (default: a quarter of its
    free memory) hold, a row costing its share of the prefix ``record`` plus ``_WORKING_FACTOR`` times its widest
    activation. At least ``batch``."""
    device = torch.device(device)
    cap = (
        stack_rows
        if stack_rows is not None
        else (CPU_STACK_ROWS if device.type == "cpu" else 1 << 20)
    )
    if device.type == "cuda":
        if memory_budget is None:
            memory_budget = torch.cuda.mem_get_info(device)[0] // 4
        tensors = [t for t in _tensors(record) if t.ndim and t.shape[0] == batch]
        per_row = (
            sum(t.nbytes for t in tensors) / batch
            + _WORKING_FACTOR * max((t.nbytes for t in tensors), default=0) / batch
        )
        cap = min(cap, int(memory_budget // max(per_row, 1.0)))
    return max(batch, cap)


class TiledForward:
    """One batch's forward for ``copies`` stacked variants: the images repeated (each copy with the images' own
    captions), restarted with prefix reuse from the clean run's record, tiled once per number of copies."""

    def __init__(
        self, den, stages, record: dict, x_t, t, dataset: str, idx: np.ndarray, reuse: bool
    ):
        self.den, self.stages, self.record, self.x_t, self.t = den, stages, record, x_t, t
        self.dataset, self.idx, self.reuse, self.batch = dataset, idx, reuse, len(idx)
        self._records: dict[int, dict] = {}

    def __call__(self, copies: int, touched: list[str]) -> torch.Tensor:
        if not self.reuse:
            return self.den.predict(
                tile(self.x_t, copies, self.batch),
                tile(self.t, copies, self.batch),
                rows=(self.dataset, np.tile(self.idx, copies)),
            )
        if copies not in self._records:
            self._records = {
                copies: tile(self.record, copies, self.batch)
            }  # one tiling held at a time
        return self.stages.resume(touched, self._records[copies])


def stack_chunks(
    registry: HeadRegistry, jobs: Sequence[tuple[int, Sequence[HeadAddress]]], batch: int, rows: int
) -> list[list[tuple[int, Sequence[HeadAddress]]]]:
    """Chunks of (key, heads) that run stacked: ordered by the first layer they touch (so a chunk restarts where
    its members do), at most ``rows // batch`` variants each; chunks of one variant are left out (they run alone)."""
    per = max(1, rows // max(1, batch))
    if per == 1:
        return []
    order = {info.layer: i for i, info in enumerate(registry.layers)}
    jobs = sorted(
        (job for job in jobs if job[1]),
        key=lambda job: (min(order[a.layer] for a in job[1]), job[0]),
    )
    return [jobs[i : i + per] for i in range(0, len(jobs), per) if len(jobs[i : i + per]) > 1]


def stacked_outputs(
    forward: TiledForward,
    registry: HeadRegistry,
    chunk: list[tuple[int, Sequence[HeadAddress]]],
    value: Callable[[str, int], torch.Tensor | float],
) -> dict[int, torch.Tensor]:
    """``{key: [batch, ...]}``: each variant's prediction, from one forward whose rows are the variants' copies of
    the batch. ``value(layer, copies)`` is what the masked heads of ``layer`` take: 0, a mean ``[heads, q, d]``,
    or per-row values ``[copies·batch, heads, q, d]``."""
    batch, rows = forward.batch, forward.batch * len(chunk)
    masks: dict[str, torch.Tensor] = {}
    for v, (_, heads) in enumerate(chunk):
        for a in heads:
            mask = masks.setdefault(
                a.layer, torch.zeros(rows, registry.layer(a.layer).heads, dtype=torch.bool)
            )
            mask[v * batch : (v + 1) * batch, a.head] = True  # [rows, heads]
    hooks = {layer: rows_where(mask, value(layer, len(chunk))) for layer, mask in masks.items()}
    with instrument(forward.den, registry=registry, hooks=hooks):
        out = forward(len(chunk), list(masks))  # [variants x batch, ...]
    return {key: out[v * batch : (v + 1) * batch] for v, (key, _) in enumerate(chunk)}
