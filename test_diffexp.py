"""Offline CPU tests for diffexp.py and rewards.py: tiny random models, fixed seeds, no downloads.

Run: python -m pytest -q test_diffexp.py
"""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffexp

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def pipe():
    """The tiny pipeline with its (zero-initialised) LoRA, fp32 on CPU, 50 DDIM steps."""
    p = diffexp.load_pipeline("tiny", lora_rank=4, device="cpu", dtype=torch.float32)
    p.scheduler.set_timesteps(50)
    return p


def explore_args(**kw):
    base = dict(alpha_min=1.0, alpha_max=2.0, w_low=1.0, w_high=7.5, t_thres=900, eta=1.0)
    return SimpleNamespace(**{**base, **kw})


def count_unet_batches(unet):
    """Records the batch size of every UNet forward; returns the list and the hook handle."""
    sizes = []
    handle = unet.register_forward_pre_hook(lambda module, a, kw: sizes.append((a[0] if a else kw["sample"]).shape[0]), with_kwargs=True)
    return sizes, handle


# ---------------------------------------------------------------------------------------------
# Eq. (7) and Eq. (8)


def test_cfg_scale_schedule_eq7():
    timesteps = torch.tensor([981, 921, 901, 900, 899, 1])
    w = diffexp.cfg_scale_schedule(timesteps, w_low=1.0, w_high=5.0, t_thres=900)
    assert w.tolist() == [1.0, 1.0, 1.0, 5.0, 5.0, 5.0]  # strictly greater than t_thres is "early"


def test_cfg_scale_schedule_on_sd_timesteps(pipe):
    w = diffexp.cfg_scale_schedule(pipe.scheduler.timesteps, 1.0, 7.5, 900)
    assert pipe.scheduler.timesteps[:6].tolist() == [981, 961, 941, 921, 901, 881]
    assert (w[:5] == 1.0).all() and (w[5:] == 7.5).all() and len(w) == 50


def test_weight_prompt_embeds_eq8():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 7, 5, generator=g)
    c_empty = torch.randn(1, 7, 5, generator=g)
    token_index = torch.tensor([1, 4, 2])
    alpha = torch.tensor([1.5, 2.0, 0.5])
    out = diffexp.weight_prompt_embeds(c, c_empty, token_index, alpha)
    for b in range(3):
        i = token_index[b]
        expected = c_empty[0, i] + alpha[b] * (c[b, i] - c_empty[0, i])
        assert torch.allclose(out[b, i], expected, atol=1e-6)
        assert not torch.equal(out[b, i], c[b, i])
        others = [j for j in range(7) if j != i]
        assert torch.equal(out[b, others], c[b, others])  # bit-identical elsewhere
    assert torch.equal(c, c.clone()) and not torch.equal(out, c)  # the input is not modified in place
    # alpha = 1 is the identity at the chosen position too (up to float rounding of e + (c - e))
    assert torch.allclose(diffexp.weight_prompt_embeds(c, c_empty, token_index, torch.ones(3)), c, atol=1e-6)
    # a per-sample empty embedding [B, L, D] works the same way
    out_b = diffexp.weight_prompt_embeds(c, c_empty.expand(3, -1, -1), token_index, alpha)
    assert torch.equal(out_b, out)


def test_draw_prompt_weights_picks_only_real_tokens(pipe):
    prompts = ["a dolphin riding a bike", "cat", "a very long prompt " * 30]
    _, ids = diffexp.encode_prompts(pipe, prompts)
    tok = pipe.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert ids[0, 0] == 49406 and ids[0, 6] == 49407 and ids[1].tolist()[:3] == [49406, 2368, 49407]
    g = torch.Generator().manual_seed(1)
    seen = [set() for _ in prompts]
    for _ in range(300):
        index, alpha = diffexp.draw_prompt_weights(ids, special, 1.0, 2.0, g)
        assert ((alpha >= 1.0) & (alpha <= 2.0)).all()
        for b in range(len(prompts)):
            seen[b].add(int(index[b]))
    assert seen[0] == {1, 2, 3, 4, 5}  # "a dolphin riding a bike": 5 tokens between BOS and EOS, all reached
    assert seen[1] == {1}
    assert min(seen[2]) == 1 and max(seen[2]) == 75  # truncated to 77 with BOS/EOS: positions 1..75
    # the same generator seed gives the same draw
    a = diffexp.draw_prompt_weights(ids, special, 1.0, 2.0, torch.Generator().manual_seed(3))
    b = diffexp.draw_prompt_weights(ids, special, 1.0, 2.0, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="no tokens to weight"):
        diffexp.draw_prompt_weights(diffexp.encode_prompts(pipe, [""])[1], special, 1.0, 2.0, g)


# ---------------------------------------------------------------------------------------------
# The DDIM step against diffusers


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in [981, 501, 21, 1]:  # t = 1 goes to the final alpha
        ours, log_prob = diffexp.ddim_step_with_logprob(sched, eps, t, x_t, eta, generator=torch.Generator().manual_seed(5))
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
        ref = sched.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
        if eta == 0:
            assert log_prob is None
            continue
        # log-prob: the Gaussian density around diffusers' mean (the step with zero noise), averaged over C*h*w
        mean = sched.step(eps, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)).prev_sample
        std = (ref - mean).abs().max() / z.abs().max()  # sigma_t recovered from the reference alone
        expected = torch.distributions.Normal(mean, std).log_prob(ours).mean(dim=(1, 2, 3))
        assert torch.allclose(log_prob, expected, atol=1e-4)
        # scoring a given x_{t-1} reproduces the same log-prob, with a per-sample timestep tensor too
        _, again = diffexp.ddim_step_with_logprob(sched, eps, torch.tensor([t, t]), x_t, eta, prev_latents=ours)
        assert torch.allclose(again, log_prob, atol=1e-6)


