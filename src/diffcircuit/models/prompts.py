"""Prompts and embeddings files turned into a ``Conditioning``, as each family's pipeline does it.

- A text-conditioned UNet: a prompt encoded by the pipeline folder's own ``tokenizer/`` and ``text_encoder/``
  (through transformers: the ``text`` extra), or embeddings in a safetensors file (tensor ``prompt_embeds``,
  ``[tokens, dim]`` or ``[1, tokens, dim]``).
- PixArt: T5 with its padding mask, the masked keys after the longest prompt dropped (exactly: they get no attention).
- SD3, Flux and SDXL: their pipeline's own ``encode_prompt`` (``models.pipeline_text``), or a safetensors file
  with ``prompt_embeds`` and ``pooled_prompt_embeds`` (``negative_*`` too, for guidance).
- A data folder with captions gives each image its own prompt (``caption_conditioning``).

The default is the model's *unconditional* input, the branch classifier-free guidance contrasts with: the empty
prompt, and DiT's null class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffcircuit.errors import ConfigError, InputError, ModelError
from diffcircuit.models.conditioning import Conditioning
from diffcircuit.models.configfile import read_json
from diffcircuit.models.needs import added_conditions, class_labels, needed_inputs
from diffcircuit.models.pipeline_text import (
    encode_with_pipeline,
    is_pooled,
    pooled_dims,
    pooled_kwargs,
    zeros_for_empty_prompt,
)

__all__ = ["caption_conditioning", "make_conditioning"]


def _read_embeds(path: Path, name: str, dim: int, ndim: int) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file, ``[*shape, dim]`` with ``ndim`` axes after a batch axis of 1."""
    from safetensors.torch import load_file

    try:
        embeds = load_file(str(path))[name]
    except KeyError:
        raise InputError(f"{path} has no tensor named {name!r}") from None
    except Exception as exc:  # missing, unreadable or not safetensors
        raise InputError(
            f"cannot read prompt embeddings from {path}: {str(exc).splitlines()[0]}"
        ) from None
    embeds = embeds[None] if embeds.ndim == ndim else embeds
    if embeds.ndim != ndim + 1 or embeds.shape[0] != 1 or embeds.shape[-1] != dim:
        shape = "[tokens, dim]" if ndim == 2 else "[dim]"
        raise InputError(
            f"{name} in {path} must be {shape} with dim {dim} (a batch axis of 1 allowed), "
            f"not {list(embeds.shape)}"
        )
    return embeds.float()


def _prompt_embeds(path: Path, dim: int) -> torch.Tensor:
    return _read_embeds(path, "prompt_embeds", dim, 2)


def _has(path: Path, name: str) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return name in f.keys()


def _joint_embeds(
    network: torch.nn.Module,
    prompt_embeds: str | None,
    prompt: str | None,
    root: Path,
    allow_pickle: bool,
) -> Conditioning:
    """SD3 / Flux / SDXL: the text tokens' embeddings and their pooled summary, encoded by the pipeline's own
    ``encode_prompt`` (``models.pipeline_text``; unconditional: the empty prompt), or read from a safetensors
    file: ``prompt_embeds`` and ``pooled_prompt_embeds``, and for guidance's unconditional branch
    ``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``."""
    if prompt_embeds is None:
        text = prompt or ""
        (embeds, pooled, names) = encode_with_pipeline(
            root, [text, ""] if text else [""], allow_pickle=allow_pickle
        )
        if zeros_for_empty_prompt(
            root
        ):  # SDXL's unconditional input: zeros in place of the encoded empty prompt
            embeds[-1], pooled[-1], names[-1] = 0.0, 0.0, [None] * len(names[-1])
        kwargs = [
            pooled_kwargs(network, root, embeds[i : i + 1], pooled[i : i + 1])
            for i in range(len(embeds))
        ]
        empty = Conditioning(
            kwargs[-1],
            "the empty prompt (unconditional)"
            + (", as zeros" if zeros_for_empty_prompt(root) else ""),
            tuple(names[-1]),
        )
        if not text:
            return empty
        return Conditioning(kwargs[0], f"prompt {text!r}", tuple(names[0]), empty)
    path = Path(prompt_embeds)
    dims = pooled_dims(network)

    def read(prefix: str) -> dict:
        return pooled_kwargs(
            network,
            root,
            _read_embeds(path, f"{prefix}prompt_embeds", dims[0], 2),
            _read_embeds(path, f"{prefix}pooled_prompt_embeds", dims[1], 1),
        )

    given = read("")
    negative = None
    if _has(
        path, "negative_prompt_embeds"
    ):  # the pipeline's encode_prompt gives the unconditional branch too
        negative = Conditioning(
            read("negative_"), f"negative prompt embeddings from {prompt_embeds}"
        )
    return Conditioning(
        given,
        f"prompt embeddings from {prompt_embeds}",
        tuple(f"<{i}>" for i in range(given["encoder_hidden_states"].shape[1])),
        negative,
    )


