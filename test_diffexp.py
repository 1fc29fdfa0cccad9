"""Offline CPU tests for diffexp.py and rewards.py: tiny random models, fixed seeds, no downloads.

Run: python -m pytest -q test_diffexp.py
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffexp
import open_clip
import rewards
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
UNUSED_OUT = ["--out", os.path.join(HERE, "runs", "never-created-by-tests")]  # for tests that only need an Args


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
    assert torch.equal(a["cond"]["encoder_hidden_states"], b["cond"]["encoder_hidden_states"])
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].min() >= 0 and a["images"].max() <= 1


def test_sampler_exploration_changes_only_the_chosen_token(pipe):
    with torch.no_grad():
        out = diffexp.sample_batch(pipe, ["a dolphin riding a bike"] * 4, explore_args(), True, torch.Generator().manual_seed(0))
        plain, _ = diffexp.encode_prompts(pipe, ["a dolphin riding a bike"] * 4)
    changed = (out["cond"]["encoder_hidden_states"] != plain["encoder_hidden_states"]).any(dim=2)  # [B, L]
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


# ---------------------------------------------------------------------------------------------
# DDPO


def test_ddpo_loss_hand_computed():
    log_prob = torch.tensor([0.0, math.log(1.5), math.log(0.5), 0.0])
    old = torch.zeros(4)
    adv = torch.tensor([2.0, 1.0, -1.0, 10.0])
    # ratios 1, 1.5, 0.5, 1; clip range 0.2 -> clamped 1, 1.2, 0.8, 1; advantages clipped to 5:
    # sample 0: max(-2*1, -2*1) = -2; sample 1: max(-1.5, -1.2) = -1.2 (the clipped branch);
    # sample 2: max(0.5, 0.8) = 0.8 (clipped, negative advantage); sample 3: A = 5 -> -5.
    expected = (-2.0 - 1.2 + 0.8 - 5.0) / 4
    loss = diffexp.ddpo_loss(log_prob, old, adv, clip_range=0.2, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # the gradient flows only through unclipped terms: sample 0 (A=2, r=1) and sample 3 (A=5, r=1)
    lp = log_prob.clone().requires_grad_(True)
    diffexp.ddpo_loss(lp, old, adv, 0.2, 5.0).backward()
    assert torch.allclose(lp.grad, torch.tensor([-2.0, 0.0, 0.0, -5.0]) / 4, atol=1e-6)


def test_per_prompt_stat_tracker():
    tracker = diffexp.PerPromptStatTracker(buffer_size=4, min_count=3)
    # below min_count: batch statistics over all rewards of this update
    adv = tracker.update(["a", "a", "b"], np.array([1.0, 3.0, 5.0]))
    batch = np.array([1.0, 3.0, 5.0])
    assert np.allclose(adv, (batch - batch.mean()) / (batch.std() + 1e-6))
    # "a" now holds 3 rewards (>= min_count): its own statistics; "b" holds 2: batch statistics
    adv = tracker.update(["a", "b"], np.array([2.0, 7.0]))
    a_buf = np.array([1.0, 3.0, 2.0])
    assert adv[0] == pytest.approx((2.0 - a_buf.mean()) / (a_buf.std() + 1e-6))
    assert adv[1] == pytest.approx((7.0 - 4.5) / (np.std([2.0, 7.0]) + 1e-6))
    # the buffer keeps only the last buffer_size rewards, across updates
    tracker.update(["a", "a", "a"], np.array([10.0, 11.0, 12.0]))
    assert tracker.buffers["a"] == [2.0, 10.0, 11.0, 12.0]


def test_ddpo_recomputed_log_probs_are_on_policy(pipe):
    """Before any update the ratio is 1 at every step, with exploration on: the training pass reuses
    the stored per-step scale and weighted embedding. Reusing plain ones would break it."""
    args = explore_args(w_high=5.0, eta=1.0)
    pipe.scheduler.set_timesteps(10)
    try:
        with torch.no_grad():
            batch = diffexp.sample_batch(pipe, ["a dolphin riding a bike", "a cat playing chess"], args, True, torch.Generator().manual_seed(0))
            i = torch.arange(2)
            for s in range(10):
                log_prob = diffexp.ddpo_log_prob(pipe, batch, i, torch.full((2,), s), 1.0)
                ratio = (log_prob - batch["log_probs"][:, s]).exp()
                assert torch.allclose(ratio, torch.ones(2), atol=1e-4), (s, ratio)
            # as ddpo_epoch does it: per-sample shuffled steps, so one UNet call mixes w = 1 and CFG samples
            order = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(b)) for b in range(2)])  # [2, 10]
            for j in range(10):
                s = order[:, j]
                ratio = (diffexp.ddpo_log_prob(pipe, batch, i, s, 1.0) - batch["log_probs"][i, s]).exp()
                assert torch.allclose(ratio, torch.ones(2), atol=1e-4), (s, ratio)
            assert (batch["scales"][0, order[0]] != batch["scales"][1, order[1]]).any()  # the mixed case occurred
            # the same recomputation without the exploration's scale or embedding is off-policy
            plain = dict(batch, scales=torch.full_like(batch["scales"], 5.0), cond=diffexp.encode_prompts(pipe, ["a dolphin riding a bike", "a cat playing chess"])[0])
            off = [(diffexp.ddpo_log_prob(pipe, plain, i, torch.full((2,), s), 1.0) - batch["log_probs"][:, s]).exp() for s in range(10)]
            assert max((r - 1).abs().max().item() for r in off) > 1e-3
    finally:
        pipe.scheduler.set_timesteps(50)


def pattern_reward():
    """A simple image reward that the tiny model can move: correlation with a fixed random pattern."""
    pattern = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return lambda images, prompts: (images * pattern).mean(dim=(1, 2, 3)) * 10


def train_tiny(method, reward_fn, epochs, lr=1e-2, extra=(), model="tiny"):
    """A few epochs of `method` on a fresh tiny pipeline; returns the pipeline, the eval reward on fixed
    noise before and after, and the state dicts before and after training."""
    args = diffexp.parse_args(["--method", method, "--reward", "jpeg" if method == "ddpo" else "aesthetic", "--model", model, "--steps", "10",
                               "--batch-size", "8", "--train-batch-size", "8", "--micro-batch-size", "4", "--lr", str(lr), *UNUSED_OUT, *extra])
    torch.manual_seed(0)
    p = diffexp.load_pipeline(model, 4, "cpu", torch.float32)
    p.scheduler.set_timesteps(args.steps)
    prompts = ["cat", "dog", "frog", "zebra"]

    def evaluate():
        with torch.no_grad():
            return reward_fn(diffexp.sample_batch(p, prompts * 2, args, False, torch.Generator().manual_seed(99))["images"], prompts * 2).mean().item()

    lora = [q for q in p.unet.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before_state = {k: v.clone() for k, v in p.unet.state_dict().items()}
    before = evaluate()
    for epoch in range(epochs):
        g = diffexp.seeded_generator(0, epoch, 0)
        if method == "ddpo":
            row, _ = diffexp.ddpo_epoch(p, reward_fn, prompts, args, True, g, optimizer, scaler, diffexp.PerPromptStatTracker(32, 16), 1)
        else:
            row, _ = diffexp.alignprop_epoch(p, reward_fn, prompts, args, True, g, optimizer, scaler, 1)
        assert row["skipped_updates"] == 0
    return p, before, evaluate(), before_state, p.unet.state_dict()


def assert_only_lora_changed(before, after):
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora" in k for k in changed)
    assert all("lora_B" in k or "lora_A" in k for k in changed)
    frozen = [k for k in before if "lora" not in k]
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # every frozen tensor bit-identical


def test_ddpo_learns_and_changes_only_lora():
    reward = pattern_reward()
    _, before, after, s0, s1 = train_tiny("ddpo", reward, epochs=3)
    assert after > before + 2e-4, (before, after)
    assert_only_lora_changed(s0, s1)
    # trained on the negated reward, the pattern score falls: the direction comes from the reward
    _, before_neg, after_neg, _, _ = train_tiny("ddpo", lambda im, p: -reward(im, p), epochs=3)
    assert after_neg > before_neg + 2e-4, (before_neg, after_neg)


def test_ddpo_refuses_eta_zero(capsys):
    with pytest.raises(SystemExit):
        diffexp.parse_args(["--method", "ddpo", "--reward", "jpeg", "--model", "tiny", "--eta", "0"])
    assert "DDPO needs --eta > 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# AlignProp


def unet_calls_with_gradient(p, K, steps=8, checkpoint=True):
    """Which UNet calls (0-based, in sampling order) receive a gradient from the AlignProp loss."""
    p.scheduler.set_timesteps(steps)
    calls, got_grad, in_backward = [], set(), [False]

    def hook(module, inputs, output):
        if in_backward[0]:
            return  # checkpointing re-runs the UNet inside backward: not a new call
        index = len(calls)
        calls.append(index)
        if output.sample.requires_grad:
            output.sample.register_hook(lambda grad: got_grad.add(index))

    handle = p.unet.register_forward_hook(hook)
    try:
        out = diffexp.sample_batch(p, ["cat", "dog"], explore_args(eta=0.0), False, torch.Generator().manual_seed(0), backprop_steps=K, checkpoint=checkpoint)
        in_backward[0] = True
        (-pattern_reward()(out["images"], None).mean()).backward()
    finally:
        handle.remove()
        p.unet.zero_grad(set_to_none=True)
        p.scheduler.set_timesteps(50)
    return len(calls), got_grad


def test_alignprop_truncation_is_real(pipe):
    n, got = unet_calls_with_gradient(pipe, K=1)
    assert n == 8 and got == {7}  # only the last UNet call
    n, got = unet_calls_with_gradient(pipe, K=3)
    assert got == {5, 6, 7}
    n, got = unet_calls_with_gradient(pipe, K=8)
    assert got == set(range(8))  # all of them
    assert unet_calls_with_gradient(pipe, K=3, checkpoint=False)[1] == {5, 6, 7}


def saved_bytes(p, K, checkpoint, monkeypatch, steps=40):
    """Bytes of the distinct tensors saved for backward during one AlignProp forward (sampling, decode,
    reward), and the index of the denoising step during which the first of them was saved."""
    p.scheduler.set_timesteps(steps)
    done, storages, first = [0], {}, [None]
    step = diffexp.ddim_step_with_logprob

    def counting_step(*args, **kwargs):
        result = step(*args, **kwargs)
        done[0] += 1
        return result

    def pack(t):
        # count each storage once: the prompt embeddings saved at every step are one tensor in memory
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        if first[0] is None:
            first[0] = done[0]
        return t

    monkeypatch.setattr(diffexp, "ddim_step_with_logprob", counting_step)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = diffexp.sample_batch(p, ["cat", "dog"], explore_args(eta=0.0), True, torch.Generator().manual_seed(0), backprop_steps=K, checkpoint=checkpoint)
            pattern_reward()(out["images"], None).mean()
    finally:
        monkeypatch.undo()
        p.scheduler.set_timesteps(50)
    return sum(storages.values()), first[0]


def test_alignprop_memory_is_flat_with_checkpointing(pipe, monkeypatch):
    latent_bytes = 2 * 4 * 16 * 16 * 4  # one step's x_t: what a checkpoint must keep to recompute
    ckpt_10, first_10 = saved_bytes(pipe, 10, True, monkeypatch)
    ckpt_40, first_40 = saved_bytes(pipe, 40, True, monkeypatch)
    full_10, first_full = saved_bytes(pipe, 10, False, monkeypatch)
    full_40, _ = saved_bytes(pipe, 40, False, monkeypatch)
    # steps before the last K save nothing at all
    assert first_10 == 30 and first_full == 30 and first_40 == 0
    # with checkpointing, an extra backprop step costs only its input latents (plus a few scalars)
    assert (ckpt_40 - ckpt_10) / 30 <= 1.1 * latent_bytes
    # without it, every step keeps the UNet's activations: about four-fold from K=10 to K=40
    assert 3.0 < full_40 / full_10 < 4.5
    assert (full_40 - full_10) / 30 > 100 * latent_bytes
    assert ckpt_40 < full_10 / 50


def test_alignprop_forward_equals_the_sampler(pipe):
    """Exploration off: the gradient machinery (truncation, checkpointing) does not change the numbers."""
    pipe.scheduler.set_timesteps(10)
    args = explore_args(eta=0.0)
    try:
        with torch.no_grad():
            plain = diffexp.sample_batch(pipe, ["cat", "dog"], args, False, torch.Generator().manual_seed(3))
        graded = diffexp.sample_batch(pipe, ["cat", "dog"], args, False, torch.Generator().manual_seed(3), backprop_steps=4, checkpoint=True)
    finally:
        pipe.scheduler.set_timesteps(50)
    assert graded["images"].requires_grad
    assert torch.equal(graded["images"].detach(), plain["images"])


def test_alignprop_learns_and_changes_only_lora():
    reward = pattern_reward()
    _, before, after, s0, s1 = train_tiny("alignprop", reward, epochs=3)
    assert after > before + 5e-4, (before, after)
    assert_only_lora_changed(s0, s1)




# ---------------------------------------------------------------------------------------------
# SDXL (tiny, random, offline)


@pytest.fixture(scope="module")
def sdxl():
    p = diffexp.load_pipeline("tiny-sdxl", lora_rank=4, device="cpu", dtype=torch.float32)
    p.scheduler.set_timesteps(20)
    return p


def test_sdxl_sampler_reproduces_stable_diffusion_xl_pipeline(sdxl):
    prompts = ["a cat", "a dolphin riding a bike"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, _ = diffexp.encode_prompts(sdxl, prompts)
        assert {k: tuple(v.shape) for k, v in cond.items()} == {"encoder_hidden_states": (2, 77, 64), "text_embeds": (2, 32), "time_ids": (2, 6)}
        args = explore_args(eta=0.0, w_high=7.5)
        ours = diffexp.sample_batch(sdxl, prompts, args, False, torch.Generator().manual_seed(0))["images"]
        # no negative prompt: with force_zeros_for_empty_prompt (SDXL-base's setting) the unconditional
        # branch is zeros in the pipeline, and in sample_batch
        ref = sdxl(prompts, latents=latents.clone(), num_inference_steps=20, guidance_scale=7.5, eta=0.0, output_type="pt").images
        assert sdxl.config.force_zeros_for_empty_prompt
        with_empty = diffexp.sample(sdxl, cond, diffexp.encode_prompts(sdxl, [""])[0], torch.full((20,), 7.5), latents, 0.0)["images"]
        ref_empty = sdxl(prompts, negative_prompt=["", ""], latents=latents.clone(), num_inference_steps=20, guidance_scale=7.5, eta=0.0, output_type="pt").images
    sdxl.scheduler.set_timesteps(20)
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline"
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(with_empty, ref_empty, atol=1e-5)


def test_sdxl_eq8_changes_only_the_chosen_token_of_both_encoders(sdxl):
    prompts = ["a dolphin riding a bike"] * 6
    with torch.no_grad():
        out = diffexp.sample_batch(sdxl, prompts, explore_args(), True, torch.Generator().manual_seed(0))
        plain, _ = diffexp.encode_prompts(sdxl, prompts)
    weighted = out["cond"]["encoder_hidden_states"]
    changed = (weighted != plain["encoder_hidden_states"]).any(dim=2)  # [B, L]
    assert (changed.sum(dim=1) == 1).all() and changed[:, 1:6].any(dim=1).all()
    for b, i in enumerate(changed.float().argmax(dim=1)):
        first, second = weighted[b, i, :32], weighted[b, i, 32:]  # the two encoders' halves at the chosen token
        assert (first != plain["encoder_hidden_states"][b, i, :32]).any() and (second != plain["encoder_hidden_states"][b, i, 32:]).any()
    assert torch.equal(out["cond"]["text_embeds"], plain["text_embeds"])  # the pooled embedding is not weighted


def test_sdxl_ddpo_recomputation_is_on_policy(sdxl):
    """DDPO falls out of the same code on SDXL: stored pooled embeddings and size ids are reused too."""
    sdxl.scheduler.set_timesteps(10)
    try:
        with torch.no_grad():
            batch = diffexp.sample_batch(sdxl, ["a dolphin riding a bike", "a cat"], explore_args(w_high=5.0), True, torch.Generator().manual_seed(0))
            i = torch.arange(2)
            order = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(b)) for b in range(2)])  # [2, 10]
            for j in range(10):
                ratio = (diffexp.ddpo_log_prob(sdxl, batch, i, order[:, j], 1.0) - batch["log_probs"][i, order[:, j]]).exp()
                assert torch.allclose(ratio, torch.ones(2), atol=1e-4)
    finally:
        sdxl.scheduler.set_timesteps(20)


def test_sdxl_alignprop_learns_and_changes_only_lora(tmp_path):
    reward = pattern_reward()
    _, before, after, s0, s1 = train_tiny("alignprop", reward, epochs=3, lr=0.1, model="tiny-sdxl")  # tiny SDXL reacts more weakly
    assert after > before + 1e-3, (before, after)
    assert_only_lora_changed(s0, s1)
    # the tiny SDXL pipeline saves and loads back as SDXL, and the CLI runs it end to end
    diffexp.tiny_pipeline(sdxl=True).save_pretrained(tmp_path / "sdxl")
    assert type(diffexp.load_pipeline(str(tmp_path / "sdxl"), 4, "cpu", torch.float32)).__name__ == "StableDiffusionXLPipeline"
    code, out, err = run_cli("--method", "alignprop", "--reward", "aesthetic", "--model", "tiny-sdxl", *TINY_RUN[2:], "--epochs", "1",
                             "--eval-every", "0", "--out", str(tmp_path / "run"))
    assert code == 0, err
    fresh = diffexp.tiny_pipeline(sdxl=True)
    fresh.load_lora_weights(str(tmp_path / "run" / "checkpoint"))  # the diffusers SDXL LoRA loader reads it



@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_bf16_frozen_weights_with_fp32_lora(model):
    """The GPU precision set-up, run on the CPU: frozen weights bf16 (SDXL's VAE fp32), LoRA fp32; both
    trainers run, and DDPO's recomputed log-probs stay within its 1e-4 clip range of the sampled ones."""
    p = diffexp.load_pipeline(model, 4, "cpu", torch.bfloat16)
    assert p.text_encoder.dtype == torch.bfloat16 and {q.dtype for n, q in p.unet.named_parameters() if "lora" not in n} == {torch.bfloat16}
    assert {q.dtype for q in p.unet.parameters() if q.requires_grad} == {torch.float32}
    assert p.vae.dtype == (torch.float32 if model == "tiny-sdxl" else torch.bfloat16)
    p.scheduler.set_timesteps(4)
    lora = [q for q in p.unet.parameters() if q.requires_grad]
    optimizer, scaler = torch.optim.AdamW(lora, lr=1e-2), torch.amp.GradScaler("cpu", enabled=False)
    common = ["--model", model, "--steps", "4", "--batch-size", "2", "--micro-batch-size", "2", "--train-batch-size", "2", *UNUSED_OUT]
    reward = pattern_reward()
    row, _ = diffexp.alignprop_epoch(p, reward, ["cat", "dog"], diffexp.parse_args(["--method", "alignprop", *common]), True, torch.Generator().manual_seed(0), optimizer, scaler, 1)
    assert row["skipped_updates"] == 0 and math.isfinite(row["loss"])
    row, _ = diffexp.ddpo_epoch(p, reward, ["cat", "dog"], diffexp.parse_args(["--method", "ddpo", "--reward", "jpeg", *common]), True, torch.Generator().manual_seed(0), optimizer, scaler,
                                diffexp.PerPromptStatTracker(32, 16), 1)
    assert row["skipped_updates"] == 0 and row["clipfrac"] == 0.0
    assert all(q.dtype == torch.float32 and torch.isfinite(q).all() for q in lora)


# ---------------------------------------------------------------------------------------------
# The command line and the training run (tiny model, a few seconds per epoch)

TINY_RUN = ["--model", "tiny", "--steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--train-batch-size", "4"]


def run_cli(*argv, env=None, timeout=600):
    """diffexp.py in a subprocess, as a user runs it; returns (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "diffexp.py"), *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def lora_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "checkpoint", "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("argv, message", [
    (["--method", "ppo"], "invalid choice: 'ppo'"),
    (["--reward", "beauty"], "unknown reward 'beauty'"),
    (["--reward", "aesthetic+beauty"], "cannot be ensembled"),
    (["--method", "alignprop", "--reward", "jpeg"], "jpeg is not differentiable"),
    (["--t-thres", "1000"], "--t-thres 1000 is outside [0, 1000)"),
    (["--t-thres", "-1"], "outside [0, 1000)"),
    (["--alpha-min", "2", "--alpha-max", "1"], "--alpha-min 2.0 is above --alpha-max 1.0"),
    (["--prompts", "plants"], "unknown prompt set 'plants'; prompts.txt has: animals, unseen_animals"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "not a multiple"),
    (["--backprop-steps", "60"], "--backprop-steps must be between 1 and --steps"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--device", "foo"], "--device 'foo' is not a torch device"),
    (["--resume", "/nonexistent/run"], "no config.json there"),
])
def test_bad_arguments_fail_with_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        diffexp.parse_args(["--model", "tiny", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]  # one line, no usage block


def test_resume_and_generate_take_the_runs_own_settings(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    original = diffexp.parse_args(["--method", "ddpo", "--reward", "jpeg", *TINY_RUN, "--epochs", "50", "--eval-every", "3", "--save-every", "5",
                                   "--eval-reward", "aesthetic", "--lr", "0.02", *UNUSED_OUT])
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(original)))
    for mode in ("--resume", "--generate"):
        args = diffexp.parse_args([mode, str(run)])
        assert (args.method, args.epochs, args.eval_every, args.save_every, args.eval_reward, args.lr, args.steps) == ("ddpo", 50, 3, 5, "aesthetic", 0.02, 4)
    assert diffexp.parse_args(["--resume", str(run), "--epochs", "60"]).epochs == 60
    with pytest.raises(SystemExit):
        diffexp.parse_args(["--resume", str(run), "--method", "alignprop", "--reward", "aesthetic"])
    assert "setting method was 'ddpo' there and is 'alignprop' now" in capsys.readouterr().err


def test_overwrite_deletes_only_run_directories_and_wandb_must_be_installed(tmp_path, capsys, monkeypatch):
    (tmp_path / "precious.txt").write_text("not a run")
    with pytest.raises(SystemExit):
        diffexp.parse_args(["--model", "tiny", "--out", str(tmp_path), "--overwrite"])
    assert "is not a run directory" in capsys.readouterr().err and (tmp_path / "precious.txt").exists()
    monkeypatch.setattr(diffexp.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        diffexp.parse_args(["--model", "tiny", "--wandb", *UNUSED_OUT])
    assert "pip install wandb" in capsys.readouterr().err


def test_empty_prompt_set_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "prompts.txt").write_text("[animals]\ncat\n[unseen_animals]\n# nothing here\n")
    monkeypatch.setattr(diffexp, "PROMPTS_FILE", str(tmp_path / "prompts.txt"))
    with pytest.raises(SystemExit):
        diffexp.parse_args(["--model", "tiny"])
    assert "prompt set 'unseen_animals' in prompts.txt is empty" in capsys.readouterr().err


def test_prompts_txt_has_the_papers_sets():
    sets = diffexp.load_prompt_sets()
    assert len(sets["animals"]) == 45 and len(sets["unseen_animals"]) == 6 and len(sets["drawbench"]) == 58
    assert len(sets["animal_activities"]) == 135 and "a monkey washing the dishes" in sets["animal_activities"]
    assert len(sets["unseen_animal_activities"]) == 135 and "a cat playing soccer" in sets["unseen_animal_activities"]
    assert not set(sets["animals"]) & set(sets["unseen_animals"])
    with open(os.path.join(os.path.dirname(HERE), "shared", "data", "drawbench_challenging.txt"), encoding="utf-8") as f:
        drawbench = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    assert sets["drawbench"] == drawbench


def test_missing_model_exits_with_one_line_naming_tiny(tmp_path):
    code, out, err = run_cli("--model", "nobody/no-such-model", "--out", str(tmp_path / "run"))
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: cannot load --model 'nobody/no-such-model'") and "--model tiny" in err


def test_cli_run_writes_logs_grids_and_a_loadable_lora(tmp_path):
    run = str(tmp_path / "run")
    code, out, err = run_cli("--method", "alignprop", "--reward", "aesthetic", *TINY_RUN, "--epochs", "2", "--eval-every", "2", "--out", run)
    assert code == 0, err
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["reward_queries"] for r in rows] == [0, 4, 8]
    assert {"reward_mean", "reward_std", "loss", "eval_seen_aesthetic", "eval_unseen_aesthetic"} <= set(rows[-1])
    assert rows[1]["explore"] and rows[2]["explore"]  # ceil(3/4 of 2 epochs) = 2
    files = set(os.listdir(run))
    assert {"config.json", "log.jsonl", "checkpoint", "train_0001.png", "eval_seen_0002.png", "eval_unseen_0000.png"} <= files
    assert "device cpu" in out and "float32" in out
    # the checkpoint is a diffusers LoRA: load_lora_weights on a fresh pipeline gives the trained UNet
    fresh = diffexp.tiny_pipeline()
    fresh.load_lora_weights(os.path.join(run, "checkpoint"))
    trained = diffexp.load_pipeline("tiny", 4, "cpu", torch.float32)
    diffexp.load_lora(trained.unet, os.path.join(run, "checkpoint"))
    x, c = torch.randn(1, 4, 16, 16), diffexp.encode_prompts(fresh, ["cat"])[0]["encoder_hidden_states"]
    with torch.no_grad():
        assert torch.allclose(fresh.unet(x, 500, encoder_hidden_states=c).sample, trained.unet(x, 500, encoder_hidden_states=c).sample, atol=1e-6)
        assert not torch.allclose(diffexp.tiny_pipeline().unet(x, 500, encoder_hidden_states=c).sample, trained.unet(x, 500, encoder_hidden_states=c).sample)
    # an existing run directory is refused without --resume or --overwrite
    code, _, err = run_cli("--method", "alignprop", *TINY_RUN, "--epochs", "1", "--out", run)
    assert code != 0 and "exists; pass --resume" in err and "Traceback" not in err
    # --generate writes images with and without the LoRA
    code, _, err = run_cli("--method", "alignprop", *TINY_RUN, "--generate", run)
    assert code == 0, err
    assert {"generate_with_lora.png", "generate_without_lora.png"} <= set(os.listdir(run))


@pytest.mark.parametrize("method, reward", [("ddpo", "jpeg"), ("alignprop", "aesthetic")])
def test_resume_continues_exactly(tmp_path, method, reward, capsys):
    """4 epochs in one run, and 2 + 2 with a resume, end with the same LoRA weights."""
    common = ["--method", method, "--reward", reward, *TINY_RUN, "--eval-every", "0", "--save-every", "1"]
    one, split = str(tmp_path / "one"), str(tmp_path / "split")
    diffexp.main([*common, "--epochs", "4", "--out", one])
    diffexp.main([*common, "--epochs", "2", "--out", split])
    assert [r["epoch"] for r in read_log(split)] == [1, 2]
    diffexp.main([*common, "--epochs", "4", "--resume", split])
    a, b = lora_weights(one), lora_weights(split)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [r["epoch"] for r in read_log(split)] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in read_log(split)] == [r["reward_mean"] for r in read_log(one)]
    # a resume with a setting that changes the run is refused, naming the setting
    with pytest.raises(SystemExit):
        diffexp.main([*common, "--epochs", "5", "--lr", "0.5", "--resume", split])
    assert "setting lr was 0.01 there and is 0.5 now" in capsys.readouterr().err
    # `--resume DIR` alone takes the run's own settings; its log loses the epochs after the checkpoint
    with open(os.path.join(split, "log.jsonl"), "a") as f:  # as if a crash came before epoch 5's checkpoint, mid-line
        f.write(json.dumps(dict(epoch=5, reward_queries=20)) + '\n{"epoch": 6, "rew')
    diffexp.main(["--resume", split, "--epochs", "5"])
    assert [r["epoch"] for r in read_log(split)] == [1, 2, 3, 4, 5]
    assert json.load(open(os.path.join(split, "config.json")))["method"] == method


def test_nan_reward_skips_the_update(pipe):
    """A NaN reward skips the update (never NaN weights) and is counted in the log row."""
    args = diffexp.parse_args(["--method", "ddpo", "--reward", "jpeg", *TINY_RUN, *UNUSED_OUT])
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in lora]
    optimizer = torch.optim.AdamW(lora, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    nan_reward = lambda images, prompts: torch.where(torch.arange(len(images)) == 0, torch.nan, images.mean(dim=(1, 2, 3)))
    pipe.scheduler.set_timesteps(args.steps)
    try:
        row, _ = diffexp.ddpo_epoch(pipe, nan_reward, ["cat", "dog"], args, True, torch.Generator().manual_seed(0), optimizer, scaler, diffexp.PerPromptStatTracker(32, 16), 1)
        assert row["skipped_updates"] == 1 and math.isnan(row["reward_mean"])
        args = diffexp.parse_args(["--method", "alignprop", "--reward", "aesthetic", *TINY_RUN, *UNUSED_OUT])
        row, _ = diffexp.alignprop_epoch(pipe, nan_reward, ["cat", "dog"], args, True, torch.Generator().manual_seed(0), optimizer, scaler, 1)
        assert row["skipped_updates"] == 1 and math.isnan(row["loss"])
    finally:
        pipe.scheduler.set_timesteps(50)
    assert all(torch.equal(a, b) for a, b in zip(before, lora))


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    real_save, calls = torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(SystemExit, match="No space left on device.*last good checkpoint is intact"):
        diffexp.main(["--method", "alignprop", "--reward", "aesthetic", *TINY_RUN, "--epochs", "3", "--eval-every", "0", "--save-every", "1", "--out", run])
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["epoch"] == 1
    assert sorted(os.listdir(run)) == ["checkpoint", "config.json", "log.jsonl", "train_0001.png", "train_0002.png"]


def test_failed_setup_leaves_no_run_directory(tmp_path):
    run = str(tmp_path / "run")
    code, _, err = run_cli("--model", "nobody/no-such-model", "--out", run)
    assert code != 0 and not os.path.exists(run)


def test_resume_after_a_crash_between_the_checkpoint_renames(tmp_path):
    run = str(tmp_path / "run")
    common = ["--method", "alignprop", "--reward", "aesthetic", *TINY_RUN, "--eval-every", "0"]
    diffexp.main([*common, "--epochs", "1", "--out", run])
    os.rename(os.path.join(run, "checkpoint"), os.path.join(run, "checkpoint.old"))  # the window between the renames
    diffexp.main([*common, "--epochs", "2", "--resume", run])
    assert [r["epoch"] for r in read_log(run)] == [1, 2]
    # a crash after the second rename leaves a stale .old beside the new checkpoint: the next save copes
    shutil.copytree(os.path.join(run, "checkpoint"), os.path.join(run, "checkpoint.old"))
    diffexp.main([*common, "--epochs", "3", "--resume", run])
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == ["checkpoint"]
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["epoch"] == 3


def test_unwritable_run_directory_is_one_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    code, _, err = run_cli("--method", "alignprop", *TINY_RUN, "--out", str(tmp_path / "a_file" / "run"))
    assert code != 0 and "Traceback" not in err and "cannot write to run directory" in err


def test_sigint_finishes_the_epoch_saves_and_exits_zero(tmp_path):
    run = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "diffexp.py"), "--method", "alignprop", "--reward", "aesthetic", *TINY_RUN,
                             "--epochs", "100", "--eval-every", "0", "--save-every", "50", "--out", run], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until the first epoch is logged, then interrupt the second
        if line.startswith('{"epoch": 1'):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "stopped by signal" in out
    epochs = [r["epoch"] for r in read_log(run)]
    assert 2 <= epochs[-1] < 100 and epochs == list(range(1, epochs[-1] + 1))
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["epoch"] == epochs[-1]


@pytest.mark.parametrize("method, reward", [("ddpo", "jpeg"), ("alignprop", "aesthetic")])
def test_two_processes_end_with_identical_lora(tmp_path, method, reward):
    """torchrun with 2 CPU processes (gloo): different samples per rank, averaged gradients, the same LoRA."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(f"""
import os, sys, torch
sys.path.insert(0, {HERE!r})
import diffexp
train = diffexp.train
def train_and_dump(pipe, *args, **kwargs):
    start = {{k: v.clone() for k, v in diffexp.lora_state_dict(pipe.unet).items()}}
    train(pipe, *args, **kwargs)
    torch.save(dict(start=start, end=diffexp.lora_state_dict(pipe.unet)), os.path.join({str(tmp_path)!r}, "rank%s.pt" % os.environ["RANK"]))
diffexp.train = train_and_dump
diffexp.main(sys.argv[1:])
""")
    run = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
                           "--method", method, "--reward", reward, *TINY_RUN, "--epochs", "2", "--eval-every", "2", "--out", run],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(r0["end"][k], r1["end"][k]) for k in r0["end"])  # bit-identical on both ranks
    assert any(not torch.equal(r0["start"][k], r0["end"][k]) for k in r0["end"])  # and trained
    assert all(torch.equal(r0["start"][k], r1["start"][k]) for k in r0["start"])
    rows = read_log(run)  # rank 0 alone writes; rewards are gathered from both ranks
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["reward_queries"] == 8
    assert os.path.exists(os.path.join(run, "checkpoint", "state.pt"))


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ValueError, match="pip install matplotlib"):
        diffexp.plot_runs([str(tmp_path)], str(tmp_path / "plot.png"))


def test_plot_draws_reward_against_queries_per_run(tmp_path, monkeypatch):
    """The figure's data, checked through a recording stand-in for matplotlib (an optional import)."""
    lines = []
    axes = SimpleNamespace(plot=lambda x, y, label: lines.append((x, y, label)), set_xlabel=lambda *a: None, set_ylabel=lambda *a: None, legend=lambda: None)
    figure = SimpleNamespace(tight_layout=lambda: None, savefig=lambda path, dpi: open(path, "w").close())
    pyplot = SimpleNamespace(subplots=lambda figsize: (figure, axes))
    monkeypatch.setitem(sys.modules, "matplotlib", SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    for name, explore in (("diffexp", False), ("baseline", True)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(dict(method="ddpo", reward="aesthetic", no_explore=explore)))
        rows = [dict(epoch=0, reward_queries=0, eval_seen_aesthetic=1.0), dict(epoch=1, reward_queries=64, reward_mean=5.0), dict(epoch=2, reward_queries=128, reward_mean=6.0)]
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    diffexp.plot_runs([str(tmp_path / "diffexp"), str(tmp_path / "baseline")], str(tmp_path / "plot.png"))
    assert lines == [([64, 128], [5.0, 6.0], "ddpo + DiffExp (diffexp)"), ([64, 128], [5.0, 6.0], "ddpo (baseline)")]
    assert os.path.exists(tmp_path / "plot.png")
    with pytest.raises(ValueError, match="not a run directory"):
        diffexp.plot_runs([str(tmp_path / "nothing")], str(tmp_path / "plot.png"))


# ---------------------------------------------------------------------------------------------
# rewards.py

REWARD_PROMPTS = ["a cat", "a dog riding a bicycle", "an astronaut", "a bowl of fruit"]


def smooth_image(h, w, freq):
    """A synthetic RGB image in [0, 1] made of waves (not noise, so resizing it is well defined)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([0.5 + 0.4 * torch.sin(freq * xx + 2 * yy), 0.5 + 0.4 * torch.cos(0.7 * freq * yy - 3 * xx),
                        0.2 + 0.6 * xx * yy])


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hps", "hps+aesthetic+pickscore"])
def test_tiny_reward_gradient_reaches_images_only(name):
    fn = rewards.load_reward(name, "cpu", torch.float32, tiny=True)
    assert fn.differentiable
    images = torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    scores = fn(images, REWARD_PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert fn.networks
    for net in fn.networks:
        assert not net.training
        for p in net.parameters():
            assert not p.requires_grad and p.grad is None


def tiny_model_like_images(n, seed):
    """Like a tiny diffusion model's samples: one fixed smooth 32x32 base, varied by random patterns of
    amplitude ~0.13 with nearly the same mean brightness."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")
    pattern = torch.nn.functional.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear")
    return (0.55 + 0.15 * base / base.std() + 0.13 * pattern / pattern.std()).clamp(0, 1)


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hps"])
def test_tiny_rewards_respond_to_tiny_model_like_images(name):
    # Smoke runs learn from the tiny rewards: they must not be flat on such images, nor their gradient vanish.
    fn = rewards.load_reward(name, "cpu", torch.float32, tiny=True)
    scale = rewards.TYPICAL_SCALE[name]
    images = tiny_model_like_images(8, seed=6).requires_grad_(True)
    scores = fn(images, ["a photo of a cat"] * 8)
    assert scores.std() >= 0.05 * scale
    (scores.sum() / scale).backward()
    assert images.grad.flatten(1).norm(dim=1).min() > 0.1


def test_tiny_rewards_are_deterministic_and_keep_global_rng():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    state = torch.get_rng_state()
    a = rewards.load_reward("pickscore", "cpu", torch.float32, tiny=True)(images, REWARD_PROMPTS)
    b = rewards.load_reward("pickscore", "cpu", torch.float32, tiny=True)(images, REWARD_PROMPTS)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Different prompts give different scores: the text tower is really used.
    c = rewards.load_reward("pickscore", "cpu", torch.float32, tiny=True)(images, REWARD_PROMPTS[::-1])
    assert not torch.allclose(a, c)


def test_ensemble_is_mean_of_scaled_members():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    members = ["hps", "aesthetic", "pickscore"]
    ensemble = rewards.load_reward("+".join(members), "cpu", torch.float32, tiny=True)(images, REWARD_PROMPTS)
    by_hand = sum(rewards.load_reward(m, "cpu", torch.float32, tiny=True)(images, REWARD_PROMPTS)
                  / rewards.TYPICAL_SCALE[m] for m in members) / len(members)
    torch.testing.assert_close(ensemble, by_hand)


def test_aesthetic_head_loads_real_key_layout(tmp_path):
    g = torch.Generator().manual_seed(4)
    dims = [768, 1024, 128, 64, 16, 1]
    state = {}
    for key, (d_in, d_out) in zip([0, 2, 4, 6, 7], zip(dims[:-1], dims[1:])):
        state[f"layers.{key}.weight"] = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
        state[f"layers.{key}.bias"] = torch.randn(d_out, generator=g)
    path = tmp_path / "head.pth"
    torch.save(state, path)
    head = rewards.aesthetic_head(str(path)).eval()
    x = torch.randn(5, 768, generator=g)
    expected = x
    for key in [0, 2, 4, 6, 7]:  # linear layers only, no activations
        expected = expected @ state[f"layers.{key}.weight"].T + state[f"layers.{key}.bias"]
    torch.testing.assert_close(head(x), expected, rtol=1e-4, atol=1e-4)


def test_aesthetic_head_file_size_is_checked(tmp_path, monkeypatch):
    path = tmp_path / "head.pth"
    torch.save({"layers.0.weight": torch.zeros(1, 1)}, path)
    monkeypatch.setenv("DIFFEXP_AESTHETIC_HEAD", str(path))
    with pytest.raises(RuntimeError, match="has 3714759"):
        rewards.load_reward("aesthetic", "cpu", torch.float32)


# freq 120 (waves of ~27 px at 512 px) is fine enough that resizing without antialias fails the test.
@pytest.mark.parametrize("h, w, freq", [(256, 320, 6), (320, 256, 6), (512, 512, 120), (512, 640, 120)])
def test_clip_preprocess_matches_open_clip_pil(h, w, freq):
    u8 = (smooth_image(h, w, freq) * 255).round().to(torch.uint8)
    reference = open_clip.image_transform(224, is_train=False)(Image.fromarray(u8.permute(1, 2, 0).numpy()))
    ours = rewards.clip_preprocess(u8[None].float() / 255, 224)[0]
    assert ours.shape == reference.shape == (3, 224, 224)
    # PIL resizes in uint8 and rounds its output, torch resizes in float: they differ by about one
    # uint8 step, 1 / 255 / std ~ 0.015 after normalisation. Allow two steps at most, a fraction on average.
    diff = (ours - reference).abs()
    assert diff.max() < 0.03 and diff.mean() < 0.006


def test_jpeg_ranks_flat_image_more_compressible_than_noise():
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))
    images = torch.stack([torch.full((3, 64, 64), 0.5), noise])
    size = rewards.load_reward("jpeg", "cpu", torch.float32)
    compressibility = rewards.load_reward("jpeg_compressibility", "cpu", torch.float32)
    assert not size.differentiable and not compressibility.differentiable
    s, c = size(images, REWARD_PROMPTS[:2]), compressibility(images, REWARD_PROMPTS[:2])
    assert s[0] < s[1] and c[0] > c[1]
    torch.testing.assert_close(c, -s)


def test_bad_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.load_reward("nope", "cpu", torch.float32, tiny=True)
    with pytest.raises(ValueError, match=r"member\(s\) \['nope'\] cannot be ensembled"):
        rewards.load_reward("hps+nope", "cpu", torch.float32, tiny=True)
    with pytest.raises(ValueError, match=r"member\(s\) \['jpeg'\] cannot be ensembled"):
        rewards.check_reward("aesthetic+jpeg")
    with pytest.raises(ValueError, match="jpeg is not differentiable; AlignProp needs a differentiable reward"):
        rewards.check_reward("jpeg", need_grad=True)
    with pytest.raises(ValueError, match="no tiny version"):
        rewards.load_reward("imagereward", "cpu", torch.float32, tiny=True)
    rewards.check_reward("hps+aesthetic+pickscore", need_grad=True)  # accepted


def test_wrong_inputs_fail_clearly():
    fn = rewards.load_reward("hps", "cpu", torch.float32, tiny=True)
    with pytest.raises(ValueError, match="one prompt per image"):
        fn(torch.rand(2, 3, 32, 32), ["only one"])
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\]"):
        fn(torch.rand(3, 32, 32), REWARD_PROMPTS[:3])
