# %% [markdown]
# # diffcircuit, one step at a time
#
# From loading a denoiser to a circuit, on the embedded model (`tiny-ddpm-32`, 72 heads), in about a minute on a
# laptop CPU. Run it as a script (`python examples/tutorial.py`) or open it as a notebook (jupytext reads the
# `# %%` cells). Figures go to `$TUTORIAL_OUT` (default `tutorial-out/`). The test suite runs this file as written.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffcircuit as dc  # noqa: E402
from diffcircuit.models.noise import noisy_batch  # noqa: E402

OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial-out"))
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# %% [markdown]
# ## 1. Load a model and some images
# `load_denoiser` takes `"embedded"`, a local diffusers folder or a hub id. `model_images` prepares an image set for
# it (a latent model's images would be encoded by its VAE). The faces are LFW's; the shapes are procedural, with
# object masks.

# %%
den = dc.load_denoiser()
faces = dc.model_images(den, "faces", n=8)
shapes = dc.model_images(
    den, "synthetic", n=8, gray=True
)  # gray like the faces: the sets differ in content
registry = dc.probe_registry(den)
print(f"{len(registry)} heads in {len(registry.layers)} attention layers")

# %% [markdown]
# ## 2. Observe every head
# `observe` noises each image with its own seeded draw, denoises it once with every head instrumented, and returns
# one row per image x timestep x head. `entropy_norm` is the attention entropy over ln(keys): 1 is uniform.

# %%
heads, images = dc.observe(den, faces.images, timesteps=[500], pictures=faces.pixels)
entropy = heads.groupby(["layer", "head"], sort=False).entropy_norm.mean()
fig, ax = plt.subplots(figsize=(10, 2.5))
ax.bar(range(len(entropy)), entropy.to_numpy())
ax.set(xlabel="head (data-flow order)", ylabel="entropy / ln(keys)", title="faces, t = 500")
fig.savefig(OUT / "1_entropy.png", dpi=90, bbox_inches="tight")
print(
    "most focal head: {}:{}".format(*entropy.idxmin()), f"(entropy / ln keys {entropy.min():.3f})"
)

# %% [markdown]
# ## 3. Ablate one head
# `instrument(den, ...)` swaps the attention processors for the length of the `with` block. `zero_heads` zeroes a
# head's output before the output projection mixes heads. `den.predict_eps` is the one way to run the model: the ε
# its output implies (this model predicts v).

# %%
layer, index = entropy.idxmin()
head = f"{layer}:{index}"
batch = noisy_batch(den, faces.images, np.arange(8), 500, seed=0, dataset="faces")
with torch.no_grad():
    clean = den.predict_eps(batch.x_t, batch.t)
    with dc.instrument(den, zero_heads=[head]):
        ablated = den.predict_eps(batch.x_t, batch.t)
mse = lambda eps_hat: ((eps_hat - batch.eps) ** 2).flatten(1).mean(1)  # noqa: E731
degradation = 100 * (mse(ablated) - mse(clean)) / mse(clean)
print(
    f"zeroing {head} changes the ε-MSE by {degradation.mean():+.2f} % (per image: {degradation.numpy().round(2)})"
)

# %% [markdown]
# ## 4. Patch a head between two images
# Noise a face and a shape with the same draw, cache the head's output on the face (`dc.hooks.cache`), and put it
# into the shape's forward (`dc.hooks.replace`). The moved fraction is how far the shape's output moved toward the
# face's: 0 not at all, 1 all the way.

# %%
source = noisy_batch(den, faces.images[:4], np.arange(4), 500, seed=0, dataset="a", noise="pair")
receiver = noisy_batch(den, shapes.images[:4], np.arange(4), 500, seed=0, dataset="b", noise="pair")
store: list = []
with torch.no_grad():
    with dc.instrument(den, hooks={head: dc.hooks.cache(store)}):
        out_source = den.predict(source.x_t, source.t)
    out_receiver = den.predict(receiver.x_t, receiver.t)
    with dc.instrument(den, hooks={head: dc.hooks.replace(store[0])}):
        out_patched = den.predict(receiver.x_t, receiver.t)
