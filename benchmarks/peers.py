"""Per-head attention entropy and single-head zero ablations: diffcircuit against nnsight and plain diffusers.

Times, in one run, on the embedded model and one batch of synthetic images noised to t = 500:

- the entropy of every head's attention (per image and head, mean over queries of
  H_i = -sum_j p_ij log p_ij, as in ``diffcircuit.instrument.capture``), captured by
  (a) diffcircuit: ``instrument(net, capture=True, method="fused")``. There is no entropy-only
      switch: without key features the capture records entropy and perplexity (no moments);
  (b) nnsight: the same UNet with diffusers' eager ``AttnProcessor``, wrapped in ``NNsight``; in one
      trace, for every attention layer, the attention probabilities that the eager processor
      materialises are read where they are made, ``attn.source.self_processor_0.source
      .attn_get_attention_scores_0.output`` (nnsight's operation-level access into the processor),
      and reduced to entropies inside the trace, so only [batch, heads] tensors are saved. Also
      timed: the classic module-level way, saving ``to_q``/``to_k`` outputs and computing the
      softmax after the trace. The ratio uses the faster of the two;
  (c) plain diffusers: an eager processor (diffusers' ``AttnProcessor`` steps) whose softmax is
      written out by hand and whose probabilities are reduced to entropies on the spot.
  All three must agree with (a) to 1e-4 nats.
- all single-head zero ablations on the batch (one forward per head, ε-MSE per image):
  diffcircuit's fastest path, ``ablation_sweep`` over ``targets(registry, "head")`` with method
  "zero" (prefix reuse: each forward restarts at the head's block from the clean run's state;
  its timing includes drawing the noise and building the table), against nnsight: one trace per
  head that zeroes the head's channels of the input of ``attn.to_out[0]`` (the heads'
  concatenated output before the output projection: what diffcircuit's zero ablation zeroes),
  plus one clean trace. nnsight runs the default SDPA processor here (it needs no probabilities,
  so the eager one would only slow it down), and one trace per head: a plain ``NNsight`` model
  cannot batch several invokes in one trace. The ε-MSE degradations of every head and image must
  agree to 1e-5 of the clean ε-MSE.

Each contender runs on its own copy of the network (nnsight permanently wraps the modules it
touches). Entropy timings are medians of interleaved repeats; ablation timings are medians of
interleaved rounds. Ratios above 1 mean diffcircuit is faster.

    bash benchmarks/peers-setup.sh     # once: benchmarks/.peers-venv with nnsight
    benchmarks/.peers-venv/bin/python benchmarks/peers.py [--batch 64] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from importlib.metadata import version

import nnsight
import numpy as np
import torch
from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)
from diffusers.models.attention_processor import AttnProcessor
from nnsight import NNsight

from diffcircuit import instrument, load_denoiser, load_images, probe_registry
from diffcircuit.instrument.registry import attention_modules
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.diffusion import add_noise, eps_mse_per_image
from diffcircuit.models.noise import batch_noise

TIMESTEP = 500
SEED, DATASET = 0, "a"  # the noise draws ablation_sweep makes, reproduced for nnsight


def _entropy_from_probs(probs: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch * heads, Q, K] probabilities (diffusers' head_to_batch_dim layout) -> [batch, heads]."""
    return (
        torch.special.entr(probs).sum(-1).mean(-1).view(-1, heads)
    )  # entr(p) = -p log p, 0 at p = 0


