"""Denoiser wrappers: each family's x0 formula, round trips, and the helpers around them."""

import pytest
import torch

import distillpp
from distillpp.denoisers import batch_cond, lcm_guidance_embedding, repeat_cond
from distillpp.schedules import DiscreteVPSchedule, FLOW_SIGMA_MAX, flow_time_to_sigma, sigma_to_flow_time

SCHED = DiscreteVPSchedule.from_betas()
G = torch.Generator().manual_seed(0)


def _vp_point(t=(999, 500, 20)):
    sigma = SCHED.sigmas[list(t)].float()
    x0 = torch.randn(len(t), 4, 8, 8, generator=G)
    eps = torch.randn(len(t), 4, 8, 8, generator=G)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    return x0, eps, x, sigma, torch.tensor(t, dtype=torch.float32)


def test_eps_prediction_round_trip_and_timestep():
    x0, eps, x, sigma, t = _vp_point()
    seen = {}

    def net(z, tt):
        seen["z"], seen["t"] = z, tt
        return eps

    out = distillpp.DiscreteVPDenoiser(net, SCHED)(x, sigma)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(seen["t"], t)  # sigma maps back to its own timestep
    abar = SCHED.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["z"], abar.sqrt() * x0 + (1 - abar).sqrt() * eps, rtol=1e-5, atol=1e-5)


def test_v_prediction_and_sample_prediction():
    x0, eps, x, sigma, t = _vp_point()
    abar = SCHED.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0  # diffusers' v target
    out = distillpp.DiscreteVPDenoiser(lambda z, tt: v, SCHED, prediction_type="v_prediction")(x, sigma)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    out = distillpp.DiscreteVPDenoiser(lambda z, tt: x0, SCHED, prediction_type="sample")(x, sigma)
    torch.testing.assert_close(out, x0)


def test_lcm_boundary_condition_matches_diffusers_scalings():
    from diffusers import LCMScheduler

    sch = LCMScheduler()
    x0, eps, x, sigma, t = _vp_point((999, 259, 3))
    out = distillpp.LCMDenoiser(lambda z, tt: eps, SCHED)(x, sigma)
    z = x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
    for i, ti in enumerate(t.long().tolist()):
        c_skip, c_out = sch.get_scalings_for_boundary_condition_discrete(ti)
        torch.testing.assert_close(out[i], c_out * x0[i] + c_skip * z[i], rtol=1e-4, atol=1e-4)
    # At the timesteps LCM and DMD2 guide, the boundary condition is the identity to float32 precision.
    assert sch.get_scalings_for_boundary_condition_discrete(249)[0] < 1e-7


