"""Prompts for SD3, Flux and PixArt, encoded by their own pipeline's ``encode_prompt``.

SD3 and Flux read several text encoders at once: SD3 two CLIPs (their penultimate hidden states side by
side, and their pooled outputs) followed by T5's tokens; Flux T5's tokens and CLIP's pooled output.
PixArt reads T5's tokens with an attention mask over the padding. The
pipeline class named in the folder's ``model_index.json`` is loaded without its transformer and VAE, and its
own ``encode_prompt`` does the work, so the embeddings are exactly those its pipeline would feed.

Each key position is named by the tokenizer that made it (real tokens only; padding positions are None),
in the order the model sees them, so DAAM maps and token interventions address the right keys.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from diffcircuit.errors import ModelError
from diffcircuit.models.configfile import read_json

__all__ = [
    "encode_with_pipeline",
    "is_pooled",
    "pooled_dims",
    "pooled_kwargs",
    "zeros_for_empty_prompt",
]


def is_pooled(network: torch.nn.Module) -> bool:
    """Whether ``network`` reads a pooled text summary beside the text tokens: SD3 and Flux
    (``pooled_projections``), SDXL (``added_cond_kwargs`` text embeddings and size conditions)."""
    config = network.config
    params = inspect.signature(network.forward).parameters
    return bool(
        (getattr(config, "pooled_projection_dim", None) and "pooled_projections" in params)
        or (
            getattr(config, "addition_embed_type", None) == "text_time"
            and "added_cond_kwargs" in params
        )
    )


def pooled_dims(network: torch.nn.Module) -> tuple[int, int]:
    """(token dim, pooled dim) ``network`` expects."""
    config = network.config
    if (
        getattr(config, "addition_embed_type", None) == "text_time"
    ):  # SDXL: pooled text and 6 size numbers, embedded
        return int(config.cross_attention_dim), int(
            config.projection_class_embeddings_input_dim
        ) - 6 * int(config.addition_time_embed_dim)
    return int(config.joint_attention_dim), int(config.pooled_projection_dim)


def zeros_for_empty_prompt(root: Path) -> bool:
    """SDXL pipelines feed zeros, not the encoded empty prompt, as their unconditional input
    (``force_zeros_for_empty_prompt``, on unless the folder's model_index.json turns it off)."""
    index = root / "model_index.json"
    if not index.exists():
        return False
    config = read_json(index)
    return str(config.get("_class_name", "")).startswith("StableDiffusionXL") and config.get(
        "force_zeros_for_empty_prompt", True
    )


def _pixels(root: Path, network: torch.nn.Module) -> int:
    """The pixel side of the model's images: its sample size times the VAE's downsampling."""
    vae = root / "vae" / "config.json"
    levels = len(read_json(vae).get("block_out_channels", [0])) if vae.exists() else 1
    size = network.config.sample_size
    return int(size[0] if isinstance(size, (list, tuple)) else size) * 2 ** (levels - 1)


def pooled_kwargs(
    network: torch.nn.Module, root: Path, embeds: torch.Tensor, pooled: torch.Tensor
) -> dict:
    """The forward inputs of a pooled model, one row per prompt. SDXL's size conditions are those its pipeline
    uses by default: the image's own size, uncropped, (h, w, 0, 0, h, w)."""
    dims = pooled_dims(network)
    if (embeds.shape[-1], pooled.shape[-1]) != dims:
        raise ModelError(
            f"the text encoders give {embeds.shape[-1]}-dim tokens and a {pooled.shape[-1]}-dim "
            f"summary; the model expects {dims[0]} and {dims[1]}"
        )
    if getattr(network.config, "addition_embed_type", None) != "text_time":
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    side = float(_pixels(root, network))
    time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]]).expand(len(pooled), 6)
    return {
        "encoder_hidden_states": embeds,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
    }


