"""Prefix reuse: an intervention leaves everything computed before it unchanged, so recompute after it only.

``UNetStages`` runs a ``UNet2DModel`` forward split at its block boundaries — conv_in + time
embedding, each down block, the mid block, each up block, the output head — following
``UNet2DModel.forward`` step for step. A clean run records the state entering every block (the
hidden sample, the skip connections gathered so far and the time embedding) and the output of
every sub-module of each block (ResNets, attentions, resamplers), in execution order. An
intervened run restarts from the first block it touches, and inside that block the sub-modules
that ran before the first touched one return their recorded outputs instead of recomputing.
Models it does not cover (other classes, skip-conv blocks, Fourier time embeddings, class
conditioning) fall back to the full forward.

``BlockMemo`` does the same for any other denoiser (text-conditioned UNets, DiT, PixArt, SD3, Flux) at
the granularity of its top-level blocks (each element of the network's top-level module lists, and
``mid_block``): the clean run records each block's output in execution order; an intervened run calls
the whole forward (``Denoiser.predict``, with the run's conditioning rows) again, but every block that ran
before the first touched one returns its recorded output instead of computing (the embeddings and the
output head are recomputed; they are cheap). ``prefix_runner(denoiser)`` picks the one that applies; both
return what ``Denoiser.predict`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockMemo", "StageState", "UNetStages", "prefix_runner"]


@dataclass(frozen=True)
class StageState:
    sample: torch.Tensor  # hidden sample entering the block  [batch, channels, h, w]
    res: tuple[torch.Tensor, ...]  # skip connections gathered by the down path so far
    emb: torch.Tensor  # time embedding  [batch, channels]


class UNetStages:
    def __init__(self, denoiser):
        self.den = denoiser
        self.net = net = denoiser.network
        self.names = [f"down_blocks.{i}" for i in range(len(getattr(net, "down_blocks", [])))]
        self.names += ["mid_block"] if getattr(net, "mid_block", None) is not None else []
        self.names += [f"up_blocks.{i}" for i in range(len(getattr(net, "up_blocks", [])))]
        self.supported = self._supported(denoiser)

    @staticmethod
    def _supported(denoiser) -> bool:
        from diffusers import UNet2DModel

        net = denoiser.network
        if (
            type(net) is not UNet2DModel
            or denoiser.flow is not None
            or denoiser.conditioning is not None
        ):
            return (
                False  # stage by stage is the bare network's forward: no adapter, no conditioning
            )
        cfg = net.config
        blocks = [*net.down_blocks, *net.up_blocks]
        return (
            not cfg.center_input_sample
            and cfg.time_embedding_type != "fourier"
            and net.class_embedding is None
            and not any(hasattr(b, "skip_conv") for b in blocks)
        )

    def stage_of(self, module_name: str) -> int:
        """Index of the block containing ``module_name`` (0 if it lies before the first block)."""
        for i, name in enumerate(self.names):
            if module_name == name or module_name.startswith(name + "."):
                return i
        return 0

    def _children(self, stage: int) -> list[tuple[str, torch.nn.Module]]:
        block = self.net.get_submodule(self.names[stage])
        out = []
        for group in ("resnets", "attentions", "downsamplers", "upsamplers"):
            for i, module in enumerate(getattr(block, group, None) or []):
                out.append((f"{self.names[stage]}.{group}.{i}", module))
        return out

    def run(
        self, sample: torch.Tensor, timestep: torch.Tensor, *, rows=None, record: dict | None = None
    ) -> torch.Tensor:
        """The full forward; ``record`` (a dict) receives the block states and the sub-module outputs."""
        if not self.supported:
            return self.den.predict(sample, timestep, rows=rows)
        net = self.net
        t = timestep * torch.ones(sample.shape[0], dtype=timestep.dtype, device=timestep.device)
        emb = net.time_embedding(net.time_proj(t).to(dtype=net.dtype))
        hidden = net.conv_in(sample)
        if record is None:
            return self._from(0, StageState(hidden, (hidden,), emb), None)
        record.update(states=[], outputs={}, order=[])

        def keep(name):
            def hook(module, args, out):  # returns None: the output itself is left alone
                record["outputs"][name] = out
                record["order"].append(name)

            return hook

        hooks = [
            module.register_forward_hook(keep(name))
            for stage in range(len(self.names))
            for name, module in self._children(stage)
        ]
        try:
            return self._from(0, StageState(hidden, (hidden,), emb), record["states"])
        finally:
            for h in hooks:
                h.remove()

    def resume(self, touched: list[str], record: dict) -> torch.Tensor:
        """The forward after the first of the ``touched`` modules, from a clean run's ``record``."""
        start = min(self.stage_of(name) for name in touched)
        first = min(
            (
                record["order"].index(c)
                for name in touched
                for c in record["order"]
                if name == c or name.startswith(c + ".")
            ),
            default=None,
        )
        replay = (
            [name for name in record["order"][:first] if self.stage_of(name) == start]
            if first is not None
            else []
        )
        modules = dict(self._children(start))
        try:
            for name in replay:  # sub-modules before the intervention return their clean outputs
                modules[name].forward = lambda *args, _out=record["outputs"][name], **kwargs: _out
            return self._from(start, record["states"][start], None)
        finally:
            for name in replay:
                del modules[name].forward

    def _from(self, start: int, state: StageState, record: list | None) -> torch.Tensor:
        net = self.net
        hidden, res, emb = state.sample, state.res, state.emb
        n_down = len(net.down_blocks)
        for i in range(start, len(self.names)):
            if record is not None:
                record.append(StageState(hidden, res, emb))
            block = self.net.get_submodule(self.names[i])
            if i < n_down:
                hidden, more = block(hidden_states=hidden, temb=emb)
                res = res + more
            elif self.names[i] == "mid_block":
                hidden = block(hidden, emb)
            else:
                k = len(block.resnets)
                hidden, res = block(hidden, res[-k:], emb), res[:-k]
        hidden = net.conv_out(net.conv_act(net.conv_norm_out(hidden)))
        return hidden