def test_lcm_guidance_embedding_equals_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([7.0, 3.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    torch.testing.assert_close(lcm_guidance_embedding(w, 32), ref)
    assert lcm_guidance_embedding(7.0, 32, batch=3).shape == (3, 32)


def test_flow_denoiser_recovers_x0_and_passes_flow_time():
    x0 = torch.randn(3, 4, 8, 8, generator=G)
    noise = torch.randn(3, 4, 8, 8, generator=G)
    s = torch.tensor([1.0, 0.6, 0.1])
    sigma = flow_time_to_sigma(s).float()
    x_fm = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    x = x_fm * (1 + sigma.view(-1, 1, 1, 1))
    seen = {}

    def net(inp, t):
        seen["inp"], seen["t"] = inp, t
        return noise - x0

    out = distillpp.FlowDenoiser(net, timestep_scale=1000.0)(x, sigma)
    torch.testing.assert_close(seen["t"], s * 1000)
    torch.testing.assert_close(seen["inp"], x_fm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    assert float(sigma[0]) == FLOW_SIGMA_MAX and float(sigma_to_flow_time(sigma[:1])) == 1.0


def test_cond_helpers_batch_and_repeat_nested_structures():
    a = {"emb": torch.zeros(2, 3), "added": {"text_embeds": torch.zeros(2, 5), "scale": torch.tensor(1.0)}}
    b = {"emb": torch.ones(2, 3), "added": {"text_embeds": torch.ones(2, 5), "scale": torch.tensor(1.0)}}
    both = batch_cond(a, b)
    assert both["emb"].shape == (4, 3) and both["added"]["text_embeds"][2:].eq(1).all()
    assert both["added"]["scale"].ndim == 0
    rep = repeat_cond(a, 3)
    assert rep["emb"].shape == (6, 3) and rep["added"]["text_embeds"].shape == (6, 5)
    with pytest.raises(ValueError, match="same keys"):
        batch_cond(a, {"emb": torch.ones(2, 3)})


def test_net_input_dtype_is_respected():
    x0, eps, x, sigma, t = _vp_point()
    seen = {}

    def net(z, tt):
        seen["dtype"] = z.dtype
        return eps.to(z.dtype)

    out = distillpp.DiscreteVPDenoiser(net, SCHED, dtype=torch.bfloat16)(x, sigma)
    assert seen["dtype"] == torch.bfloat16 and out.dtype == torch.float32


def test_learned_sigma_keeps_the_prediction_channels_and_checks_the_count():
    x0, eps, x, sigma, t = _vp_point()
    variance = torch.randn_like(eps)
    plain = distillpp.DiscreteVPDenoiser(lambda z, tt: eps, SCHED)(x, sigma)
    split = distillpp.DiscreteVPDenoiser(lambda z, tt: torch.cat([eps, variance], 1), SCHED, learned_sigma=True)
    assert torch.equal(split(x, sigma), plain)
    lcm = distillpp.LCMDenoiser(lambda z, tt: torch.cat([eps, variance], 1), SCHED, learned_sigma=True)
    torch.testing.assert_close(lcm(x, sigma), distillpp.LCMDenoiser(lambda z, tt: eps, SCHED)(x, sigma))
    with pytest.raises(ValueError, match="learned_sigma"):
        distillpp.DiscreteVPDenoiser(lambda z, tt: eps, SCHED, learned_sigma=True)(x, sigma)


@torch.no_grad()
def test_transformer_fn_passes_the_timestep_by_keyword_to_a_tiny_pixart():
    """PixArt takes ``timestep`` third (after ``encoder_hidden_states``) and returns 2C channels."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    tf = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=16, in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    x0, eps, x, sigma, t = _vp_point()
    cond = {"encoder_hidden_states": torch.randn(3, 5, 16, generator=G),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    out = distillpp.DiscreteVPDenoiser(distillpp.transformer_fn(tf), SCHED, learned_sigma=True)(x, sigma, **cond)
    z = x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
    pred = tf(z, timestep=t, return_dict=False, **cond)[0]
    assert pred.shape[1] == 8
    torch.testing.assert_close(out, x - sigma.view(-1, 1, 1, 1) * pred[:, :4])


def test_cfg_denoiser_clip_clamps_after_the_combination():
    inner = lambda x, sigma, y: x * y[:, None]  # noqa: E731  (cond y=1 -> x, uncond y=0 -> 0)
    x = torch.tensor([[0.5, 0.9, -0.8]])
    sigma = torch.ones(1)
    plain = distillpp.CFGDenoiser(inner, 2.0)
    clipped = distillpp.CFGDenoiser(inner, 2.0, clip=1.0)
    args = dict(cond={"y": torch.ones(1)}, uncond={"y": torch.zeros(1)})
    assert torch.equal(plain(x, sigma, **args), torch.tensor([[1.0, 1.8, -1.6]]))
    assert torch.equal(clipped(x, sigma, **args), torch.tensor([[1.0, 1.0, -1.0]]))
    x0, x0_u = clipped(x, sigma, return_uncond=True, **args)
    assert torch.equal(x0_u, torch.zeros_like(x))
    with pytest.raises(ValueError, match="clip"):
        distillpp.CFGDenoiser(inner, 2.0, clip=0)
