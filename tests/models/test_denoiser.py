"""The ``Denoiser`` owns every adapter; its network stays as diffusers built it (STYLE.md).

On every family: after loading (with conditioning and captions) and running through ``predict_eps``,
plain and instrumented, no module of the network carries a forward hook or pre-hook, a replaced ``forward``,
an attribute of diffcircuit's, or a processor other than the one it was built with.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffcircuit as dc
from diffcircuit.models.loading import load_conditioned, use_captions

# family -> (fixture with its folder, how it is conditioned)
FAMILIES = {
    "embedded": (None, {}),
    "unet": ("small_model_dir", {}),
    "dit": ("dit_folder", {"class_label": 3}),
    "pixart": ("pixart_folder", {"prompt_embeds": "embeds"}),
    "sd3": ("sd3_folder", {"prompt_embeds": "embeds"}),
    "flux": ("flux_folder", {"prompt_embeds": "embeds"}),
    "sdxl": ("sdxl_folder", {"prompt": "a b"}),
}


def _load(family: str, request):
    fixture, options = FAMILIES[family]
    source = "embedded" if fixture is None else str(request.getfixturevalue(fixture))
    if options.get("prompt_embeds") == "embeds":
        options = {
            "prompt_embeds": str(request.getfixturevalue(fixture).parent / "embeds.safetensors")
        }
    return load_conditioned(source, **options)


def _processors(net) -> dict:
    return {name: type(m.processor) for name, m in net.named_modules() if hasattr(m, "processor")}


def _untouched(net: torch.nn.Module) -> list[str]:
    """What diffcircuit might have left on the modules: hooks, a patched forward, ``_diffcircuit_*`` attributes."""
    found = []
    for name, module in net.named_modules():
        hooks = (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._forward_hooks_with_kwargs,
            getattr(module, "_forward_pre_hooks_with_kwargs", {}),
        )
        if any(hooks):
            found.append(f"{name or 'network'}: hooks")
        if "forward" in vars(module):
            found.append(f"{name or 'network'}: forward replaced")
        found += [f"{name or 'network'}.{k}" for k in vars(module) if k.startswith("_diffcircuit")]
    return found


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_network_stays_as_diffusers_built_it(family, request):
    den = _load(family, request)
    processors = _processors(den.network)
    assert _untouched(den.network) == []
    x = torch.randn(
        2,
        den.in_channels,
        den.sample_size,
        den.sample_size,
        generator=torch.Generator().manual_seed(0),
    )
    t = torch.tensor([100, 500])
    with torch.no_grad():
        plain = den.predict_eps(x, t)
        registry = dc.probe_registry(den)
        with dc.instrument(den, registry=registry, capture=True) as session:
            captured = den.predict_eps(x, t)
        assert session.pop("entropy_nats")  # the instrumented forward did run the heads
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    assert _untouched(den.network) == []
    assert _processors(den.network) == processors


def test_captions_live_on_the_denoiser_and_reach_only_the_rows_asked_for(sd3_text_folder):
    """A captioned dataset's rows get their own caption; the same images without rows get the loaded prompt."""
    den = load_conditioned(str(sd3_text_folder), prompt="a")
    use_captions(den, "b", ["a", "bc"])
    assert _untouched(den.network) == [] and set(den.captions) == {"b"}
    x = torch.randn(
        2,
        den.in_channels,
        den.sample_size,
        den.sample_size,
        generator=torch.Generator().manual_seed(1),
    )
    t = torch.tensor([300, 300])
    with torch.no_grad():
        shared = den.predict_eps(x, t)
        own = den.predict_eps(x, t, rows=("b", np.array([0, 1])))
        swapped = den.predict_eps(x.flip(0), t, rows=("b", np.array([1, 0])))
        other = den.predict_eps(
            x, t, rows=("a", np.array([0, 1]))
        )  # dataset "a" has no captions: the prompt
    torch.testing.assert_close(
        own[0], shared[0], atol=1e-5, rtol=1e-5
    )  # image 0's caption is the prompt "a"
    assert not torch.allclose(own[1], shared[1], atol=1e-4)  # image 1's is "bc"
    torch.testing.assert_close(
        swapped.flip(0), own, atol=1e-5, rtol=1e-5
    )  # rows follow the images, not positions
    torch.testing.assert_close(other, shared, atol=0, rtol=0)
