"""Prompts encoded as each family's pipeline encodes them (``models.prompts``), and captions per image."""

from __future__ import annotations

import numpy as np
import torch


def test_pixart_prompts_are_encoded_as_its_pipeline_does_and_padding_keys_dropped_exactly(
    pixart_text_folder,
):
    """PixArt's pipeline pads T5 tokens to a fixed length and masks the padding; dropping the masked keys gives the
    same prediction as the padded, masked input (reference: T5 called directly with the mask, and the network
    fed padded embeddings with encoder_attention_mask)."""
    import transformers

    from diffcircuit.models.loading import load_conditioned

    den = load_conditioned(str(pixart_text_folder), prompt="ab")
    t5 = transformers.AutoTokenizer.from_pretrained(pixart_text_folder / "tokenizer")
    ids = t5("ab", padding="max_length", max_length=10, return_tensors="pt")
    with torch.no_grad():
        padded = transformers.T5EncoderModel.from_pretrained(pixart_text_folder / "text_encoder")(
            ids.input_ids, attention_mask=ids.attention_mask
        )[0]
    real = int(ids.attention_mask.sum())
    assert den.conditioning.tokens == ("\u2581", "a", "b", "</s>") and real == 4
    torch.testing.assert_close(
        den.conditioning.kwargs["encoder_hidden_states"], padded[:, :real], atol=1e-5, rtol=0
    )
    x, t = (
        torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
        torch.tensor([10, 600]),
    )
    with torch.no_grad():
        mine = den.predict(x, t)
        theirs = den.network(
            x,
            timestep=t,
            encoder_hidden_states=padded.expand(2, -1, -1),
            encoder_attention_mask=ids.attention_mask.expand(2, -1),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_captions_of_different_lengths_are_masked_per_image_and_normalised_by_their_own_token_count(
    pixart_text_folder, tmp_path, captioned_folder
):
    """PixArt captions keep the pipeline's padding mask per image: each image's cross-attention entropy is measured
    over its own caption's tokens (checked against the network fed that caption alone) and normalised by their
    number."""
    from diffcircuit import instrument, model_images, observe
    from diffcircuit.models.diffusion import add_noise
    from diffcircuit.models.loading import load_conditioned, use_captions
    from diffcircuit.models.noise import batch_noise

    folder = captioned_folder(tmp_path / "pairs", {"0.png": "a", "1.png": "bcdef"})
    den = load_conditioned(str(pixart_text_folder))
    images = model_images(den, str(folder), n=2)
    assert use_captions(den, "b", images.captions) == "each image's own caption"
    heads, _ = observe(den, images.images, timesteps=[300], dataset="b")
    cross = heads[heads.layer.str.endswith("attn2")]
    assert dict(cross.groupby("image").n_keys.first()) == {0: 3, 1: 7}  # ▁ a </s>; ▁ b c d e f </s>
    np.testing.assert_allclose(
        cross.entropy_norm, cross.entropy_nats / np.log(cross.n_keys), rtol=1e-6
    )
    alone = load_conditioned(
        str(pixart_text_folder), prompt="bcdef"
    )  # image 1 with its caption as the only prompt
    x0 = torch.from_numpy(np.asarray(images.images[1:2]))
    eps = batch_noise(x0.shape[1:], seed=0, dataset="b", images=[1], timestep=300)
    with torch.no_grad(), instrument(alone, capture=True) as session:
        alone.predict(
            add_noise(x0, eps, torch.tensor([300]), alone.alphas_cumprod), torch.tensor([300])
        )
    for layer, values in session.pop("entropy_nats").items():
        got = (
            heads[(heads.image == 1) & (heads.layer == layer)]
            .sort_values("head")
            .entropy_nats.to_numpy()
        )
        np.testing.assert_allclose(got, values[0].double().numpy(), atol=1e-5)