def _encode_prompt(
    root: Path, prompt: str, allow_pickle: bool
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The pipeline's text encoder's last hidden state for ``prompt`` (``[1, tokens, dim]``) and its tokens."""
    embeds, tokens = _encode_prompts(root, [prompt], allow_pickle)
    return embeds, tokens[0]


def _encode_prompts(root: Path, prompts, allow_pickle: bool, batch_size: int = 32):
    """``[n, tokens, dim]`` for ``prompts`` (padded to the tokenizer's length) and each prompt's tokens."""
    if not (root / "tokenizer").is_dir() or not (root / "text_encoder" / "config.json").exists():
        raise ModelError(
            f"{root} has no tokenizer/ and text_encoder/ to encode a prompt with; "
            "give prompt_embeds (a safetensors file) instead",
            "prompt_embeds",
        )
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "encoding prompts needs transformers: pip install 'diffcircuit[text]'"
        ) from None

    arch = (
        read_json(root / "text_encoder" / "config.json").get("architectures") or ["CLIPTextModel"]
    )[0]
    cls = getattr(
        transformers, arch, None
    )  # CLIPTextModel (Stable Diffusion), T5EncoderModel (PixArt), ...
    if cls is None:
        raise ModelError(
            f"{root / 'text_encoder'} names {arch!r}, which transformers does not have"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
        encoder = cls.from_pretrained(
            root / "text_encoder", use_safetensors=not allow_pickle
        ).eval()
    except Exception as exc:
        raise ModelError(
            f"could not load the text encoder of {root}: {str(exc).strip().splitlines()[0]}"
        ) from None
    embeds, tokens = [], []
    for lo in range(0, len(prompts), batch_size):
        encoded = tokenizer(
            list(prompts[lo : lo + batch_size]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            embeds.append(encoder(encoded.input_ids)[0].float())
        for ids, mask in zip(encoded.input_ids, encoded.attention_mask):
            tokens.append(tuple(tokenizer.convert_ids_to_tokens(ids[: int(mask.sum())])))
    return torch.cat(embeds), tokens


def make_conditioning(
    network: torch.nn.Module,
    root: Path,
    *,
    prompt: str | None = None,
    prompt_embeds: str | None = None,
    class_label: int | None = None,
    allow_pickle: bool = False,
) -> Conditioning | None:
    """The conditioning ``network`` needs (None for an unconditional model), from the options given."""
    needs = needed_inputs(network)
    given = [
        field
        for field, value in (
            ("prompt", prompt),
            ("prompt_embeds", prompt_embeds),
            ("class_label", class_label),
        )
        if value is not None
    ]
    if not needs:
        if given:
            raise ConfigError(
                f"{type(network).__name__} is unconditional: {given[0]} does not apply", given[0]
            )
        return None
    if "class_labels" in needs:
        if prompt is not None or prompt_embeds is not None:
            raise ConfigError(
                f"{type(network).__name__} is class-conditional: give class_label, not a prompt",
                "class_label",
            )
        return class_labels(network, class_label)
    if class_label is not None:
        raise ConfigError(
            f"{type(network).__name__} is text-conditioned: give prompt or prompt_embeds",
            "prompt",
            "prompt_embeds",
        )
    if prompt is not None and prompt_embeds is not None:
        raise ConfigError("give prompt or prompt_embeds, not both", "prompt", "prompt_embeds")
    if is_pooled(network):
        return _joint_embeds(network, prompt_embeds, prompt, root, allow_pickle)
    dim = int(
        getattr(network.config, "caption_channels", None) or network.config.cross_attention_dim
    )
    extra = added_conditions(network)
    if prompt_embeds is not None:
        path = Path(prompt_embeds)
        embeds = _prompt_embeds(path, dim)
        negative = None
        if _has(path, "negative_prompt_embeds"):
            negative = Conditioning(
                {
                    "encoder_hidden_states": _read_embeds(path, "negative_prompt_embeds", dim, 2),
                    **extra,
                },
                f"negative prompt embeddings from {prompt_embeds}",
            )
        return Conditioning(
            {"encoder_hidden_states": embeds, **extra},
            f"prompt embeddings from {prompt_embeds}",
            tuple(f"<{i}>" for i in range(embeds.shape[1])),
            negative,
        )
    text = prompt or ""
    if _pixart_pipeline(root):  # T5 with a padding mask, as its pipeline encodes prompts
        embeds, _, names = _masked_prompts(root, [text], allow_pickle)
        if embeds.shape[-1] != dim:
            raise ModelError(
                f"the text encoder gives {embeds.shape[-1]}-dim embeddings; the model expects {dim}"
            )
        return Conditioning(
            {"encoder_hidden_states": embeds, **extra},
            f"prompt {text!r}" if text else "the empty prompt (unconditional)",
            tuple(names[0]),
        )
    embeds, tokens = _encode_prompt(root, text, allow_pickle)
    if embeds.shape[-1] != dim:
        raise ModelError(
            f"the text encoder gives {embeds.shape[-1]}-dim embeddings; the UNet expects {dim}"
        )
    return Conditioning(
        {"encoder_hidden_states": embeds, **extra},
        f"prompt {text!r}" if text else "the empty prompt (unconditional)",
        tokens,
    )


def _pixart_pipeline(root: Path) -> bool:
    index = root / "model_index.json"
    return index.exists() and str(read_json(index).get("_class_name", "")).startswith("PixArt")


def _masked_prompts(root: Path, prompts: list[str], allow_pickle: bool):
    """PixArt: ``(embeds, mask, names)`` cut to the longest prompt's tokens. Its pipeline pads every prompt to
    120 T5 tokens and masks the padding out of the attention; a masked key gets exactly no attention, so the
    keys after the longest prompt are dropped (the output is unchanged) and the rest stay masked per prompt."""
    embeds, mask, names = encode_with_pipeline(root, prompts, allow_pickle=allow_pickle)
    longest = int(mask.sum(1).max())
    return embeds[:, :longest], mask[:, :longest].float(), [n[:longest] for n in names]


def caption_conditioning(
    network: torch.nn.Module, root: Path, captions, *, allow_pickle: bool = False, spec: str = ""
) -> tuple[Conditioning, tuple[tuple[str, ...], ...]]:
    """Per-image conditioning of a text-conditioned ``network`` from one caption per image, encoded by the
    pipeline's text encoder, and each caption's tokens."""
    needs = needed_inputs(network)
    if "encoder_hidden_states" not in needs:
        raise ModelError(
            f"{spec or 'the data'} has captions, but {type(network).__name__} is not text-conditioned; "
            "use a folder without captions.csv / captions.jsonl"
        )
    if is_pooled(network):  # SD3 / Flux / SDXL: the pipeline's own encoders
        embeds, pooled, names = encode_with_pipeline(
            root, list(captions), allow_pickle=allow_pickle
        )
        return (
            Conditioning(pooled_kwargs(network, root, embeds, pooled), f"{len(captions)} captions"),
            tuple(tuple(n) for n in names),
        )
    masked = {}
    if _pixart_pipeline(root):
        embeds, mask, tokens = _masked_prompts(root, list(captions), allow_pickle)
        masked = {"encoder_attention_mask": mask} if (mask < 1).any() else {}
    else:
        embeds, tokens = _encode_prompts(root, list(captions), allow_pickle)
    dim = int(
        getattr(network.config, "caption_channels", None) or network.config.cross_attention_dim
    )
    if embeds.shape[-1] != dim:
        raise ModelError(
            f"the text encoder gives {embeds.shape[-1]}-dim embeddings; the model expects {dim}"
        )
    rows = len(
        captions
    )  # every input gets one row per image (PixArt's micro-conditions are shared)
    extra = {
        k: {
            n: v.expand(rows, *v.shape[1:]) if isinstance(v, torch.Tensor) else v
            for n, v in d.items()
        }
        for k, d in added_conditions(network).items()
    }
    return Conditioning(
        {"encoder_hidden_states": embeds, **masked, **extra}, f"{rows} captions"
    ), tuple(map(tuple, tokens))
