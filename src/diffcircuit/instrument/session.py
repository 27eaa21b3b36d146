"""Hook lifetime: install the instrumented processor on every attention layer, restore on exit.

Processors are global state of the model, so they are swapped only inside a context manager and
put back in ``finally`` (also when the forward pass raises)::

    with instrument(model, capture=True, zero_heads=["mid_block.attentions.0:2"]) as session:
        model(x_t, t)
    entropy = session.pop("entropy_nats")   # {layer: tensor [batch, heads]}
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from diffcircuit.errors import ConfigError, ModelError
from diffcircuit.instrument.capture import CAPTURE_STATISTICS
from diffcircuit.instrument.hooks import Hook, HookContext, replace, scale
from diffcircuit.instrument.processor import (
    InstrumentedAttnProcessor,
    InstrumentedFluxAttnProcessor,
    InstrumentedJointAttnProcessor,
)
from diffcircuit.instrument.registry import HeadAddress, HeadRegistry, attention_modules
from diffcircuit.models.loading import Denoiser

__all__ = [
    "Hook",
    "HookContext",
    "InstrumentSession",
    "KeyFeatures",
    "instrument",
    "probe_registry",
]

# processors whose computation diffcircuit reproduces exactly, and the instrumented processor that does
_REPLACEMENTS = {
    "AttnProcessor2_0": InstrumentedAttnProcessor,
    "AttnProcessor": InstrumentedAttnProcessor,
    "JointAttnProcessor2_0": InstrumentedJointAttnProcessor,
    "FluxAttnProcessor": InstrumentedFluxAttnProcessor,
}

KeyFeatures = Callable[[tuple[int, int]], torch.Tensor]  # grid (h, w) -> [batch, channels, h, w]


class InstrumentSession:
    """What to capture and change, and what was captured, for one instrumented model."""

    def __init__(
        self,
        registry: HeadRegistry,
        *,
        capture: bool | Iterable[str] = False,
        method: str = "fused",
        key_features: KeyFeatures | None = None,
        partner_features: KeyFeatures | None = None,
        partner_paired: tuple[int, ...] = (),
        zero_heads: Iterable[HeadAddress] = (),
        patches: dict[HeadAddress, torch.Tensor] | None = None,
        cache_heads: Iterable[str | HeadAddress] = (),
        shifts: dict[str, torch.Tensor] | None = None,
        keep_graph: bool = False,
        scales: dict[HeadAddress, float] | None = None,
        sample_hw: tuple[int, int] | None = None,
        token_scales: dict[HeadAddress, dict[int, float]] | None = None,
        hooks: dict[HeadAddress | str, Hook] | None = None,
    ):
        if method not in ("fused", "naive"):
            raise ConfigError(f"capture method must be 'fused' or 'naive', not {method!r}")
        self.registry = registry
        # True: every statistic (moments where key features are given, partner moments where partners are);
        # or the names of those to capture (the others are not computed)
        if isinstance(capture, str):
            capture = (capture,)
        elif not isinstance(capture, Iterable):
            capture = CAPTURE_STATISTICS if capture else ()
        self.statistics = frozenset(capture)
        unknown = sorted(self.statistics - set(CAPTURE_STATISTICS))
        if unknown:
            raise ConfigError(
                f"capture: unknown statistics {unknown}; known: {list(CAPTURE_STATISTICS)}"
            )
        self.capture = bool(self.statistics)
        self.method = method
        self.key_features = key_features
        self.partner_features = partner_features
        self.partner_paired = tuple(partner_paired)
        # a layer name caches the layer's [batch, heads, q_pos, d]; a head address only that head's [batch, q_pos, d]
        self.cache_heads = {name for name in cache_heads if not isinstance(name, HeadAddress)}
        self._cached_heads: dict[str, list[HeadAddress]] = defaultdict(list)
        for name in cache_heads:
            if isinstance(name, HeadAddress):
                self._cached_heads[name.layer].append(name)
        self._shifts = dict(shifts or {})
        # the keyword interventions are hooks, in this order per head: scale, then replace (zero, mean, patch);
        # the user's hooks run after them
        self._layer_hooks: dict[str, list[Hook]] = defaultdict(list)
        self._head_hooks: dict[str, dict[int, list[Hook]]] = defaultdict(lambda: defaultdict(list))
        for address, factor in (scales or {}).items():
            self._head_hooks[address.layer][address.head].append(scale(float(factor)))
        replacements = {address: 0.0 for address in zero_heads} | dict(patches or {})
        for address, value in replacements.items():
            self._head_hooks[address.layer][address.head].append(replace(value))
        for where, fn in (hooks or {}).items():
            if isinstance(where, HeadAddress):
                self._head_hooks[where.layer][where.head].append(fn)
            else:
                self._layer_hooks[where].append(fn)
        self._token_scales: dict[str, dict[int, dict[int, float]]] = defaultdict(dict)
        for address, tokens in (token_scales or {}).items():
            if any(w < 0 for w in tokens.values()):
                raise ConfigError("token attention scales must be >= 0 (0 removes the token)")
            self._token_scales[address.layer][address.head] = {
                int(k): float(w) for k, w in tokens.items()
            }
        self.keep_graph = keep_graph
        self.sample_hw = (
            sample_hw  # the model's input (height, width): finds the grid of token sequences
        )
        self._records: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.geometry: dict[str, tuple[tuple[int, int] | None, int]] = {}
        self.text_tokens = (
            0  # Flux: the text length of the current forward, for its single-stream blocks
        )

    # --- the protocol the processors use (public: a processor talks to no private method) ----
    def captures(self, layer: str) -> bool:
        return bool(self.statistics_for(layer))

    def statistics_for(self, layer: str) -> frozenset[str]:
        """The statistics to capture on ``layer`` (names from ``CAPTURE_STATISTICS``); empty: none."""
        return self.statistics

    def key_bias(
        self,
        layer: str,
        heads: int,
        n_keys: int,
        like: torch.Tensor,
        offset: int = 0,
        n_tokens: int | None = None,
    ) -> torch.Tensor | None:
        """Additive logit bias ``[1, heads, 1, n_keys]`` reweighting keys (tokens) in chosen heads: adding
        log w to a key's logits multiplies its attention by w before the softmax renormalises (w = 0
        removes the key). Token j is key ``offset + j`` of ``n_tokens`` (default: the keys from ``offset`` on; in
        SD3's joint attention the text keys follow the image's, in Flux's they come first).
        None when this layer has no token intervention."""
        chosen = self._token_scales.get(layer)
        if not chosen:
            return None
        n_tokens = n_keys - offset if n_tokens is None else n_tokens
        bias = torch.zeros(1, heads, 1, n_keys, dtype=torch.float32, device=like.device)
        for head, tokens in chosen.items():
            for token, weight in tokens.items():
                if not 0 <= token < n_tokens:
                    raise ConfigError(
                        f"{layer} has tokens 0..{n_tokens - 1}; cannot reweight token {token}"
                    )
                bias[0, head, 0, offset + token] = math.log(weight) if weight > 0 else -math.inf
        return bias

    def grid_of(self, shape: torch.Size) -> tuple[int, int] | None:
        """The query grid (height, width) of a layer input: a feature map ``[B, C, h, w]``, or a token
        sequence ``[B, N, C]`` (transformer blocks, DiT patches) whose N positions tile the model's input
        at one scale (N = (H/s)·(W/s) for an integer s); None when they do not."""
        if len(shape) == 4:
            return int(shape[2]), int(shape[3])
        if len(shape) != 3:
            return None
        n = int(shape[1])
        if (
            self.sample_hw is None
        ):  # no input size in the config (Flux): a square grid when N is a square
            side = math.isqrt(n)
            return (side, side) if side * side == n and n else None
        height, width = self.sample_hw
        scale = round((height * width / n) ** 0.5) if n else 0
        if (
            scale < 1
            or height % scale
            or width % scale
            or (height // scale) * (width // scale) != n
        ):
            return None
        return height // scale, width // scale

    def features_for(self, shape: torch.Size, n_keys: int) -> torch.Tensor | None:
        """Key features ``[batch, k_pos, channels]`` for a layer whose keys are its own query grid."""
        grid = self.grid_of(shape)
        if self.key_features is None or grid is None or grid[0] * grid[1] != n_keys:
            return None  # no features asked for, or keys are not positions on the grid (cross-attention)
        maps = self.key_features(grid)  # [batch, channels, height, width]
        return maps.flatten(2).transpose(1, 2)

    def partners_for(self, shape: torch.Size, n_keys: int) -> torch.Tensor | None:
        """Partner images' features ``[n, k_pos, channels]`` (the role null), where keys are the query grid."""
        grid = self.grid_of(shape)
        if self.partner_features is None or grid is None or grid[0] * grid[1] != n_keys:
            return None
        return self.partner_features(grid).flatten(2).transpose(1, 2)

    def head_outputs(self, layer: str, out: torch.Tensor) -> torch.Tensor:
        """Shift, cache, then the hooks of the per-head output ``[batch, heads, q_pos, d]``, in that order.

        A shift is added to the whole layer's output. The hooks: the layer's (``fn(out, ctx)``), then each
        head's on its slice ``[batch, q_pos, d]`` (scale, then replacement — 0.0 for zero ablation, ``[q_pos, d]``
        for a mean, ``[batch, q_pos, d]`` per image —, then the user's); a hook returns the replacement or None.
        """
        shift = self._shifts.get(layer)
        if shift is not None:  # additive: downstream still depends on what came before
            out = out + shift.to(out)
        if layer in self.cache_heads:
            out = self._cache(layer, out)
        cached = self._cached_heads.get(layer, ())
        if cached:  # one head's slice, used downstream (restacked), so a gradient can be taken with respect to it
            slices = list(out.unbind(1))  # [batch, q_pos, d] per head
            for address in cached:
                slices[address.head] = self._cache(str(address), slices[address.head])
            out = torch.stack(slices, dim=1)
        for hook in self._layer_hooks.get(layer, ()):
            new = hook(out, HookContext(address=layer, layer=layer, head=None, batch=out.shape[0]))
            if new is not None:
                if tuple(new.shape) != tuple(out.shape):
                    raise ConfigError(
                        f"the hook on {layer} returned shape {list(new.shape)}, not {list(out.shape)}"
                    )
                out = new.to(out)
        heads = self._head_hooks.get(layer)
        if not heads:
            return out
        slices = list(out.unbind(1))  # [batch, q_pos, d] per head
        for head, hooks in heads.items():
            ctx = HookContext(address=f"{layer}:{head}", layer=layer, head=head, batch=out.shape[0])
            for hook in hooks:
                new = hook(slices[head], ctx)
                if new is not None:
                    slices[head] = torch.as_tensor(new).to(out).expand_as(slices[head])
        return torch.stack(slices, dim=1)

    def record(self, layer: str, stat: str, value: torch.Tensor) -> None:
        """Keep ``value`` on its device (no host sync inside the forward); ``pop`` moves it to the host."""
        self._records[stat][layer].append(value.detach())

    def note_geometry(self, layer: str, shape: torch.Size, n_keys: int) -> None:
        self.geometry[layer] = (self.grid_of(shape), int(n_keys))

    def _cache(self, key: str, value: torch.Tensor) -> torch.Tensor:
        if not self.keep_graph:
            self.record(key, "head_out", value)
            return value
        if not value.requires_grad:  # kept attached, so gradients can be taken with respect to it
            value = value.detach().requires_grad_(True)
        self._records["head_out"][key].append(value)
        return value

    # --- read by the caller ------------------------------------------------------------------
    def pop(self, stat: str = "entropy_nats") -> dict[str, torch.Tensor]:
        """Captured values of ``stat`` since the last pop, per layer, concatenated over forwards.

        ``entropy_nats`` and ``perplexity`` are ``[batch, heads]``; ``moments`` (only for layers
        given key features) ``[batch, heads, channels, channels]``; rows in the order images were fed.
        A name that is not a statistic is refused (a typo would otherwise read as "nothing recorded").
        """
        known = (*CAPTURE_STATISTICS, "head_out")
        if stat not in known:
            raise ConfigError(f"no statistic {stat!r}: the session records {', '.join(known)}")
        recorded = self._records.pop(stat, {})
        # one forward: the recorded tensor itself (attached to the graph with keep_graph), else concatenated
        out = {
            layer: chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            for layer, chunks in recorded.items()
        }
        if self.keep_graph and stat == "head_out":  # stays on its device, in the graph
            return out
        return {
            layer: value.cpu() for layer, value in out.items()
        }  # the batch's records leave the device once


def _sample_hw(model: torch.nn.Module) -> tuple[int, int] | None:
    """The (height, width) of the model's input, from its diffusers config."""
    size = getattr(getattr(model, "config", None), "sample_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def _hook_addresses(registry: HeadRegistry, hooks: dict | None) -> dict:
    """Hooks keyed by HeadAddress (a head) or by layer path (a layer); unknown addresses refused in one line."""
    out: dict[HeadAddress | str, Callable] = {}
    for address, fn in (hooks or {}).items():
        if not callable(fn):
            raise ConfigError(f"the hook for {address} is not callable")
        text = str(address)
        if isinstance(address, HeadAddress) or ":" in text:
            out[registry.parse(address)] = fn
        else:
            out[registry.layer(text).layer] = fn
    return out


@contextmanager
def instrument(
    model: torch.nn.Module,
    *,
    registry: HeadRegistry | None = None,
    capture: bool | Iterable[str] = False,
    method: str = "fused",
    key_features: KeyFeatures | None = None,
    partner_features: KeyFeatures | None = None,
    partner_paired: tuple[int, ...] = (),
    zero_heads: Iterable[str | HeadAddress] = (),
    patches: dict[str | HeadAddress, torch.Tensor] | None = None,
    cache_heads: Iterable[str | HeadAddress] = (),
    shifts: dict[str, torch.Tensor] | None = None,
    keep_graph: bool = False,
    scales: dict[str | HeadAddress, float] | None = None,
    token_scales: dict[str | HeadAddress, dict[int, float]] | None = None,
    hooks: dict[str | HeadAddress, Hook] | None = None,
) -> Iterator[InstrumentSession]:
    """Instrument every attention layer of ``model`` (a ``Denoiser`` or its network) for the ``with`` block.

    ``capture`` records per-head statistics — True for all of them, or the names of those wanted
    (``capture.CAPTURE_STATISTICS``: the others are not computed) — (``method`` "fused": one fused kernel call,
    or "naive": explicit softmax, the reference). ``key_features(grid) -> [batch, channels, h, w]`` supplies
    per-key feature maps on a layer's query grid for attention moments; ``partner_features(grid) -> [n, channels,
    h, w]`` the maps of n other images, against which each head's attention is also scored (recorded as
    ``"partner_moments"`` ``[batch, heads, n, channels+1, channels+1]``, the query-weighted moments filled for the
    channel indices in ``partner_paired`` only; see ``capture.partner_moments``; the role null). ``zero_heads`` zero-ablates
    heads; ``patches`` maps heads to replacement values for their output slice (before ``to_out``);
    ``cache_heads`` names layers whose per-head outputs are recorded as ``"head_out"`` ``{layer: [batch, heads,
    q_pos, head_dim]}``, or heads (``layer:head``) recorded alone as ``{address: [batch, q_pos, head_dim]}``
    (attached to the autograd graph with ``keep_graph``); ``shifts`` adds a tensor ``[batch, heads, q_pos, d]`` to
    a layer's per-head output; ``scales`` multiplies heads' output slices by a factor (after shifts
    and caching, before patches); ``token_scales`` maps a head to ``{key index: w}``: its attention to
    that key (a prompt token, in cross-attention) is multiplied by w and renormalised (0 ablates it).
    ``hooks`` maps addresses to ``fn(value, ctx) -> replacement or None`` (the extension point; factories in
    ``diffcircuit.instrument.hooks``, ``dc.hooks``): at a head address ``layer:head`` the value is that head's output slice
    before ``to_out``, ``[batch, q_pos, head_dim]``; at a layer address the whole ``[batch, heads, q_pos,
    head_dim]``. They run after the keyword interventions above, layer hooks before head hooks.
    """
    model = _network(model)  # a Denoiser's network
    registry = registry or HeadRegistry.from_model(model)
    session = InstrumentSession(
        registry,
        capture=capture,
        method=method,
        key_features=key_features,
        partner_features=partner_features,
        partner_paired=partner_paired,
        zero_heads=[registry.parse(a) for a in zero_heads],
        patches={registry.parse(a): v for a, v in (patches or {}).items()},
        cache_heads=[
            registry.parse(name) if ":" in str(name) else registry.layer(str(name)).layer
            for name in cache_heads
        ],
        shifts={registry.layer(name).layer: v for name, v in (shifts or {}).items()},
        keep_graph=keep_graph,
        scales={registry.parse(a): v for a, v in (scales or {}).items()},
        sample_hw=_sample_hw(model),
        token_scales={registry.parse(a): v for a, v in (token_scales or {}).items()},
        hooks=_hook_addresses(registry, hooks),
    )
    modules = list(attention_modules(model))
    originals = [module.processor for _, module in modules]
    kinds = []
    for (name, _), original in zip(modules, originals):
        kind = _REPLACEMENTS.get(type(original).__name__)
        if isinstance(
            original, InstrumentedAttnProcessor
        ):  # already instrumented (nested): same kind again
            kind = type(original)
        if getattr(original, "_attention_backend", None) not in (
            None,
            "native",
        ):  # e.g. flash: not what we run
            kind = None
        if kind is None:
            raise ModelError(
                f"{name} runs {type(original).__name__}, which diffcircuit cannot reproduce yet; "
                "its heads cannot be instrumented"
            )
        kinds.append(kind)
    try:
        for (name, module), kind in zip(modules, kinds):
            module.set_processor(kind(name, session))
        yield session
    finally:
        for (_, module), original in zip(modules, originals):
            module.set_processor(original)


def _network(model) -> torch.nn.Module:
    """The network of a ``Denoiser``, or ``model`` itself when it is a network."""
    return model.network if isinstance(model, Denoiser) else model


@torch.no_grad()
def probe_registry(
    model,
    sample: torch.Tensor | None = None,
    timestep: torch.Tensor | None = None,
    **forward_kwargs,
) -> HeadRegistry:
    """Registry with query grids and key counts, measured by one idle forward pass on ``sample`` (default: one
    zero input of the model's size at t = 0). ``model``: a ``Denoiser`` (run through ``predict``, with its
    conditioning and adapters) or a bare network (called as ``model(sample, timestep=..., **forward_kwargs)``)."""
    net = _network(model)
    if sample is None:
        if not isinstance(model, Denoiser):
            raise ConfigError("probe_registry on a bare network needs a sample input")
        sample = torch.zeros(1, model.in_channels, model.sample_size, model.sample_size)
    device = next(net.parameters()).device
    sample = sample.to(device)
    timestep = (
        torch.zeros(len(sample), dtype=torch.long, device=device)
        if timestep is None
        else timestep.to(device)
    )
    with instrument(net) as session:
        if isinstance(model, Denoiser):
            model.predict(sample, timestep)
        else:
            net(sample, timestep=timestep, **forward_kwargs)
    return HeadRegistry.from_model(net, geometry=session.geometry)