toward, moved = (out_source - out_receiver).flatten(1), (out_patched - out_receiver).flatten(1)
moved_frac = (moved * toward).sum(1) / toward.pow(2).sum(1)
print(
    f"patching {head} from faces into shapes moves the output by {moved_frac.mean():.4f} of the way"
)

# %% [markdown]
# ## 5. Your own intervention: a hook
# A hook is `fn(value, ctx)`: `value` is the head's output slice `[batch, q_pos, head_dim]` (at a layer address,
# every head's `[batch, heads, q_pos, head_dim]`); return the replacement, or `None` to leave it. This one caps
# the norm of each query position's output at a fraction of its mean norm.


# %%
def cap_norm(fraction: float):
    def hook(value, ctx):  # value: [batch, q_pos, head_dim]
        norms = value.norm(dim=-1, keepdim=True)
        limit = fraction * norms.mean()
        return value * (limit / norms.clamp_min(1e-12)).clamp(max=1.0)

    return hook


with torch.no_grad(), dc.instrument(den, hooks={head: cap_norm(0.5)}):
    capped = den.predict_eps(batch.x_t, batch.t)
print(
    f"capping {head} at half its mean norm: ε-MSE {mse(clean).mean():.6f} -> {mse(capped).mean():.6f}"
)

# %% [markdown]
# ## 6. A circuit
# Rank heads by attribution patching (one forward and backward), then prune ACDC-style: remove heads, least
# important first, while the loss with everything outside the circuit mean-ablated stays within τ = 5 % of the gap
# between ablating every head and none. The gap is tested first: no circuit is claimed where ablating every head
# does not significantly hurt.

# %%
from diffcircuit.discovery import CircuitLoss, gap_test, prune_circuit  # noqa: E402
from diffcircuit.interventions.attribution import attribution_scores  # noqa: E402

scores = attribution_scores(
    den, faces.images, timesteps=[500], method="mean", probes=1, dataset="faces", registry=registry
)
importance = {
    registry.parse(f"{name}:{h}"): v  # mean predicted degradation of each head's ablation
    for (name, h), v in scores.groupby(["layer", "head"]).degradation_pct.mean().items()
}
loss = CircuitLoss(den, faces.images, timesteps=[500], dataset="faces", registry=registry)
test = gap_test(loss)
print(f"gap: {test.mean:.4g} (one-sided p = {test.p_value:.3g}, n = {test.n_images} images)")
if test.significant:
    circuit = prune_circuit(loss, importance, 0.05)
    print(
        f"circuit: {len(circuit.heads)} of {len(registry)} heads, faithfulness {circuit.faithfulness:.3f}"
    )
    grid = np.full((len(registry.layers), max(i.heads for i in registry.layers)), np.nan)
    for i, info in enumerate(registry.layers):
        grid[i, : info.heads] = 0
    for a in circuit.heads:
        grid[[i.layer for i in registry.layers].index(a.layer), a.head] = 1
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.imshow(grid, cmap="Greens", vmin=0, vmax=1.3, aspect="auto")
    ax.set_yticks(range(len(registry.layers)), [i.layer for i in registry.layers], fontsize=6)
    ax.set(xlabel="head", title=f"circuit at τ = 0.05 (faces, t = 500): {len(circuit.heads)} heads")
    fig.savefig(OUT / "2_circuit.png", dpi=90, bbox_inches="tight")
else:
    circuit = None
    print("no circuit claimed: ablating every head does not significantly hurt at this n")

# %% [markdown]
# ## Next
# `diffcircuit run` does all of this — and the statistics behind every claim — for two image distributions,
# resumably, with a report; `diffcircuit discover`, `ablate` and `generate` do one part each. See the README.
