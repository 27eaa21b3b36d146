"""The circuit loss L(S) and its evaluation engine: many head sets in one forward, memoised per image.

L(S) is each image's loss with every head in S ablated (mean ablation: each removed head's output
slice replaced by its mean over the reference images at the same position and timestep), averaged
over a window's timesteps; the loss of a set of images is the mean of theirs (see ``circuits`` for
what the losses mean). The unit is the image with its own noise draw (keyed by the image, not by its
position in a batch or a resample), and an image's loss under S depends on nothing else in the
forward (the ablation's means are fixed beforehand), so:

- every (head set, timestep, image) is computed at most once and cached (``_cache[S]`` holds
  ``[timesteps, images]``, NaN where not evaluated yet): a later request for the same set costs no
  forward, and a set first needed on some images and later on others is completed, not recomputed;
- a bootstrap resample (``ResampledLoss``) asks only for its distinct images (about 63 % of n) and
  takes the mean over its draw, repeats counted;
- the requests of many searches (``evaluate_sets``) run stacked: each row of a forward is one image
  under one head set (per-row head masks, ``dc.hooks.rows_where``), up to ``stack_rows`` rows a
  forward, rows of several losses sharing a forward (different timesteps, and datasets unless captioned);
- a forward restarts where its rows' head sets first touch the network, from the clean forward's
  recorded state (``interventions.prefix``), recorded once per timestep by the first forward that
  evaluates the empty set on all images.

Each row's result equals one set's own forward over the images (tested to 1e-5 on UNet and transformer
families); only float rounding of a different batch shape separates them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from diffcircuit.errors import ConfigError
from diffcircuit.instrument.hooks import rows_where
from diffcircuit.instrument.registry import HeadAddress, HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.interventions.prefix import prefix_runner
from diffcircuit.interventions.stack import cat_rows, take_rows
from diffcircuit.interventions.sweep import ActivationMoments, ReferenceImages, reference_moments
from diffcircuit.models.diffusion import eps_mse_per_image
from diffcircuit.models.noise import noisy_batch

__all__ = [
    "METRICS",
    "STACK_ROWS",
    "CircuitLoss",
    "ResampledLoss",
    "evaluate_sets",
    "reference_means",
]

METRICS = ("eps", "output")
STACK_ROWS = 256  # rows (image x head-set variants) per forward: the memory budget of one forward


class CircuitLoss:
    """L(S): per-image loss with the heads in S ablated, on fixed noisy inputs (clean statistics cached).

    ``per_image(S)`` is ``[n_images]`` (the mean over the window's timesteps); calling the loss gives
    its mean. Evaluations are cached by head set and image; ``evaluations`` counts the head sets
    evaluated (on any images); ``prefetch(sets)`` evaluates several sets together, stacked.
    """

    def __init__(
        self,
        denoiser,
        images: np.ndarray,
        *,
        timesteps: Sequence[int],
        method: str = "mean",
        seed: int = 0,
        dataset: str = "a",
        registry: HeadRegistry | None = None,
        which: tuple[str, np.ndarray] | None = None,
        metric: str = "eps",
        reference: Sequence[ReferenceImages] | None = None,
        stack_rows: int = STACK_ROWS,
        prefix_reuse: bool = True,
        means: Sequence[dict[str, torch.Tensor]] | None = None,
    ):
        """``dataset`` labels the noise draws; ``which`` = (dataset, indices) says which images of which dataset
        ``images`` are, for their captions (default: ``dataset``'s first ``len(images)``). ``reference``: the
        images mean ablation takes its means from (None: ``images`` themselves, in-sample); ``means``: those
        means already computed, per timestep (``reference_means``). ``stack_rows``: at most this many rows
        (images x head sets) per forward."""
        if method not in ("mean", "zero"):
            raise ConfigError("circuit losses use mean or zero ablation")
        if metric not in METRICS:
            raise ConfigError(f"circuit metric must be one of {', '.join(METRICS)}, not {metric!r}")
        if stack_rows < 1:
            raise ConfigError(f"stack_rows must be at least 1, not {stack_rows}")
        self.den, self.net, self.method, self.metric = denoiser, denoiser.network, method, metric
        self.stack_rows = int(stack_rows)
        self.which = which or (dataset, np.arange(len(images)))
        x0 = torch.from_numpy(np.asarray(images, dtype=np.float32))
        self.n_images, self.n_timesteps = len(x0), len(timesteps)
        self.registry = registry or probe_registry(denoiser, x0[:1])
        self.heads = list(self.registry)
        self.stages = prefix_runner(denoiser)
        self.prefix_reuse = prefix_reuse and self.stages.supported
        self.inputs, self.means, self.targets, self.clean = [], [], [], []
        self._cache: dict[
            frozenset, np.ndarray
        ] = {}  # head set -> [timesteps, images], NaN: not evaluated
        self._values: dict[frozenset, float] = {}
        self.evaluations = 0
        with torch.no_grad():
            for (
                t_val
            ) in timesteps:  # the noise is keyed by ``dataset`` and the position in ``images``
                b = noisy_batch(denoiser, x0, np.arange(len(x0)), t_val, seed=seed, dataset=dataset)
                self.inputs.append((b.x_t, b.t))
                self.clean.append(
                    None
                )  # the clean forward's prefix record, once a forward has made it
                moments, eps_clean, in_sample = (
                    ActivationMoments(),
                    None,
                    reference is None and means is None,
                )
                if (
                    means is None and reference is not None
                ):  # e.g. held-out images: no image is part of its own mean
                    moments = reference_moments(
                        denoiser, self.registry, reference, t_val, seed=seed, batch_size=len(x0)
                    )
                if in_sample or metric == "output":  # the clean forward is needed now: record it
                    eps_clean = self._clean_forward(
                        len(self.inputs) - 1, moments if in_sample else None
                    )
                self.means.append(
                    means[len(self.inputs) - 1]
                    if means is not None
                    else {i.layer: moments.mean(i.layer) for i in self.registry.layers}
                )
                # what ε̂ is compared with: the true noise, or the full model's own ε̂ (ACDC's output distance)
                self.targets.append(b.eps if metric == "eps" else eps_clean)
                if eps_clean is not None:
                    self._store(
                        frozenset(),
                        len(self.inputs) - 1,
                        np.arange(self.n_images),
                        eps_mse_per_image(eps_clean, self.targets[-1]),
                    )

    def _clean_forward(self, i: int, moments: ActivationMoments | None) -> torch.Tensor:
        """Timestep ``i``'s clean ε̂, recording the prefix state (and, into ``moments``, every head's output)."""
        x_t, t = self.inputs[i]
        record: dict = {}
        cache = [info.layer for info in self.registry.layers] if moments is not None else []
        with instrument(self.den, registry=self.registry, cache_heads=cache) as session:
            out = self.stages.run(x_t, t, rows=self.which, record=record)
        if moments is not None:
            moments.add(session.pop("head_out"))
        self.clean[i] = record if self.prefix_reuse else None
        return self.den.eps_hat(out, x_t, t)

    def _store(self, key: frozenset, i: int, images: np.ndarray, losses: torch.Tensor) -> None:
        if key not in self._cache:
            self._cache[key] = np.full((self.n_timesteps, self.n_images), np.nan)
            self.evaluations += 1
        self._cache[key][i, images] = (
            losses.detach().cpu().double().numpy() if torch.is_tensor(losses) else losses
        )

    def _images(self, images) -> np.ndarray:
        return np.arange(self.n_images) if images is None else np.asarray(images, dtype=np.int64)

    def known(self, ablated, images=None) -> bool:
        """Whether ``ablated``'s losses on ``images`` (default all) are cached: asking for them costs no forward."""
        key = frozenset(ablated)
        if images is None and key in self._values:
            return True
        c = self._cache.get(key)
        return c is not None and not np.isnan(c[:, self._images(images)]).any()

    def missing(self, ablated, images=None) -> list[tuple[int, int]]:
        """The (timestep, image) pairs of ``ablated`` on ``images`` (default all) not evaluated yet."""
        c, index = self._cache.get(frozenset(ablated)), self._images(images)
        if c is None:
            return [(i, int(j)) for i in range(self.n_timesteps) for j in index]
        steps, pos = np.nonzero(np.isnan(c[:, index]))
        return [(int(i), int(index[p])) for i, p in zip(steps, pos)]

    def prefetch(self, sets, images=None) -> None:
        """Evaluate the head sets ``sets`` on ``images`` (default all) where not cached, stacked in few forwards."""
        evaluate_sets([(self, frozenset(s), self._images(images)) for s in sets])

    @torch.no_grad()
    def per_image(self, ablated: Sequence[HeadAddress], images=None) -> np.ndarray:
        """``[len(images)]`` (default all): each image's loss with ``ablated`` removed, averaged over the window's
        timesteps."""
        key, index = frozenset(ablated), self._images(images)
        if not self.known(key, index):
            evaluate_sets([(self, key, index)])
        return self._cache[key][:, index].sum(0) / self.n_timesteps

    def __call__(self, ablated: Sequence[HeadAddress]) -> float:
        key = frozenset(ablated)
        if key not in self._values:
            self._values[key] = float(self.per_image(key).mean())
        return self._values[key]

    def resampled(self, draw: Sequence[int]) -> ResampledLoss:
        """The loss on a bootstrap resample ``draw`` of the images (indices, with repeats)."""
        return ResampledLoss(self, draw)


class ResampledLoss:
    """A bootstrap resample of a ``CircuitLoss``'s images: L(S) is the mean of the parent's per-image losses
    over the drawn images, repeats counted. The unit resampled is the image with its noise draw (keyed by the
    image, not by its position in the resample) and the ablation's mean stays the parent's reference, so a
    head set is evaluated once per image, by the parent, on the distinct images that some search needs it on,
    and shared by every resample and the point estimate."""

    def __init__(self, base: CircuitLoss, draw: Sequence[int]):
        self.base, self.draw = base, np.asarray(draw, dtype=np.int64)
        self.heads, self.method, self.metric, self.registry = (
            base.heads,
            base.method,
            base.metric,
            base.registry,
        )
        self.n_images = len(self.draw)
        self.images, self._inverse = np.unique(
            self.draw, return_inverse=True
        )  # distinct images; draw = images[inverse]
        self._values: dict[frozenset, float] = {}

    def known(self, ablated) -> bool:
        return frozenset(ablated) in self._values or self.base.known(ablated, self.images)

    def prefetch(self, sets) -> None:
        self.base.prefetch(sets, self.images)

    def per_image(self, ablated: Sequence[HeadAddress]) -> np.ndarray:
        return self.base.per_image(ablated, self.images)[self._inverse]

    def __call__(self, ablated: Sequence[HeadAddress]) -> float:
        key = frozenset(ablated)
        if key not in self._values:
            self._values[key] = float(self.per_image(key).mean())
        return self._values[key]


def _rows_key(den, dataset: str) -> str | None:
    """Which rows may share a forward: a captioned dataset's rows carry their own captions; images of uncaptioned
    datasets share the conditioning (None)."""
    return dataset if den.caption_tokens(dataset) is not None else None


@torch.no_grad()
def reference_means(
    denoiser,
    registry: HeadRegistry,
    wanted: Sequence[tuple[Sequence[ReferenceImages], int]],
    *,
    seed: int,
    stack_rows: int = STACK_ROWS,
) -> list[dict[str, torch.Tensor]]:
    """For each (reference images, timestep) of ``wanted``: every layer's head outputs averaged over those images
    (each noised with its own draw) ``{layer: [heads, q, d]}``, from clean forwards stacked up to ``stack_rows``
    rows (the means ``interventions.sweep.reference_moments`` gives, several at once)."""
    rows = [
        (w, ref, int(j))
        for w, (refs, _) in enumerate(wanted)
        for ref in refs
        for j in range(len(ref.images))
    ]
    sums: list[dict] = [{} for _ in wanted]
    groups: dict = {}
    for row in rows:
        groups.setdefault(_rows_key(denoiser, row[1].dataset), []).append(row)
    layers = [info.layer for info in registry.layers]
    for group in groups.values():
        for lo in range(0, len(group), stack_rows):
            chunk = group[lo : lo + stack_rows]
            parts: dict = {}  # (wanted, reference) -> positions in the reference's images
            for w, ref, j in chunk:
                parts.setdefault((w, id(ref)), (w, ref, []))[2].append(j)
            batches = [
                noisy_batch(
                    denoiser,
                    ref.images[js],
                    np.asarray(ref.index)[js],
                    wanted[w][1],
                    seed=seed,
                    dataset=ref.dataset,
                )
                for w, ref, js in parts.values()
            ]
            x_t, t = torch.cat([b.x_t for b in batches]), torch.cat([b.t for b in batches])
            which = (batches[0].dataset, np.concatenate([b.rows for b in batches]))
            with instrument(denoiser, registry=registry, cache_heads=layers) as session:
                denoiser.predict(x_t, t, rows=which)
            acts = session.pop("head_out")  # {layer: [rows, heads, q, d]}
            start = 0
            for w, _, js in parts.values():
                for layer in layers:
                    part = acts[layer][start : start + len(js)].double().sum(0)
                    sums[w][layer] = sums[w].get(layer, 0) + part
                start += len(js)
    counts = [sum(len(ref.images) for ref in refs) for refs, _ in wanted]
    return [
        {layer: (total / n).float() for layer, total in s.items()} for s, n in zip(sums, counts)
    ]


# ---- the engine: requests (loss, head set, images) -> rows -> stacked forwards ------------------------------------


@dataclasses.dataclass
class _Rows:
    """Rows of forwards to run: row r is image ``image[r]`` at timestep ``step[r]`` of ``loss[r]`` under ``key[r]``."""

    loss: list
    key: list
    step: list
    image: list
    first: list  # the index of the first layer the row's set touches (len(layers): none), for prefix restarts


def _missing_rows(requests, order: dict[str, int]) -> _Rows:
    """The (loss, set, timestep, image) rows the requests need that are not cached, each once; a timestep of a
    loss with no clean record yet also gets the empty set's rows on every image (their forward records it)."""
    wanted: dict[tuple[int, frozenset], tuple] = {}
    for loss, key, images in requests:  # the union of the images each (loss, set) is asked for
        k = (id(loss), key)
        wanted[k] = (
            loss,
            key,
            np.union1d(wanted[k][2], images) if k in wanted else np.unique(images),
        )
    unrecorded = {
        id(loss): loss
        for loss, _, _ in wanted.values()
        if loss.prefix_reuse and any(record is None for record in loss.clean)
    }
    for loss in unrecorded.values():
        k = (id(loss), frozenset())
        wanted[k] = (loss, frozenset(), np.arange(loss.n_images))
    rows = _Rows([], [], [], [], [])
    for loss, key, images in wanted.values():
        c = loss._cache.get(key)
        for i in range(loss.n_timesteps):
            _extend(
                rows, loss, key, i, images if c is None else images[np.isnan(c[i, images])], order
            )
    return rows


def _extend(
    rows: _Rows, loss, key: frozenset, i: int, images: np.ndarray, order: dict[str, int]
) -> None:
    first = min((order[a.layer] for a in key), default=len(order))
    for j in images:
        rows.loss.append(loss), rows.key.append(key), rows.step.append(i), rows.image.append(int(j))
        rows.first.append(first)


def evaluate_sets(requests: Sequence[tuple[CircuitLoss, frozenset, np.ndarray]]) -> None:
    """Evaluate each requested (loss, head set, images) where not cached, in as few forwards as the losses'
    ``stack_rows`` allow: losses of one denoiser, registry and ablation method share forwards, unless their
    datasets are captioned differently (each captioned dataset's rows run apart)."""
    if not requests:
        return
    groups: dict[tuple, list] = {}
    for req in requests:
        loss = req[0]
        groups.setdefault(
            (id(loss.den), id(loss.registry), loss.method, _rows_key(loss.den, loss.which[0])), []
        ).append(req)
    for reqs in groups.values():
        losses = [r[0] for r in reqs]
        order = {info.layer: k for k, info in enumerate(losses[0].registry.layers)}
        rows = _missing_rows(reqs, order)
        # rows that make a clean record come first (their forward runs from the start), then by the first layer
        # touched, so that a forward restarts as late as its rows allow
        needs_record = [
            loss.prefix_reuse and loss.clean[i] is None for loss, i in zip(rows.loss, rows.step)
        ]
        ranked = sorted(
            range(len(rows.loss)),
            key=lambda r: (not needs_record[r], bool(rows.key[r]), rows.first[r]),
        )
        per = min(loss.stack_rows for loss in losses)
        for lo in range(0, len(ranked), per):
            _forward(rows, ranked[lo : lo + per])


@torch.no_grad()
def _forward(rows: _Rows, chunk: list[int]) -> None:
    """One forward for the rows ``chunk`` (all of one denoiser, registry, method and conditioning); caches each row's
    loss."""
    # rows grouped by (loss, timestep): their inputs, clean records and means are taken group by group
    chunk = sorted(chunk, key=lambda r: (id(rows.loss[r]), rows.step[r], rows.image[r]))
    groups: dict[tuple, list[int]] = {}
    for r in chunk:
        groups.setdefault((id(rows.loss[r]), rows.step[r]), []).append(r)
    loss0 = rows.loss[chunk[0]]
    den, registry, stages = loss0.den, loss0.registry, loss0.stages
    members = [
        (rows.loss[g[0]], rows.step[g[0]], np.array([rows.image[r] for r in g]))
        for g in groups.values()
    ]
    x_t = torch.cat(
        [
            loss.inputs[i][0][torch.as_tensor(img, device=loss.inputs[i][0].device)]
            for loss, i, img in members
        ]
    )
    t = torch.cat(
        [
            loss.inputs[i][1][torch.as_tensor(img, device=loss.inputs[i][1].device)]
            for loss, i, img in members
        ]
    )
    which = (
        loss0.which[0],
        np.concatenate([np.asarray(loss.which[1])[img] for loss, _, img in members]),
    )
    hooks, touched = _row_hooks(rows, chunk, members, groups)
    resume = bool(touched) and all(
        loss.prefix_reuse and loss.clean[i] is not None for loss, i, _ in members
    )
    record: dict | None = None if resume or not loss0.prefix_reuse else {}
    with instrument(den, registry=registry, hooks=hooks):
        if resume:
            state = cat_rows(
                [take_rows(loss.clean[i], img, loss.n_images) for loss, i, img in members]
            )
            if (
                "rows" in state
            ):  # a whole-forward replay (``BlockMemo``) runs the chunk's own inputs and rows
                state = state | {"inputs": (x_t, t), "rows": which}
            out = stages.resume(touched, state)
        else:
            out = stages.run(x_t, t, rows=which, record=record)
    eps_hat = den.eps_hat(out, x_t, t)  # [rows, C, H, W]
    targets = torch.cat(
        [
            loss.targets[i][torch.as_tensor(img, device=loss.targets[i].device)]
            for loss, i, img in members
        ]
    )
    losses = eps_mse_per_image(eps_hat, targets.to(eps_hat.device)).cpu().double().numpy()  # [rows]
    for r, value in zip(chunk, losses):
        rows.loss[r]._store(rows.key[r], rows.step[r], np.array([rows.image[r]]), value)
    if record is not None:
        _keep_clean_records(rows, chunk, members, record)


def _row_hooks(
    rows: _Rows, chunk: list[int], members: list, groups: dict
) -> tuple[dict, list[str]]:
    """Per touched layer a ``rows_where`` hook: mask ``[rows, heads]`` of the heads each row ablates, and the value
    they take (0, or the mean of its loss and timestep ``[heads, q, d]``, per row ``[rows, heads, q, d]``)."""
    loss0 = rows.loss[chunk[0]]
    masks: dict[str, torch.Tensor] = {}
    for r_pos, r in enumerate(chunk):
        for a in rows.key[r]:
            mask = masks.setdefault(
                a.layer,
                torch.zeros(len(chunk), loss0.registry.layer(a.layer).heads, dtype=torch.bool),
            )
            mask[r_pos, a.head] = True
    if loss0.method == "zero":
        return {layer: rows_where(mask, 0.0) for layer, mask in masks.items()}, list(masks)
    sizes = [len(g) for g in groups.values()]
    hooks = {}
    for layer, mask in masks.items():
        means = [loss.means[i][layer] for loss, i, _ in members]
        value = (
            means[0]
            if len(means) == 1
            else torch.cat([m[None].expand(k, *m.shape) for m, k in zip(means, sizes)])
        )
        hooks[layer] = rows_where(mask, value)
    return hooks, list(masks)


def _keep_clean_records(rows: _Rows, chunk: list[int], members: list, record: dict) -> None:
    """Each (loss, timestep) whose empty set ran on all its images in this forward keeps those rows' record."""
    empty, start = frozenset(), 0
    for loss, i, img in members:
        positions = [
            start + k for k, r in enumerate(chunk[start : start + len(img)]) if rows.key[r] == empty
        ]
        start += len(img)
        if loss.clean[i] is None and sorted(rows.image[chunk[p]] for p in positions) == list(
            range(loss.n_images)
        ):
            by_image = sorted(positions, key=lambda p: rows.image[chunk[p]])
            loss.clean[i] = take_rows(record, np.array(by_image), len(chunk))
