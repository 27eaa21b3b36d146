"""What a conditional network's forward needs besides (x_t, t), and its unconditional input.

- A text-conditioned UNet or PixArt needs ``encoder_hidden_states`` (PixArt also its micro-conditions).
- A class-conditional model (DiT, or a UNet with ``num_class_embeds``) needs ``class_labels``; its unconditional
  input is its null class.
- SD3, Flux and SDXL need the text tokens and a pooled summary (``models.pipeline_text``).
"""

from __future__ import annotations

import inspect

import torch

from diffcircuit.errors import ConfigError, ModelError
from diffcircuit.models.conditioning import Conditioning
from diffcircuit.models.pipeline_text import is_pooled

__all__ = ["added_conditions", "class_labels", "needed_inputs", "placeholder_text"]


def needed_inputs(network: torch.nn.Module) -> list[str]:
    """The conditioning inputs ``network``'s forward cannot run without."""
    params = inspect.signature(network.forward).parameters
    needs = [
        n
        for n in ("encoder_hidden_states", "class_labels")
        if n in params and params[n].default is inspect.Parameter.empty
    ]
    config = network.config
    if (
        getattr(config, "cross_attention_dim", None)
        and "encoder_hidden_states" in params
        and "encoder_hidden_states" not in needs
    ):
        needs.append(
            "encoder_hidden_states"
        )  # PixArt-style transformers: optional in the signature, needed in fact
    if is_pooled(network):  # SD3, Flux, SDXL: the text tokens and a pooled summary
        pooled = "pooled_projections" if "pooled_projections" in params else "added_cond_kwargs"
        needs += [n for n in ("encoder_hidden_states", pooled) if n not in needs]
    labelled = getattr(
        config, "num_class_embeds", None
    ) or (  # DiT: class labels drive its adaLN-Zero
        getattr(config, "num_embeds_ada_norm", None)
        and getattr(config, "norm_type", None) == "ada_norm_zero"
    )
    if labelled and "class_labels" in params and "class_labels" not in needs:
        needs.append("class_labels")
    return needs


def placeholder_text(network: torch.nn.Module) -> Conditioning | None:
    """One zero text token for a network that only needs ``encoder_hidden_states`` (a text-conditioned UNet or
    PixArt): enough to run it for its geometry, not to analyse it. None where it needs more (pooled models)."""
    needs = needed_inputs(network)
    if needs != ["encoder_hidden_states"] or is_pooled(network):
        return None
    dim = int(
        getattr(network.config, "caption_channels", None) or network.config.cross_attention_dim
    )
    return Conditioning(
        {"encoder_hidden_states": torch.zeros(1, 1, dim), **added_conditions(network)},
        "a placeholder token (no prompt given)",
    )


def _null_class(network: torch.nn.Module) -> int | None:
    """DiT's null class (the last row of its label table when trained with label dropout), else None."""
    for module in network.modules():
        table = getattr(module, "embedding_table", None)
        classes = getattr(module, "num_classes", None)
        if (
            isinstance(table, torch.nn.Embedding)
            and classes is not None
            and table.num_embeddings == classes + 1
        ):
            return int(classes)
    return None


def class_labels(network: torch.nn.Module, class_label: int | None) -> Conditioning:
    classes = getattr(network.config, "num_embeds_ada_norm", None) or getattr(
        network.config, "num_class_embeds", None
    )
    if class_label is None:
        null = _null_class(network)
        if null is None:
            raise ModelError(
                f"{type(network).__name__} needs a class label and has no null class: give class_label",
                "class_label",
            )
        return Conditioning(
            {"class_labels": torch.tensor([null])}, f"null class {null} (unconditional)"
        )
    if classes is not None and not 0 <= class_label < int(classes):
        raise ConfigError(
            f"class_label must be in 0..{int(classes) - 1}, not {class_label}", "class_label"
        )
    return Conditioning({"class_labels": torch.tensor([class_label])}, f"class {class_label}")


def added_conditions(network: torch.nn.Module) -> dict:
    """PixArt's micro-conditions (``added_cond_kwargs``): the pixel resolution and aspect ratio when the model
    uses them (its sample size x the VAE's factor 8), else none."""
    config = network.config
    if getattr(config, "norm_type", None) != "ada_norm_single":
        return {}
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    if not getattr(network, "use_additional_conditions", False):
        return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return {
        "added_cond_kwargs": {
            "resolution": torch.tensor([[h * 8.0, w * 8.0]]),
            "aspect_ratio": torch.tensor([[h / w]]),
        }
    }