class EntropyAttnProcessor:
    """diffusers' ``AttnProcessor`` step for step, with the softmax written out and its entropy kept."""

    def __init__(self, layer: str, sink: dict):
        self.layer, self.sink = layer, sink

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)  # [batch * heads, pos, d]
        # the softmax of attn.get_attention_scores, by hand: scale folded into one baddbmm
        if attention_mask is None:
            scores = torch.baddbmm(
                query.new_empty(query.shape[0], query.shape[1], key.shape[1]),
                query,
                key.transpose(-1, -2),
                beta=0,
                alpha=attn.scale,
            )
        else:
            scores = torch.baddbmm(
                attention_mask, query, key.transpose(-1, -2), beta=1, alpha=attn.scale
            )
        probs = scores.softmax(dim=-1)
        self.sink[self.layer] = _entropy_from_probs(probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def processors(net, make):
    """Install ``make(layer)`` on every attention layer for the block, then put the originals back."""
    modules = attention_modules(net)
    originals = [m.processor for _, m in modules]
    try:
        for name, m in modules:
            m.set_processor(make(name))
        yield
    finally:
        for (_, m), original in zip(modules, originals):
            m.set_processor(original)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"layers differ: {sorted(a)} vs {sorted(b)}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--repeats",
        type=int,
        default=9,
        help="timed entropy runs per variant (3 interleaved rounds); ablation rounds: repeats // 3",
    )
    args = parser.parse_args()

    den = load_denoiser()  # diffcircuit and plain diffusers
    den_nn_entropy = load_denoiser()  # nnsight, eager processor
    den_nn_ablate = load_denoiser()  # nnsight, default SDPA processor
    net = den.network
    data = load_images("synthetic", n=args.batch, size=den.sample_size, channels=den.in_channels)
    images = np.asarray(data.images, dtype=np.float32)  # data.images may be a lazy array
    x0 = torch.from_numpy(images)
    eps = batch_noise(
        x0.shape[1:], seed=SEED, dataset=DATASET, images=np.arange(args.batch), timestep=TIMESTEP
    )
    t = torch.full((args.batch,), TIMESTEP, dtype=torch.long)
    x_t = add_noise(x0, eps, t, den.alphas_cumprod)  # what ablation_sweep feeds the model
    registry = probe_registry(net, x_t[:1], t[:1])
    layers = [info.layer for info in registry.layers]
    heads = {info.layer: info.heads for info in registry.layers}
    head_dim = {info.layer: info.head_dim for info in registry.layers}

    # --- entropy ------------------------------------------------------------------------------
    @torch.no_grad()
    def entropy_diffcircuit():
        with instrument(net, registry=registry, capture=True, method="fused") as session:
            net(x_t, t)
        return session.pop("entropy_nats")

    @torch.no_grad()
    def entropy_eager():
        sink = {}
        with processors(net, lambda name: EntropyAttnProcessor(name, sink)):
            net(x_t, t)
        return sink

    for _, module in attention_modules(den_nn_entropy.network):
        module.set_processor(AttnProcessor())
    model_e = NNsight(den_nn_entropy.network)

    @torch.no_grad()
    def entropy_nnsight():
        with model_e.trace(x_t, t):
            entropy = nnsight.save({})
            for layer in layers:  # in execution order, as nnsight requires
                probs = model_e.get(
                    layer
                ).source.self_processor_0.source.attn_get_attention_scores_0.output
                entropy[layer] = _entropy_from_probs(probs, heads[layer])
        return entropy

    @torch.no_grad()
    def entropy_nnsight_qk():
        with model_e.trace(x_t, t):
            qk = nnsight.save({})
            for layer in layers:
                attn = model_e.get(layer)
                qk[layer] = (attn.to_q.output, attn.to_k.output)
        entropy = {}
        for layer, (q, k) in qk.items():
            b, h, d = q.shape[0], heads[layer], head_dim[layer]
            q = q.view(b, -1, h, d).transpose(1, 2)  # [batch, heads, Q, d]
            k = k.view(b, -1, h, d).transpose(1, 2)
            probs = ((q @ k.transpose(-1, -2)) * d**-0.5).softmax(-1)
            entropy[layer] = torch.special.entr(probs).sum(-1).mean(-1)
        return entropy

    reference = entropy_diffcircuit()
    diffs = {
        "nnsight": _max_diff(reference, entropy_nnsight()),
        "nnsight to_q/to_k": _max_diff(reference, entropy_nnsight_qk()),
        "eager": _max_diff(reference, entropy_eager()),
    }
    for name, diff in diffs.items():
        assert diff <= 1e-4, f"{name} entropy differs from diffcircuit's by {diff:.2e} nats"

    fns = {
        "diffcircuit": entropy_diffcircuit,
        "nnsight": entropy_nnsight,
        "nnsight_qk": entropy_nnsight_qk,
        "eager": entropy_eager,
    }
    rounds = {name: [] for name in fns}
    for _ in range(3):  # interleaved, so drifts in machine load hit all of them alike
        for name, fn in fns.items():
            rounds[name].append(median_seconds(fn, max(1, args.repeats // 3)))
    t_ent = {name: statistics.median(values) for name, values in rounds.items()}

    # --- single-head zero ablations -----------------------------------------------------------
    heads_list = targets(registry, "head")
    model_a = NNsight(den_nn_ablate.network)

    def ablate_diffcircuit(subset=heads_list):
        table = ablation_sweep(
            den,
            images,
            targets=subset,
            methods=["zero"],
            timesteps=[TIMESTEP],
            seed=SEED,
            dataset=DATASET,
            batch_size=args.batch,
            registry=registry,
        )
        n = len(subset)
        return (
            table.mse_clean.to_numpy().reshape(n, -1)[0],
            table.mse_intervened.to_numpy().reshape(n, -1),
        )  # rows: heads in order, columns: images

    @torch.no_grad()
    def ablate_nnsight(subset=heads_list):
        with model_a.trace(x_t, t):
            clean = model_a.output.sample.save()
        intervened = []
        for target in subset:
            d, h = head_dim[target.layer], target.head
            with model_a.trace(x_t, t):
                model_a.get(target.layer).to_out[0].input[:, :, h * d : (h + 1) * d] = 0
                out = model_a.output.sample.save()
            intervened.append(eps_mse_per_image(den_nn_ablate.eps_hat(out, x_t, t), eps))
        return eps_mse_per_image(
            den_nn_ablate.eps_hat(clean, x_t, t), eps
        ).double().numpy(), torch.stack(intervened).double().numpy()

    ablate_diffcircuit(heads_list[:2])  # warm-up
    ablate_nnsight(heads_list[:2])
    n_rounds = max(1, args.repeats // 3)
    abl_times = {"diffcircuit": [], "nnsight": []}
    results = {}
    for _ in range(n_rounds):
        for name, fn in (("diffcircuit", ablate_diffcircuit), ("nnsight", ablate_nnsight)):
            start = time.perf_counter()
            results[name] = fn()
            abl_times[name].append(time.perf_counter() - start)
    (clean_dc, mse_dc), (clean_nn, mse_nn) = results["diffcircuit"], results["nnsight"]
    scale = np.abs(clean_dc).max()
    clean_diff = np.abs(clean_dc - clean_nn).max() / scale
    abl_diff = np.abs((mse_dc - clean_dc) - (mse_nn - clean_nn)).max() / scale
    assert clean_diff <= 1e-5 and abl_diff <= 1e-5, (
        f"ablations disagree: clean {clean_diff:.2e}, degradation {abl_diff:.2e} (relative to the clean ε-MSE)"
    )
    t_abl = {name: statistics.median(values) for name, values in abl_times.items()}

    # --- report -------------------------------------------------------------------------------
    t_nn_best = min(t_ent["nnsight"], t_ent["nnsight_qk"])
    print(
        f"nnsight: {version('nnsight')}  torch: {torch.__version__}  diffusers: {version('diffusers')}"
    )
    print(
        f"threads: {torch.get_num_threads()}  batch: {args.batch}  heads: {len(registry)}  "
        f"layers: {len(layers)}  timestep: {TIMESTEP}"
    )
    print(
        "diffcircuit capture: fused, entropy + perplexity (no entropy-only option; no key features, so no moments)"
    )
    print(
        f"entropy max |diff| vs diffcircuit (nats): nnsight {diffs['nnsight']:.1e}, "
        f"nnsight to_q/to_k {diffs['nnsight to_q/to_k']:.1e}, eager {diffs['eager']:.1e}"
    )
    print(f"entropy diffcircuit (fused capture):     {t_ent['diffcircuit'] * 1000:8.1f} ms")
    print(f"entropy nnsight (.source probabilities): {t_ent['nnsight'] * 1000:8.1f} ms")
    print(f"entropy nnsight (to_q/to_k + softmax):   {t_ent['nnsight_qk'] * 1000:8.1f} ms")
    print(f"entropy eager diffusers (manual softmax):{t_ent['eager'] * 1000:8.1f} ms")
    print(
        f"ablation max |diff| relative to clean ε-MSE: {abl_diff:.1e} ({len(heads_list)} heads x {args.batch} images)"
    )
    print(f"ablations diffcircuit (ablation_sweep):  {t_abl['diffcircuit'] * 1000:8.1f} ms")
    print(f"ablations nnsight (one trace per head):  {t_abl['nnsight'] * 1000:8.1f} ms")
    print(f"entropy_ratio_nnsight: {t_nn_best / t_ent['diffcircuit']:.3f}")
    print(f"entropy_ratio_eager: {t_ent['eager'] / t_ent['diffcircuit']:.3f}")
    print(f"ablation_ratio_nnsight: {t_abl['nnsight'] / t_abl['diffcircuit']:.3f}")


if __name__ == "__main__":
    main()