class BlockMemo:
    """Prefix reuse by memoised top-level blocks; the same ``run`` / ``resume`` interface as ``UNetStages``."""

    def __init__(self, denoiser):
        self.den = denoiser
        net = denoiser.network
        self.blocks: dict[str, torch.nn.Module] = {}
        for name, child in net.named_children():
            if isinstance(child, torch.nn.ModuleList):
                self.blocks |= {f"{name}.{i}": block for i, block in enumerate(child)}
            elif name == "mid_block" and child is not None:
                self.blocks[name] = child
        self.supported = bool(self.blocks)

    def block_of(self, module_name: str) -> str | None:
        return next(
            (b for b in self.blocks if module_name == b or module_name.startswith(b + ".")), None
        )

    def run(
        self, sample: torch.Tensor, timestep: torch.Tensor, *, rows=None, record: dict | None = None
    ) -> torch.Tensor:
        """The full forward; ``record`` receives the inputs and each block's output, in execution order."""
        if record is None or not self.supported:
            return self.den.predict(sample, timestep, rows=rows)
        record.update(inputs=(sample, timestep), rows=rows, outputs={}, order=[])

        def keep(name):
            def hook(module, args, out):
                record["order"].append(name)
                record["outputs"][name] = out

            return hook

        hooks = [block.register_forward_hook(keep(name)) for name, block in self.blocks.items()]
        try:
            return self.den.predict(sample, timestep, rows=rows)
        finally:
            for h in hooks:
                h.remove()

    def resume(self, touched: list[str], record: dict) -> torch.Tensor:
        """The forward with every block before the first touched one replaced by its recorded output."""
        sample, timestep = record["inputs"]
        rows, order = record["rows"], record["order"]
        if len(order) != len(
            set(order)
        ):  # a block called twice per forward: its outputs are not one thing
            return self.den.predict(sample, timestep, rows=rows)
        firsts = [order.index(b) for b in (self.block_of(name) for name in touched) if b in order]
        first = (
            min(firsts) if len(firsts) == len(touched) else 0
        )  # a touched module outside the blocks: nothing
        replay = order[:first]
        try:
            for name in replay:
                self.blocks[name].forward = lambda *args, _out=record["outputs"][name], **kwargs: (
                    _out
                )
            return self.den.predict(sample, timestep, rows=rows)
        finally:
            for name in replay:
                del self.blocks[name].forward


def prefix_runner(denoiser) -> UNetStages | BlockMemo:
    """``UNetStages`` for the bare UNet2DModels it reproduces, else ``BlockMemo``."""
    stages = UNetStages(denoiser)
    return stages if stages.supported else BlockMemo(denoiser)
