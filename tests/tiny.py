"""Tiny random components for pipeline tests, built from configs (diffusers' ``get_dummy_components`` recipe).

Tokenizers are built in memory (no downloads); every model is seeded and in eval mode.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer


def clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in string.ascii_lowercase] + [(c, -4.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000,
                          hidden_act="gelu", projection_dim=32)


def t5_encoder(d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()  # constructed models start in train mode (dropout on)


def flow_vae(latent_channels: int) -> AutoencoderKL:
    """A one-block VAE with FLUX/SD3's shift and scaling factors (downsamples by 1)."""
    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def pixart_transformer(seed: int = 0, **overrides) -> torch.nn.Module:
    """A one-layer PixArt DiT with learned sigma (8 output channels for 4 latent channels)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    config = dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                  caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True,
                  activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                  norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtTransformer2DModel(**{**config, **overrides}).eval()


def pixart_pipe(scheduler, sigma: bool = False):
    """A tiny PixArt-alpha (or Sigma) pipeline with the given scheduler; 8x8 latents, 2x VAE -> 16 px."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
                        norm_num_groups=8, layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2).eval()
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=vae, transformer=pixart_transformer(0),
               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