def test_ddim_step_per_sample_timesteps():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x_t, eps, x_prev = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    ts = torch.tensor([981, 401, 1])
    _, batched = diffexp.ddim_step_with_logprob(sched, eps, ts, x_t, 1.0, prev_latents=x_prev)
    for b in range(3):
        _, single = diffexp.ddim_step_with_logprob(sched, eps[b : b + 1], int(ts[b]), x_t[b : b + 1], 1.0, prev_latents=x_prev[b : b + 1])
        assert torch.allclose(batched[b], single[0], atol=1e-6)
    with pytest.raises(ValueError, match="no density"):
        diffexp.ddim_step_with_logprob(sched, eps, 981, x_t, 0.0, prev_latents=x_prev)


# ---------------------------------------------------------------------------------------------
# The sampler


def test_sampler_reproduces_stable_diffusion_pipeline(pipe):
    """Exploration off, eta 0, a constant scale: our loop is diffusers' StableDiffusionPipeline."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    prompts = ["a cat", "a dolphin riding a bike"]
    with torch.no_grad():
        args = explore_args(eta=0.0, w_high=7.5)
        ours = diffexp.sample(pipe, diffexp.encode_prompts(pipe, prompts)[0], diffexp.encode_prompts(pipe, [""])[0], torch.full((50,), 7.5), latents, 0.0)
        ref = pipe(prompts, negative_prompt=["", ""], latents=latents.clone(), num_inference_steps=50, guidance_scale=7.5, eta=0.0, output_type="pt").images
    pipe.scheduler.set_timesteps(50)
    assert ours["images"].shape == ref.shape == (2, 3, 32, 32)
    assert torch.allclose(ours["images"], ref, atol=1e-5)
    assert ours["log_probs"] is None and ours["latents"].shape == (2, 51, 4, 16, 16)
    assert torch.equal(ours["latents"][:, 0], latents)


def test_sampler_runs_one_branch_when_scale_is_one(pipe):
    sizes, handle = count_unet_batches(pipe.unet)
    try:
        with torch.no_grad():
            out = diffexp.sample_batch(pipe, ["a cat", "a dog", "a cow"], explore_args(), explore=True, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert sizes == [3] * 5 + [6] * 45  # w = 1 for t > 900 (5 steps): B samples; then the CFG pair: 2B
    assert out["scales"][:, :5].eq(1.0).all() and out["scales"][:, 5:].eq(7.5).all() and out["log_probs"].shape == (3, 50)
    # w = 0 also runs one branch (the unconditional one)
    sizes, handle = count_unet_batches(pipe.unet)
    try:
        with torch.no_grad():
            c, e = diffexp.encode_prompts(pipe, ["a cat"])[0], diffexp.encode_prompts(pipe, [""])[0]
            x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
            zero = diffexp.sample(pipe, c, e, torch.zeros(50), x, 0.0)
            uncond = diffexp.sample(pipe, e, e, torch.ones(50), x, 0.0)
    finally:
        handle.remove()
    assert sizes == [1] * 100
    assert torch.equal(zero["images"], uncond["images"])


def test_sampler_same_seed_same_images(pipe):
    def run(seed):
        with torch.no_grad():
            return diffexp.sample_batch(pipe, ["a cat", "a dog"], explore_args(), True, torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["log_probs"], b["log_probs"])
    assert torch.equal(a["cond_embeds"], b["cond_embeds"])
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].min() >= 0 and a["images"].max() <= 1


def test_sampler_exploration_changes_only_the_chosen_token(pipe):
    with torch.no_grad():
        out = diffexp.sample_batch(pipe, ["a dolphin riding a bike"] * 4, explore_args(), True, torch.Generator().manual_seed(0))
        plain, _ = diffexp.encode_prompts(pipe, ["a dolphin riding a bike"] * 4)
    changed = (out["cond_embeds"] != plain).any(dim=2)  # [B, L]
    assert (changed.sum(dim=1) <= 1).all()  # at most one position (alpha may land on 1.0 exactly: never in practice)
    assert changed[:, 1:6].any(dim=1).all() and not changed[:, 6:].any() and not changed[:, 0].any()


def test_sampler_is_not_no_grad(pipe):
    """The caller decides: under grad, the images depend on the LoRA weights."""
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    out = diffexp.sample_batch(pipe, ["a cat"], explore_args(eta=0.0), False, torch.Generator().manual_seed(0), backprop_steps=1)
    out["images"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    pipe.unet.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Models


def test_tiny_pipeline_saves_and_loads_back(tmp_path):
    diffexp.tiny_pipeline(seed=0).save_pretrained(tmp_path / "tiny")
    loaded = diffexp.load_pipeline(str(tmp_path / "tiny"), lora_rank=4, device="cpu", dtype=torch.float32)
    fresh = diffexp.load_pipeline("tiny", lora_rank=4, device="cpu", dtype=torch.float32)
    a, b = loaded.unet.state_dict(), fresh.unet.state_dict()
    frozen = [k for k in a if "lora" not in k]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    lora = [n for n, p in loaded.unet.named_parameters() if p.requires_grad]
    assert lora and all("lora" in n for n in lora)
    assert {n.split(".lora")[0].rsplit(".", 1)[-1] for n in lora} == {"to_q", "to_k", "to_v", "0"}
    assert diffexp.tiny_pipeline(seed=0).tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_load_pipeline_missing_model_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="--model tiny"):
        diffexp.load_pipeline("nobody/no-such-model", 4, "cpu", torch.float32)