def _load_pipeline(root: Path, allow_pickle: bool):
    import diffusers

    index = root / "model_index.json"
    if not index.exists():
        raise ModelError(
            f"{root} is not a pipeline folder (no model_index.json) to encode a prompt with; "
            "give prompt_embeds (a safetensors file) instead",
            "prompt_embeds",
        )
    name = read_json(index).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "encode_prompt"):
        raise ModelError(
            f"{index} names {name!r}, which has no encode_prompt; give prompt_embeds instead",
            "prompt_embeds",
        )
    optional = set(getattr(cls, "_optional_components", []) or [])
    needed = [
        name
        for name in inspect.signature(cls.__init__).parameters
        if name.startswith(("text_encoder", "tokenizer")) and name not in optional
    ]
    missing = [name for name in needed if not (root / name).is_dir()]
    if missing:
        raise ModelError(
            f"{root} has no {missing[0]}/ to encode a prompt with; give prompt_embeds, a safetensors file "
            "with the tensors 'prompt_embeds' and 'pooled_prompt_embeds', instead",
            "prompt_embeds",
        )
    try:
        return cls.from_pretrained(
            root, transformer=None, vae=None, use_safetensors=not allow_pickle
        )
    except ImportError:
        raise ModelError(
            "encoding prompts needs transformers: pip install 'diffcircuit[text]'"
        ) from None
    except Exception as exc:
        raise ModelError(
            f"could not load the text encoders of {root}: {str(exc).strip().splitlines()[0]}"
        ) from None


def _names(tokenizer, prompt: str, length: int) -> list[str | None]:
    """The tokens of ``prompt`` as ``tokenizer`` pads it to ``length`` keys: names, then None for padding."""
    encoded = tokenizer(prompt, padding="max_length", max_length=length, truncation=True)
    real = int(sum(encoded["attention_mask"]))
    return tokenizer.convert_ids_to_tokens(encoded["input_ids"][:real]) + [None] * (length - real)


def encode_with_pipeline(root: Path, prompts: list[str], *, allow_pickle: bool = False):
    """``(embeds [n, keys, dim], pooled [n, dim'] or a mask [n, keys], names)``: ``names[i]`` names prompt i's keys
    (None: padding). PixArt's pipeline gives an attention mask over its T5 tokens instead of a pooled summary."""
    pipe = _load_pipeline(root, allow_pickle)
    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs = {"prompt": prompts, "device": "cpu", "num_images_per_prompt": 1}
    kwargs |= {name: None for name in ("prompt_2", "prompt_3") if name in params}
    if "do_classifier_free_guidance" in params:
        kwargs["do_classifier_free_guidance"] = False
    if "clean_caption" in params:
        kwargs["clean_caption"] = (
            False  # the pipeline's caption cleaning needs bs4 and ftfy; prompts go in as given
        )
    if "max_sequence_length" in params:
        t5 = (
            getattr(pipe, "tokenizer_3", None)
            or getattr(pipe, "tokenizer_2", None)
            or pipe.tokenizer
        )
        if t5 is not None and t5.model_max_length < params["max_sequence_length"].default:
            kwargs["max_sequence_length"] = (
                t5.model_max_length
            )  # a tokenizer shorter than the pipeline's default
    with torch.no_grad():
        out = pipe.encode_prompt(**kwargs)
    pixart = type(pipe).__name__.startswith("PixArt")
    if pixart or len(out) != 4:  # PixArt: (pe, mask, npe, nmask); Flux: (pe, pooled, text ids)
        embeds, pooled = out[0], out[1]
    else:  # SD3: (pe, npe, pooled, npooled)
        embeds, pooled = out[0], out[2]
    names = []
    for prompt in prompts:
        if pixart or type(pipe).__name__.startswith(
            "StableDiffusionXL"
        ):  # one tokenizer's positions (SDXL: both CLIPs')
            names.append(_names(pipe.tokenizer, prompt, embeds.shape[1]))
        elif getattr(pipe, "tokenizer_3", None) is not None or type(pipe).__name__.startswith(
            "StableDiffusion3"
        ):
            clip = _names(
                pipe.tokenizer, prompt, pipe.tokenizer_max_length
            )  # CLIP positions, then T5's
            rest = embeds.shape[1] - len(clip)
            t5 = (
                _names(pipe.tokenizer_3, prompt, rest)
                if getattr(pipe, "tokenizer_3", None) is not None
                else [None] * rest
            )
            names.append(clip + t5)
        else:  # Flux: T5's tokens are the keys
            names.append(_names(pipe.tokenizer_2, prompt, embeds.shape[1]))
    return embeds.float(), pooled.float(), names
