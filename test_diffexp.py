"""Offline CPU tests for diffexp.py and rewards.py: tiny random models, fixed seeds, no downloads.

Run: python -m pytest -q test_diffexp.py
"""

import ast
import builtins
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffexp
import open_clip
import replicate
import rewards
import runs
import shapes
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
UNUSED_OUT = ["--out", os.path.join(HERE, "runs", "never-created-by-tests")]  # for tests that only need an Args


@pytest.fixture(scope="module")
def pipe():
    """The tiny pipeline with its (zero-initialised) LoRA, fp32 on CPU, 50 DDIM steps."""
    p = diffexp.load_pipeline("tiny", lora_rank=4, device="cpu", dtype=torch.float32)
    p.scheduler.set_timesteps(50)
    return p


def sampling(**kw):
    """sample_batch's settings: DiffExp's defaults, CFG 7.5, eta 1."""
    return dict(dict(w_high=7.5, eta=1.0, w_low=1.0, t_thres=900, alpha_min=1.0, alpha_max=2.0), **kw)


def count_unet_batches(unet):
    """Records the batch size of every UNet forward; returns the list and the hook handle."""
    sizes = []
    handle = unet.register_forward_pre_hook(lambda module, a, kw: sizes.append((a[0] if a else kw["sample"]).shape[0]),
                                            with_kwargs=True)
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
    c_before = c.clone()
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
    assert torch.equal(c, c_before) and not torch.equal(out, c)  # the input is not modified in place
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

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in [981, 501, 21, 1]:  # t = 1 goes to the final alpha
        ours, log_prob = diffexp.ddim_step_with_logprob(sched, eps, t, x_t, eta,
                                                        generator=torch.Generator().manual_seed(5))
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

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x_t, eps, x_prev = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    ts = torch.tensor([981, 401, 1])
    _, batched = diffexp.ddim_step_with_logprob(sched, eps, ts, x_t, 1.0, prev_latents=x_prev)
    for b in range(3):
        _, single = diffexp.ddim_step_with_logprob(sched, eps[b : b + 1], int(ts[b]), x_t[b : b + 1], 1.0,
                                                   prev_latents=x_prev[b : b + 1])
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
        ours = diffexp.sample(pipe, diffexp.encode_prompts(pipe, prompts)[0], diffexp.encode_prompts(pipe, [""])[0],
                              torch.full((50,), 7.5), latents, 0.0)
        ref = pipe(prompts, negative_prompt=["", ""], latents=latents.clone(), num_inference_steps=50,
                   guidance_scale=7.5, eta=0.0, output_type="pt").images
    pipe.scheduler.set_timesteps(50)
    assert ours["images"].shape == ref.shape == (2, 3, 32, 32)
    assert torch.allclose(ours["images"], ref, atol=1e-5)
    assert ours["log_probs"] is None and ours["latents"].shape == (2, 51, 4, 16, 16)
    assert torch.equal(ours["latents"][:, 0], latents)


def test_sampler_runs_one_branch_when_scale_is_one(pipe):
    sizes, handle = count_unet_batches(pipe.unet)
    try:
        with torch.no_grad():
            out = diffexp.sample_batch(pipe, ["a cat", "a dog", "a cow"], torch.Generator().manual_seed(0),
                                       explore=True, **sampling())
    finally:
        handle.remove()
    assert sizes == [3] * 5 + [6] * 45  # w = 1 for t > 900 (5 steps): B samples; then the CFG pair: 2B
    assert (out["scales"][:, :5].eq(1.0).all() and out["scales"][:, 5:].eq(7.5).all()
            and out["log_probs"].shape == (3, 50))
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
            return diffexp.sample_batch(pipe, ["a cat", "a dog"], torch.Generator().manual_seed(seed), explore=True,
                                        **sampling())

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["log_probs"], b["log_probs"])
    assert torch.equal(a["cond"]["encoder_hidden_states"], b["cond"]["encoder_hidden_states"])
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].min() >= 0 and a["images"].max() <= 1


def test_sampler_exploration_changes_only_the_chosen_token(pipe):
    with torch.no_grad():
        out = diffexp.sample_batch(pipe, ["a dolphin riding a bike"] * 4, torch.Generator().manual_seed(0),
                                   explore=True, **sampling())
        plain, _ = diffexp.encode_prompts(pipe, ["a dolphin riding a bike"] * 4)
    changed = (out["cond"]["encoder_hidden_states"] != plain["encoder_hidden_states"]).any(dim=2)  # [B, L]
    assert (changed.sum(dim=1) <= 1).all()  # at most one position (alpha may land on 1.0 exactly: never in practice)
    assert changed[:, 1:6].any(dim=1).all() and not changed[:, 6:].any() and not changed[:, 0].any()


def test_sampler_is_not_no_grad(pipe):
    """The caller decides: under grad, the images depend on the LoRA weights."""
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    out = diffexp.sample_batch(pipe, ["a cat"], torch.Generator().manual_seed(0), explore=False, **sampling(eta=0.0),
                               backprop_steps=1)
    out["images"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    pipe.unet.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Models


METHOD_IMPORTS = "import math\nimport torch\nfrom diffusers import DDIMScheduler\n"  # all the method section needs


def method_section():
    """diffexp.py's method section as a copy-paster takes it, read with ast: the top-level statements between the
    "1. The method" and "2. Training" headers (nothing of diffexp.py is imported)."""
    text = open(os.path.join(HERE, "diffexp.py"), encoding="utf-8").read()
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines, 1) if line.startswith("# ==== 1. The method"))
    end = next(k for k, line in enumerate(lines, 1) if line.startswith("# ==== 2. Training"))
    return ast.Module(body=[node for node in ast.parse(text).body if start < node.lineno < end], type_ignores=[])


def free_names(module):
    """The names a module reads that it neither defines (functions, classes, arguments, assignments, imports) nor
    takes from Python's builtins."""
    read, defined = set(), set(dir(builtins))
    for node in ast.walk(module):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.alias):
            defined.add((node.asname or node.name).split(".")[0])
    return read - defined


def test_the_method_section_lifts_alone_into_a_plain_diffusers_pipeline():
    """The paper's method, lifted by its source alone with the three imports it names, runs DiffExp sampling,
    DDPO's loss (the recomputed log-probs of its own explored samples give a ratio of 1) and AlignProp's loss (its
    gradient reaches the UNet) on a plain StableDiffusionPipeline loaded from shapes_model/. It fails as soon as the
    section borrows a name from the rest of the file: statically, and when the borrowed name runs."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    section = method_section()
    assert free_names(ast.Module(body=ast.parse(METHOD_IMPORTS).body + section.body, type_ignores=[])) == set()
    lifted = {}
    exec(compile(METHOD_IMPORTS, "imports", "exec"), lifted)
    exec(compile(section, "diffexp.py, the method section", "exec"), lifted)
    assert {"cfg_scale_schedule", "draw_prompt_weights", "weight_prompt_embeds", "cfg_noise_pred", "check_scheduler",
            "ddim_step_with_logprob", "sample", "encode_prompts", "sample_batch", "PerPromptStatTracker",
            "ddpo_log_prob", "ddpo_loss", "alignprop_loss"} <= set(lifted)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(HERE, "shapes_model"), safety_checker=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.scheduler.set_timesteps(10)
    prompts = ["a red circle", "a blue square on a white background"]
    explore = dict(explore=True, w_low=0.0, t_thres=600, alpha_min=1.0, alpha_max=2.0)
    with torch.no_grad():
        out = lifted["sample_batch"](pipe, prompts, torch.Generator().manual_seed(0), w_high=5.0, eta=1.0, **explore)
        batch = out | dict(timesteps=pipe.scheduler.timesteps)
        i, s = torch.tensor([0, 1]), torch.tensor([2, 7])  # one explored (t 801 > 600, w_low) and one plain step
        log_prob = lifted["ddpo_log_prob"](pipe, batch, i, s, 1.0)
    old_log_prob = out["log_probs"][i, s]
    assert torch.allclose(log_prob, old_log_prob, atol=1e-4)
    advantages = lifted["PerPromptStatTracker"](32, 16).update(prompts, out["log_probs"].new_tensor([0.2, 0.8]))
    assert lifted["ddpo_loss"](log_prob, old_log_prob, advantages.float(), 1e-4, 5.0).abs() < 1e-3  # ratio 1: -mean A
    reward_fn = lambda images, prompts: images.mean(dim=(1, 2, 3))
    loss, reward, images = lifted["alignprop_loss"](pipe, reward_fn, prompts, torch.Generator().manual_seed(1), 2,
                                                    0.01, w_high=7.5, eta=0.0, **explore)
    loss.backward()
    assert images.shape == (2, 3, 32, 32) and any(p.grad is not None and p.grad.abs().sum() > 0
                                                  for p in pipe.unet.parameters())
    # SD 1.5 ships PNDM: the lifted sampler refuses it in one line that says how to convert
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(10)
    with pytest.raises(TypeError, match=r"scheduler is PNDMScheduler; convert it first: pipe.scheduler = "
                                        r"DDIMScheduler.from_config\(pipe.scheduler.config\)"):
        with torch.no_grad():
            lifted["sample_batch"](pipe, prompts, torch.Generator().manual_seed(0), w_high=5.0, eta=1.0)
    # a DDIM scheduler that predicts v, or clips x_0, is refused before the first UNet call, and so is its step
    shipped = pipe.scheduler.config
    for change, shown in ((dict(prediction_type="v_prediction"), "predicts 'v_prediction', clip_sample=False"),
                          (dict(clip_sample=True), "predicts 'epsilon', clip_sample=True")):
        pipe.scheduler = DDIMScheduler.from_config(shipped, **change)
        pipe.scheduler.set_timesteps(10)
        calls, handle = count_unet_batches(pipe.unet)
        with pytest.raises(ValueError, match=r"^this DDIM step needs a scheduler that predicts epsilon and neither "
                                             rf"clips nor thresholds x_0; this one {shown}, thresholding=False\.$"):
            with torch.no_grad():
                lifted["sample_batch"](pipe, prompts, torch.Generator().manual_seed(0), w_high=5.0, eta=1.0)
        handle.remove()
        assert calls == []
        x = torch.randn(1, 4, 4, 4)
        with pytest.raises(ValueError, match=shown):
            lifted["ddim_step_with_logprob"](pipe.scheduler, x, pipe.scheduler.timesteps[0], x, eta=1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' Euler scheduler, numpy 2's copy keyword
def test_the_ddim_step_refuses_other_schedulers(pipe):
    """ddim_step_with_logprob, lifted alone with another scheduler, says so instead of failing deep inside (Euler has
    no final_alpha_cumprod) or stepping wrongly (PNDM's timesteps repeat one)."""
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler.set_timesteps(10)
    x = torch.randn(1, 4, 16, 16)
    with pytest.raises(TypeError, match=r"the scheduler is EulerDiscreteScheduler; convert it first"):
        diffexp.ddim_step_with_logprob(euler, torch.randn_like(x), euler.timesteps[0], x, eta=1.0)


def test_tiny_pipeline_saves_and_loads_back(tmp_path):
    shapes.tiny_pipeline(seed=0).save_pretrained(tmp_path / "tiny")
    loaded = diffexp.load_pipeline(str(tmp_path / "tiny"), lora_rank=4, device="cpu", dtype=torch.float32)
    fresh = diffexp.load_pipeline("tiny", lora_rank=4, device="cpu", dtype=torch.float32)
    a, b = loaded.unet.state_dict(), fresh.unet.state_dict()
    frozen = [k for k in a if "lora" not in k]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    lora = [n for n, p in loaded.unet.named_parameters() if p.requires_grad]
    assert lora and all("lora" in n for n in lora)
    assert {n.split(".lora")[0].rsplit(".", 1)[-1] for n in lora} == {"to_q", "to_k", "to_v", "0"}
    assert shapes.tiny_pipeline(seed=0).tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    # A model that predicts v (SD 2.x at 768 px) is refused in one line naming it; a saved scheduler whose config
    # has no clip_sample (PNDM, as SD checkpoints without the key ship it) never clipped, and its DDIM does not either.
    config_file = tmp_path / "tiny" / "scheduler" / "scheduler_config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(saved | dict(prediction_type="v_prediction")))
    with pytest.raises(ValueError, match=rf"^--model '{tmp_path}/tiny': this DDIM step needs a scheduler that "
                                         r"predicts epsilon and neither clips .* predicts 'v_prediction'"):
        diffexp.load_pipeline(str(tmp_path / "tiny"), lora_rank=4, device="cpu", dtype=torch.float32)
    pndm = {k: v for k, v in saved.items() if k not in ("clip_sample", "clip_sample_range")}
    config_file.write_text(json.dumps(pndm | dict(_class_name="PNDMScheduler", skip_prk_steps=True)))
    converted = diffexp.load_pipeline(str(tmp_path / "tiny"), lora_rank=4, device="cpu", dtype=torch.float32)
    assert type(converted.scheduler).__name__ == "DDIMScheduler" and not converted.scheduler.config.clip_sample


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
    args = sampling(w_high=5.0, eta=1.0)
    pipe.scheduler.set_timesteps(10)
    try:
        with torch.no_grad():
            batch = diffexp.sample_batch(pipe, ["a dolphin riding a bike", "a cat playing chess"],
                                         torch.Generator().manual_seed(0), explore=True, **args)
            i = torch.arange(2)
            for s in range(10):
                log_prob = diffexp.ddpo_log_prob(pipe, batch, i, torch.full((2,), s), 1.0)
                ratio = (log_prob - batch["log_probs"][:, s]).exp()
                assert torch.allclose(ratio, torch.ones(2), atol=1e-4), (s, ratio)
            # as ddpo_epoch does it: per-sample shuffled steps, so one UNet call mixes w = 1 and CFG samples
            order = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(b))
                                 for b in range(2)])  # [2, 10]
            for j in range(10):
                s = order[:, j]
                ratio = (diffexp.ddpo_log_prob(pipe, batch, i, s, 1.0) - batch["log_probs"][i, s]).exp()
                assert torch.allclose(ratio, torch.ones(2), atol=1e-4), (s, ratio)
            assert (batch["scales"][0, order[0]] != batch["scales"][1, order[1]]).any()  # the mixed case occurred
            # the same recomputation without the exploration's scale or embedding is off-policy
            plain = dict(batch, scales=torch.full_like(batch["scales"], 5.0),
                         cond=diffexp.encode_prompts(pipe, ["a dolphin riding a bike", "a cat playing chess"])[0])
            off = [(diffexp.ddpo_log_prob(pipe, plain, i, torch.full((2,), s), 1.0) - batch["log_probs"][:, s]).exp()
                   for s in range(10)]
            assert max((r - 1).abs().max().item() for r in off) > 1e-3
    finally:
        pipe.scheduler.set_timesteps(50)


def pattern_reward():
    """A simple image reward that the tiny model can move: correlation with a fixed random pattern."""
    pattern = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return lambda images, prompts: (images * pattern).mean(dim=(1, 2, 3)) * 10


def fine_tune_shapes(seed, explore, epochs, lr, steps=10, batch_size=32):
    """`epochs` of AlignProp with the bold reward on the shipped shapes model, on [bold], 2 updates an epoch;
    returns the mean reward on the held-out prompts of [unseen_bold] from held-out noise (never a training draw) before
    and after, and the UNet's state dicts before and after."""
    args = runs.parse_args(["--method", "alignprop", "--model", "shapes", "--steps", str(steps),
                            "--batch-size", str(batch_size), "--micro-batch-size", str(batch_size // 2),
                            "--train-batch-size", str(batch_size // 2), "--lr", str(lr), "--seed", str(seed),
                            *UNUSED_OUT])
    assert (args.reward, args.prompts, args.eval_prompts) == ("bold", "bold", "unseen_bold")  # the shapes defaults
    torch.manual_seed(seed)
    p = diffexp.load_pipeline("shapes", 4, "cpu", torch.float32)
    p.scheduler.set_timesteps(args.steps)
    reward, prompts, held_out = (rewards.load_reward("bold", "cpu", torch.float32), runs.load_prompts(args.prompts),
                                 runs.load_prompts(args.eval_prompts))

    def evaluate():
        with torch.no_grad():
            images = diffexp.sample_batch(p, held_out * 2, torch.Generator().manual_seed(10_000 + seed),
                                          **diffexp.sampling_settings(args))["images"]
            return reward(images, held_out * 2).mean().item()

    lora = [q for q in p.unet.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before_state, before = {k: v.clone() for k, v in p.unet.state_dict().items()}, evaluate()
    for epoch in range(1, epochs + 1):
        g = diffexp.seeded_generator(seed, epoch, 0)
        row, _ = diffexp.alignprop_epoch(p, reward, prompts, args, explore, g, optimizer, scaler, 1)
        assert row["skipped_updates"] == 0
    return before, evaluate(), before_state, p.unet.state_dict()


def assert_only_lora_changed(before, after):
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora" in k for k in changed)
    assert all("lora_B" in k or "lora_A" in k for k in changed)
    frozen = [k for k in before if "lora" not in k]
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # every frozen tensor bit-identical


def test_ddpo_refuses_eta_zero(capsys):
    with pytest.raises(SystemExit):
        runs.parse_args(["--method", "ddpo", "--reward", "jpeg", "--model", "tiny", "--eta", "0"])
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
        out = diffexp.sample_batch(p, ["cat", "dog"], torch.Generator().manual_seed(0), explore=False,
                                   **sampling(eta=0.0), backprop_steps=K, checkpoint=checkpoint)
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
            out = diffexp.sample_batch(p, ["cat", "dog"], torch.Generator().manual_seed(0), explore=True,
                                       **sampling(eta=0.0), backprop_steps=K, checkpoint=checkpoint)
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
    args = sampling(eta=0.0)
    try:
        with torch.no_grad():
            plain = diffexp.sample_batch(pipe, ["cat", "dog"], torch.Generator().manual_seed(3), explore=False, **args)
        graded = diffexp.sample_batch(pipe, ["cat", "dog"], torch.Generator().manual_seed(3), explore=False, **args,
                                      backprop_steps=4, checkpoint=True)
    finally:
        pipe.scheduler.set_timesteps(50)
    assert graded["images"].requires_grad
    assert torch.equal(graded["images"].detach(), plain["images"])


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
        assert {k: tuple(v.shape) for k, v in cond.items()} == {"encoder_hidden_states": (2, 77, 64),
                                                                "text_embeds": (2, 32), "time_ids": (2, 6)}
        args = sampling(eta=0.0, w_high=7.5)
        ours = diffexp.sample_batch(sdxl, prompts, torch.Generator().manual_seed(0), explore=False, **args)["images"]
        # no negative prompt: with force_zeros_for_empty_prompt (SDXL-base's setting) the unconditional
        # branch is zeros in the pipeline, and in sample_batch
        ref = sdxl(prompts, latents=latents.clone(), num_inference_steps=20, guidance_scale=7.5, eta=0.0,
                   output_type="pt").images
        assert sdxl.config.force_zeros_for_empty_prompt
        with_empty = diffexp.sample(sdxl, cond, diffexp.encode_prompts(sdxl, [""])[0], torch.full((20,), 7.5),
                                    latents, 0.0)["images"]
        ref_empty = sdxl(prompts, negative_prompt=["", ""], latents=latents.clone(), num_inference_steps=20,
                         guidance_scale=7.5, eta=0.0, output_type="pt").images
    sdxl.scheduler.set_timesteps(20)
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline"
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(with_empty, ref_empty, atol=1e-5)


def test_sdxl_eq8_changes_only_the_chosen_token_of_both_encoders(sdxl):
    prompts = ["a dolphin riding a bike"] * 6
    with torch.no_grad():
        out = diffexp.sample_batch(sdxl, prompts, torch.Generator().manual_seed(0), explore=True, **sampling())
        plain, _ = diffexp.encode_prompts(sdxl, prompts)
    weighted = out["cond"]["encoder_hidden_states"]
    changed = (weighted != plain["encoder_hidden_states"]).any(dim=2)  # [B, L]
    assert (changed.sum(dim=1) == 1).all() and changed[:, 1:6].any(dim=1).all()
    for b, i in enumerate(changed.float().argmax(dim=1)):
        first, second = weighted[b, i, :32], weighted[b, i, 32:]  # the two encoders' halves at the chosen token
        assert ((first != plain["encoder_hidden_states"][b, i, :32]).any()
                and (second != plain["encoder_hidden_states"][b, i, 32:]).any())
    assert torch.equal(out["cond"]["text_embeds"], plain["text_embeds"])  # the pooled embedding is not weighted


def test_sdxl_ddpo_recomputation_is_on_policy(sdxl):
    """DDPO falls out of the same code on SDXL: stored pooled embeddings and size ids are reused too."""
    sdxl.scheduler.set_timesteps(10)
    try:
        with torch.no_grad():
            batch = diffexp.sample_batch(sdxl, ["a dolphin riding a bike", "a cat"], torch.Generator().manual_seed(0),
                                         explore=True, **sampling(w_high=5.0))
            i = torch.arange(2)
            order = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(b))
                                 for b in range(2)])  # [2, 10]
            for j in range(10):
                ratio = (diffexp.ddpo_log_prob(sdxl, batch, i, order[:, j], 1.0)
                         - batch["log_probs"][i, order[:, j]]).exp()
                assert torch.allclose(ratio, torch.ones(2), atol=1e-4)
    finally:
        sdxl.scheduler.set_timesteps(20)


def test_sdxl_saves_loads_and_trains_end_to_end(tmp_path):
    """The tiny SDXL pipeline saves and loads back as SDXL, the CLI trains it, and diffusers' SDXL LoRA loader reads the
    checkpoint."""
    shapes.tiny_pipeline(sdxl=True).save_pretrained(tmp_path / "sdxl")
    assert (type(diffexp.load_pipeline(str(tmp_path / "sdxl"), 4, "cpu", torch.float32)).__name__
            == "StableDiffusionXLPipeline")
    code, out, err = run_cli("--method", "alignprop", "--reward", "aesthetic", "--model", "tiny-sdxl", *TINY_RUN[2:],
                             "--epochs", "1", "--eval-every", "0", "--out", str(tmp_path / "run"))
    assert code == 0, err
    fresh = shapes.tiny_pipeline(sdxl=True)
    fresh.load_lora_weights(str(tmp_path / "run" / "checkpoint"))
    assert any(not torch.equal(v, torch.zeros_like(v))
               for k, v in lora_weights(str(tmp_path / "run")).items() if "lora_B" in k or "lora.up" in k)


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_bf16_frozen_weights_with_fp32_lora(model):
    """The GPU precision set-up, run on the CPU: frozen weights bf16 (SDXL's VAE fp32), LoRA fp32; both
    trainers run, and DDPO's recomputed log-probs stay within its 1e-4 clip range of the sampled ones."""
    p = diffexp.load_pipeline(model, 4, "cpu", torch.bfloat16)
    assert (p.text_encoder.dtype == torch.bfloat16
            and {q.dtype for n, q in p.unet.named_parameters() if "lora" not in n} == {torch.bfloat16})
    assert {q.dtype for q in p.unet.parameters() if q.requires_grad} == {torch.float32}
    assert p.vae.dtype == (torch.float32 if model == "tiny-sdxl" else torch.bfloat16)
    p.scheduler.set_timesteps(4)
    lora = [q for q in p.unet.parameters() if q.requires_grad]
    optimizer, scaler = torch.optim.AdamW(lora, lr=1e-2), torch.amp.GradScaler("cpu", enabled=False)
    common = ["--model", model, "--steps", "4", "--batch-size", "2", "--micro-batch-size", "2",
              "--train-batch-size", "2", *UNUSED_OUT]
    reward = pattern_reward()
    row, _ = diffexp.alignprop_epoch(p, reward, ["cat", "dog"], runs.parse_args(["--method", "alignprop", *common]),
                                     True, torch.Generator().manual_seed(0), optimizer, scaler, 1)
    assert row["skipped_updates"] == 0 and math.isfinite(row["loss"])
    row, _ = diffexp.ddpo_epoch(p, reward, ["cat", "dog"],
                                runs.parse_args(["--method", "ddpo", "--reward", "jpeg", *common]), True,
                                torch.Generator().manual_seed(0), optimizer, scaler,
                                diffexp.PerPromptStatTracker(32, 16), 1)
    assert row["skipped_updates"] == 0 and row["clipfrac"] == 0.0
    assert all(q.dtype == torch.float32 and torch.isfinite(q).all() for q in lora)


# ---------------------------------------------------------------------------------------------
# The command line and the training run (tiny model, a few seconds per epoch)

# The 6 prompts of [unseen_animals] for training and evaluation: an evaluation samples 6 images, not [animals]' 45
TINY_RUN = ["--model", "tiny", "--steps", "4", "--batch-size", "4", "--micro-batch-size", "2",
            "--train-batch-size", "4", "--prompts", "unseen_animals", "--eval-prompts", "unseen_animals"]


def run_cli(*argv, env=None, timeout=600):
    """diffexp.py in a subprocess, as a user runs it; returns (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "diffexp.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
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
    (["--prompts", "plants"],
     "prompts 'plants': no such file, nor a set of prompts.txt with prompts (animals, unseen_animals"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "not a multiple"),
    (["--batch-size", "8", "--micro-batch-size", "4", "--train-batch-size", "8", "--samples-per-prompt", "3"],
     "is not a multiple of --samples-per-prompt 3"),
    (["--samples-per-prompt", "0"], "--samples-per-prompt must be at least 1"),
    (["--backprop-steps", "60"], "--backprop-steps must be between 1 and --steps"),
    (["--backprop-steps", "0"], "--backprop-steps must be between 1 and --steps"),  # not silently "all steps"
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--device", "foo"], "--device 'foo' is not a torch device"),
    (["--resume", "/nonexistent/run"], "no config.json there"),
])
def test_bad_arguments_fail_with_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runs.parse_args(["--model", "tiny", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]  # one line, no usage block


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr -1.0 must be positive."),
    (["--reward", "beauty"], "unknown reward 'beauty'"),
    (["--method", "ppo"], "invalid choice: 'ppo'"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "is not a multiple of --train-batch-size"),
    (["--resume", "/nonexistent/run"], "/nonexistent/run: no config.json there"),
    (["--t-thres", "1000"], "--t-thres 1000 is outside [0, 1000)"),
    (["--eta", "-1"], "--eta -1.0 must be at least 0."),
    (["--model", "shapes", "--alpha-min", "2", "--alpha-max", "1"], "--alpha-min 2.0 is above --alpha-max 1.0."),
])
def test_bad_arguments_are_refused_before_torch_is_imported(tmp_path, argv, message):
    """A bad setting that needs no model is refused in one line, exit 2, by runs.py before diffexp.py imports torch
    (which, with diffusers, takes about 5 s): counted by a torch on the path that fails if imported."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch was imported')")
    code, out, err = run_cli(*argv, env=dict(PYTHONPATH=str(tmp_path)))
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_resume_and_generate_take_the_runs_own_settings(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    original = runs.parse_args(["--method", "ddpo", "--reward", "jpeg", *TINY_RUN, "--epochs", "50",
                                "--eval-every", "3", "--save-every", "5", "--eval-reward", "aesthetic",
                                "--lr", "0.02", *UNUSED_OUT])
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(original)))
    for mode in ("--resume", "--generate"):
        args = runs.parse_args([mode, str(run)])
        assert ((args.method, args.epochs, args.eval_every, args.save_every, args.eval_reward, args.lr, args.steps)
                == ("ddpo", 50, 3, 5, "aesthetic", 0.02, 4))
    assert runs.parse_args(["--resume", str(run), "--epochs", "60"]).epochs == 60
    with pytest.raises(SystemExit):
        runs.parse_args(["--resume", str(run), "--method", "alignprop", "--reward", "aesthetic"])
    assert "setting method was 'ddpo' there and is 'alignprop' now" in capsys.readouterr().err


def test_overwrite_deletes_only_run_directories_and_wandb_must_be_installed(tmp_path, capsys, monkeypatch):
    (tmp_path / "precious.txt").write_text("not a run")
    with pytest.raises(SystemExit):
        runs.parse_args(["--model", "tiny", "--out", str(tmp_path), "--overwrite"])
    assert "is not a run directory" in capsys.readouterr().err and (tmp_path / "precious.txt").exists()
    monkeypatch.setattr(runs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        runs.parse_args(["--model", "tiny", "--wandb", *UNUSED_OUT])
    assert "pip install wandb" in capsys.readouterr().err


def test_empty_prompt_set_is_refused_and_a_prompt_file_is_accepted(tmp_path, monkeypatch, capsys):
    own = tmp_path / "my_prompts.txt"
    own.write_text("# my own prompts\na red circle\n\na blue square\n")
    args = runs.parse_args(["--model", "tiny", "--prompts", str(own), "--eval-prompts", str(own), *UNUSED_OUT])
    assert runs.load_prompts(args.prompts) == ["a red circle", "a blue square"]
    (tmp_path / "prompts.txt").write_text("[animals]\ncat\n[unseen_animals]\n# nothing here\n")
    monkeypatch.setattr(runs, "PROMPTS_FILE", str(tmp_path / "prompts.txt"))
    with pytest.raises(SystemExit):
        runs.parse_args(["--model", "tiny"])
    assert "prompts 'unseen_animals': no such file, nor a set of prompts.txt with prompts" in capsys.readouterr().err
    for text, message in (("cat\n", "the prompt 'cat' comes before any [set] line"), ("", "no such file, nor a set")):
        (tmp_path / "prompts.txt").write_text(text)  # a prompts.txt with no set, or nothing at all: one line each
        with pytest.raises(SystemExit) as exit_info:
            runs.parse_args(["--model", "tiny"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_prompts_txt_has_the_papers_sets():
    load = runs.load_prompts
    assert (len(load("animals")) == 45 and len(load("unseen_animals")) == 6
            and not set(load("animals")) & set(load("unseen_animals")))
    assert len(load("animal_activities")) == 135 and "a monkey washing the dishes" in load("animal_activities")
    assert len(load("unseen_animal_activities")) == 135 and "a cat playing soccer" in load("unseen_animal_activities")
    # DrawBench's 58 challenging prompts, verbatim: their SHA-256, taken from the published list when it was copied
    drawbench = load("drawbench")
    assert len(drawbench) == 58 and drawbench[0] == "A horse riding an astronaut."
    assert (hashlib.sha256("\n".join(drawbench).encode()).hexdigest()
            == "f9f98dc777a9d8b123b6fafc31de15189aef5021ced6b1e3a92fe3f27fa14e67")
    # the shapes world's sets: held-out colour-shape pairs, every prompt a caption of the grammar
    seen, unseen = load("shapes"), load("unseen_shapes")
    pairs = lambda prompts: {(shapes.parse_caption(p)["colour"], shapes.parse_caption(p)["shape"]) for p in prompts}
    assert len(pairs(seen)) == 18 and len(pairs(unseen)) == 6 and not pairs(seen) & pairs(unseen)


def test_without_the_hub_failures_are_one_line_naming_the_fix(tmp_path):
    """No network (HF_HUB_OFFLINE=1): a hub model or reward fails at once, in one line that names the thing and
    the way out, and leaves no run directory behind."""
    run = str(tmp_path / "run")
    code, out, err = run_cli("--method", "ddpo", "--reward", "jpeg", "--model", "nobody/no-such-model", "--out", run)
    assert code == 1 and "Traceback" not in err and not os.path.exists(run)
    assert (err.strip().splitlines()[-1].startswith("error: cannot load --model 'nobody/no-such-model'")
            and "--model shapes --reward bold" in err)
    code, out, err = run_cli("--method", "alignprop", "--reward", "aesthetic", "--model", "shapes", "--out", run)
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err and not os.path.exists(run)
    assert ("reward aesthetic" in last and "sac+logos+ava1-l14-linearMSE.pth" in last
            and "DIFFEXP_AESTHETIC_HEAD" in last and last.endswith("or run offline with --model shapes --reward bold"))
    assert len([line for line in err.splitlines() if "Retrying" in line or "connect" in line.lower()]) == 0


def test_cli_run_writes_logs_grids_and_a_loadable_lora(tmp_path, capsys):
    run = str(tmp_path / "run")
    code, out, err = run_cli("--method", "alignprop", "--reward", "aesthetic", *TINY_RUN, "--epochs", "2",
                             "--eval-every", "2", "--out", run)
    assert code == 0, err
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["reward_queries"] for r in rows] == [0, 4, 8]
    assert {"reward_mean", "reward_std", "loss", "eval_seen_aesthetic", "eval_unseen_aesthetic"} <= set(rows[-1])
    assert rows[1]["explore"] and rows[2]["explore"]  # ceil(3/4 of 2 epochs) = 2
    files = set(os.listdir(run))
    assert {"config.json", "log.jsonl", "checkpoint", "train_0001.png", "eval_seen_0002.png",
            "eval_unseen_0000.png"} <= files
    # what the user is told: where the run goes, the device, progress bars, and a summary at the end
    assert out.splitlines()[0] == f"run directory {run}" and "device cpu, frozen weights fp32" in out
    assert "evaluating unseen" in err and "alignprop" in err  # tqdm's bars
    assert ("done after epoch 2 of 2 in" in out
            and f"eval_unseen_aesthetic {rows[-1]['eval_unseen_aesthetic']:.4g}" in out)
    # the checkpoint is a diffusers LoRA: load_lora_weights on a fresh pipeline gives the trained UNet
    fresh = shapes.tiny_pipeline()
    fresh.load_lora_weights(os.path.join(run, "checkpoint"))
    trained = diffexp.load_pipeline("tiny", 4, "cpu", torch.float32)
    lora, _ = diffexp.load_checkpoint(run)
    diffexp.put_lora(trained.unet, lora)
    x, c = torch.randn(1, 4, 16, 16), diffexp.encode_prompts(fresh, ["cat"])[0]["encoder_hidden_states"]
    with torch.no_grad():
        assert torch.allclose(fresh.unet(x, 500, encoder_hidden_states=c).sample,
                              trained.unet(x, 500, encoder_hidden_states=c).sample, atol=1e-6)
        assert not torch.allclose(shapes.tiny_pipeline().unet(x, 500, encoder_hidden_states=c).sample,
                                  trained.unet(x, 500, encoder_hidden_states=c).sample)
    # an existing run directory is refused without --resume or --overwrite, before anything loads
    code, out, err = run_cli("--method", "alignprop", *TINY_RUN, "--epochs", "1", "--out", run)
    assert code == 2 and "exists; pass --resume" in err and "Traceback" not in err and out == ""
    # --resume of a finished run says so and ends (in this process: the CLI's own entry point)
    diffexp.main(["--resume", run])
    assert "has trained its 2 epochs already; pass a larger --epochs" in capsys.readouterr().out
    # --generate writes images of every evaluation prompt with and without the LoRA, with their rewards
    diffexp.main(["--generate", run])
    assert ({"generate_with_lora.png", "generate_without_lora.png"} <= set(os.listdir(run))
            and "eval_unseen_aesthetic" in capsys.readouterr().out)


def test_defaults_come_from_the_small_model_then_the_method_then_the_common_table():
    def args(*argv):
        return runs.parse_args([*argv, *UNUSED_OUT])

    shapes_ddpo, shapes_alignprop, sd_alignprop = (
        args("--model", "shapes", "--method", "ddpo"), args("--model", "shapes"), args())
    assert (shapes_ddpo.epochs, shapes_ddpo.batch_size, shapes_ddpo.train_batch_size, shapes_ddpo.eval_every,
            shapes_ddpo.lr, shapes_ddpo.w_high, shapes_ddpo.samples_per_prompt) == (48, 128, 128, 4, 5e-4, 5.0, 16)
    assert (shapes_alignprop.epochs, shapes_alignprop.batch_size, shapes_alignprop.lr, shapes_alignprop.w_high,
            shapes_alignprop.samples_per_prompt) == (2, 64, 1e-3, 7.5, 1)
    # the default reward and prompt sets are per (model, method)
    assert shapes_ddpo.reward == shapes_alignprop.reward == "bold" and sd_alignprop.reward == "aesthetic"
    assert (shapes_alignprop.prompts, shapes_alignprop.eval_prompts) == ("bold", "unseen_bold")
    assert (sd_alignprop.eval_every, sd_alignprop.epochs, sd_alignprop.lr, sd_alignprop.w_high) == (10, 200, 1e-3, 7.5)
    assert args("--model", "shapes", "--eval-every", "3").eval_every == 3  # a flag given wins


def test_default_run_directories_do_not_collide():
    """The default --out names the method, reward, model, arm, every setting that differs from its default, and the
    seed."""
    def name(*argv):
        return runs.parse_args(list(argv)).out

    base = name("--model", "tiny")
    assert base == os.path.join("runs", "alignprop-aesthetic-tiny-diffexp-s0")
    others = [name("--model", "tiny-sdxl"), name("--model", "tiny", "--t-thres", "800"),
              name("--model", "tiny", "--alpha-max", "1"), name("--model", "tiny", "--w-low", "7.5"),
              name("--model", "tiny", "--no-explore"), name("--model", "tiny", "--seed", "1"),
              name("--model", "shapes"), name("--model", "tiny", "--method", "ddpo", "--reward", "jpeg"), name()]
    assert len({base, *others}) == len(others) + 1
    assert others[1] == os.path.join("runs", "alignprop-aesthetic-tiny-diffexp-t_thres=800-s0")
    assert others[-1] == os.path.join("runs", "alignprop-aesthetic-stable-diffusion-v1-5-diffexp-s0")
    assert name("--model", "tiny", "--epochs", "3", "--eval-every", "1") == base  # run tooling is not part of the name
    many = ["--model", "tiny", "--steps", "7", "--w-low", "2", "--alpha-min", "1.5", "--t-thres", "700",
            "--lora-rank", "8", "--eta", "0.5", "--clip-range", "0.001", "--lr"]
    long = name(*many, "0.5")  # more than 80 characters of settings become a short hash of them
    assert (os.path.basename(long).startswith("alignprop-aesthetic-tiny-diffexp-custom")
            and len(os.path.basename(long)) < 60)
    assert long != name(*many, "0.6") and long == name(*many, "0.5")


def test_help_is_grouped_shows_every_default_and_answers_before_torch_loads():
    code = ("import runpy, sys\nsys.argv = ['diffexp.py', '--help']\n"
            "try:\n    runpy.run_path('diffexp.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch loaded:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120).stdout
    assert out.strip().endswith("torch loaded: False")
    for group in ("what to fine-tune:", "sampling:", "DiffExp (Eq. 7, Eq. 8):", "training:", "DDPO:", "AlignProp:",
                  "run:"):
        assert group in out
    text = "".join(out.split())  # argparse wraps lines, also at hyphens: compare without whitespace
    for shown in (("--w-high W_HIGH Eq. 7: the ordinary CFG scale, for t <= t_thres (paper's values) "
                   "(default: ddpo 5.0, alignprop 7.5)"),
                  "(default: alignprop)", "(default: stable-diffusion-v1-5/stable-diffusion-v1-5)",
                  "(default: animals; shapes bold)", "(default: unseen_animals; shapes unseen_bold)",
                  "(default: 10; shapes ddpo 4, alignprop 1)", "(default: 0)",
                  "(default: 200; shapes ddpo 48, alignprop 2; tiny 6; tiny-sdxl 6)",
                  "(default: ddpo 0.0003, alignprop 0.001; shapes ddpo 0.0005, alignprop 0.001; tiny 0.01; "
                  "tiny-sdxl 0.01)",
                  "(default: 1; shapes ddpo 16, alignprop 1)", "(default: aesthetic; shapes bold)"):
        assert "".join(shown.split()) in text, shown


def test_the_repository_stands_alone():
    """No file of the project cites the design notes or reads a folder beside the repository."""
    for name in ("diffexp.py", "rewards.py", "shapes.py", "replicate.py", "test_diffexp.py", "README.md",
                 "prompts.txt"):
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            text = f.read()
        assert "SPEC" + ".md" not in text and "../" + "shared" not in text, name


@pytest.mark.parametrize("method, reward", [("ddpo", "jpeg"), ("alignprop", "aesthetic")])
def test_resume_continues_exactly(tmp_path, method, reward, capsys):
    """4 epochs in one run, and 2 + 2 with a resume, end with the same LoRA weights."""
    common = ["--method", method, "--reward", reward, *TINY_RUN, "--eval-every", "0", "--save-every", "1"]
    one, split = str(tmp_path / "one"), str(tmp_path / "split")
    diffexp.main([*common, "--epochs", "4", "--out", one])
    diffexp.main([*common, "--epochs", "2", "--explore-epochs", "3", "--out", split])  # 4's horizon: 3 epochs
    assert [r["epoch"] for r in read_log(split)] == [1, 2]
    diffexp.main([*common, "--epochs", "4", "--resume", split])
    assert f"run directory {split}, resumed after epoch 2" in capsys.readouterr().out
    assert [r["explore"] for r in read_log(split)] == [r["explore"] for r in read_log(one)] == [True] * 3 + [False]
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


def test_a_resumed_run_keeps_the_exploration_horizon_it_started_with(tmp_path, capsys):
    """The first 3/4 of the epochs explore, counted when the run starts: --resume with a larger --epochs continues
    with that horizon and says so; a run directory from before the horizon was stored keeps its own epochs'."""
    common = ["--method", "ddpo", "--reward", "jpeg", *TINY_RUN, "--eval-every", "0"]
    run, old = str(tmp_path / "run"), str(tmp_path / "old")
    for out in (run, old):
        diffexp.main([*common, "--epochs", "2", "--out", out])  # explores in epochs 1 and 2 of 2
    assert json.load(open(os.path.join(run, "config.json")))["explore_epochs"] == 2
    diffexp.main(["--resume", run, "--epochs", "4"])  # 3/4 of 4 would be 3
    assert [r["explore"] for r in read_log(run)] == [True, True, False, False]
    said = "DiffExp explores for the first 2 epochs, as counted when the run started (3/4 of --epochs 4 would be 3)"
    assert said in capsys.readouterr().out
    config = json.load(open(os.path.join(old, "config.json")))
    del config["explore_epochs"]  # as an older version of this code wrote it
    json.dump(config, open(os.path.join(old, "config.json"), "w"))
    diffexp.main(["--resume", old, "--epochs", "4"])
    assert [r["explore"] for r in read_log(old)] == [True, True, False, False]
    assert json.load(open(os.path.join(old, "config.json")))["explore_epochs"] == 2
    with pytest.raises(SystemExit):  # the horizon is part of what the run is
        diffexp.main(["--resume", run, "--epochs", "5", "--explore-epochs", "4"])
    assert "setting explore_epochs was 2 there and is 4 now" in capsys.readouterr().err


def test_the_explored_evaluation_changes_no_other_number(tmp_path):
    """--eval-explored adds the unseen prompts under DiffExp's sampler to each evaluation, from the same noise, and
    leaves every other logged number and the trained LoRA as they are without it (its draws are its own)."""
    common = ["--method", "ddpo", "--reward", "jpeg", *TINY_RUN, "--epochs", "2", "--eval-every", "1",
              "--t-thres", "500"]
    plain, explored = str(tmp_path / "plain"), str(tmp_path / "explored")
    diffexp.main([*common, "--out", plain])
    diffexp.main([*common, "--eval-explored", "--out", explored])
    rows = read_log(explored)
    assert [{k: v for k, v in r.items() if "explored" not in k} for r in rows] == read_log(plain)
    assert all(r["eval_unseen_explored_jpeg"] != r["eval_unseen_jpeg"] for r in rows)  # another sampler's images
    a, b = lora_weights(plain), lora_weights(explored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.exists(os.path.join(explored, "eval_unseen_explored_0002.png"))


def test_nan_reward_skips_the_update(pipe):
    """A NaN reward skips the update (never NaN weights) and is counted in the log row."""
    args = runs.parse_args(["--method", "ddpo", "--reward", "jpeg", *TINY_RUN, *UNUSED_OUT])
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in lora]
    optimizer = torch.optim.AdamW(lora, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    nan_reward = lambda images, prompts: torch.where(torch.arange(len(images)) == 0, torch.nan,
                                                     images.mean(dim=(1, 2, 3)))
    pipe.scheduler.set_timesteps(args.steps)
    try:
        row, _ = diffexp.ddpo_epoch(pipe, nan_reward, ["cat", "dog"], args, True, torch.Generator().manual_seed(0),
                                    optimizer, scaler, diffexp.PerPromptStatTracker(32, 16), 1)
        assert row["skipped_updates"] == 1 and math.isnan(row["reward_mean"])
        args = runs.parse_args(["--method", "alignprop", "--reward", "aesthetic", *TINY_RUN, *UNUSED_OUT])
        row, _ = diffexp.alignprop_epoch(pipe, nan_reward, ["cat", "dog"], args, True, torch.Generator().manual_seed(0),
                                         optimizer, scaler, 1)
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
    with pytest.raises(SystemExit, match="No space left on device.*the last good one is intact"):
        diffexp.main(["--method", "alignprop", "--reward", "aesthetic", *TINY_RUN, "--epochs", "3", "--eval-every", "0",
                      "--save-every", "1", "--out", run])
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["epoch"] == 1
    assert sorted(os.listdir(run)) == ["checkpoint", "config.json", "log.jsonl", "train_0001.png", "train_0002.png"]


def test_resume_after_a_crash_inside_the_checkpoint_swap(tmp_path):
    run = str(tmp_path / "run")
    common = ["--method", "alignprop", "--reward", "aesthetic", *TINY_RUN, "--eval-every", "0"]
    diffexp.main([*common, "--epochs", "1", "--out", run])
    # the old one deleted, the new one not renamed
    os.rename(os.path.join(run, "checkpoint"), os.path.join(run, "checkpoint.tmp"))
    diffexp.main([*common, "--epochs", "2", "--resume", run])
    assert [r["epoch"] for r in read_log(run)] == [1, 2]
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == ["checkpoint"]
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["epoch"] == 2
    # a checkpoint.tmp cut short (no state.pt) beside a good checkpoint is ignored, then replaced
    os.makedirs(os.path.join(run, "checkpoint.tmp"))
    diffexp.main([*common, "--epochs", "3", "--resume", run])
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["epoch"] == 3


def files_of(path):
    """Every file under path with its bytes and modification time: what a refusal must leave as it was."""
    found = {}
    for folder, _, names in os.walk(path):
        for name in names:
            file = os.path.join(folder, name)
            with open(file, "rb") as f:
                found[os.path.relpath(file, path)] = (f.read(), os.stat(file).st_mtime_ns)
    return found


def test_a_damaged_checkpoint_is_refused_in_one_line_that_names_the_file_and_changes_nothing(tmp_path, capsys):
    """--resume and --generate read the checkpoint whole before anything else: a LoRA or optimizer state that is cut
    short (as an interrupted copy leaves it), garbled or missing ends the process in one line naming the file and the
    way out, exit 2, and every file of the run directory stays as it was."""
    made = str(tmp_path / "made")
    diffexp.main(["--method", "alignprop", "--reward", "aesthetic", *TINY_RUN, "--epochs", "1", "--eval-every", "0",
                  "--out", made])
    lora, state = (os.path.join("checkpoint", name) for name in (diffexp.LORA_FILE, "state.pt"))
    damages = {
        "the LoRA cut short": (lora, lambda data: data[:100]),
        "the LoRA garbled": (lora, lambda data: bytes(len(data))),
        "the LoRA missing": (lora, None),
        "the optimizer state cut short": (state, lambda data: data[: len(data) // 2]),
    }
    for damage, (name, change) in damages.items():
        run = str(tmp_path / damage.replace(" ", "_"))
        shutil.copytree(made, run)
        file = os.path.join(run, name)
        if change is None:
            os.remove(file)
        else:
            with open(file, "rb") as f:
                data = f.read()
            with open(file, "wb") as f:
                f.write(change(data))
        before = files_of(run)
        modes = [["--resume", run, "--epochs", "2"]] + [["--generate", run]] * (name == lora and change is None)
        for mode in modes:
            capsys.readouterr()
            with pytest.raises(SystemExit) as exit:  # anything but the refusal would raise something else
                diffexp.main(mode)
            err = capsys.readouterr().err
            assert exit.value.code == 2, (damage, mode, err)
            assert (len(err.splitlines()) == 1 and err.startswith(f"error: cannot read {file} (")
                    and "the checkpoint is damaged; put back a copy of it, or start the run again with --overwrite"
                    in err), (damage, mode, err)
            assert files_of(run) == before, (damage, mode)


def test_an_unreachable_hub_fails_at_once_and_names_the_offline_way(tmp_path, monkeypatch):
    """Where the hub cannot be reached, a model or reward missing from the cache fails in one line with no retries
    (huggingface_hub would retry each missing file 5 times, 1 to 8 s apart: 23 s here), naming the way to run offline.
    Counted: the backoff sleeps of huggingface_hub, which must be none. Nothing is downloaded: the hub address is one
    where nothing listens, and the cache an empty folder."""
    from huggingface_hub import constants
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: the connection is refused
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    sleeps = []
    monkeypatch.setattr(hub_http.time, "sleep", sleeps.append)
    with pytest.raises(RuntimeError) as error:
        rewards.load_reward("aesthetic", "cpu", torch.float32)
    message = str(error.value)
    assert (message.startswith("reward aesthetic: cannot download sac+logos+ava1-l14-linearMSE.pth")
            and "ConnectError" in message and message.endswith("or run offline with --model shapes --reward bold"))
    with pytest.raises(ValueError) as error:
        diffexp.load_pipeline("nobody/no-such-model", 4, "cpu", torch.float32)
    message = str(error.value)
    assert (message.startswith("cannot load --model 'nobody/no-such-model': not a pipeline directory nor in the cache, "
                               "and the hub cannot be reached") and message.endswith("--model shapes --reward bold."))
    assert sleeps == []


def test_unwritable_run_directory_is_refused_before_anything_loads(tmp_path):
    """Refused in one line by trying what the run will do (make the directory, write a file), not by os.access, which
    says yes under /proc for root; and a refusal or a successful check leaves nothing behind."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "no_torch").mkdir()  # a torch that cannot be imported, first on the path: the refusal comes before it
    (tmp_path / "no_torch" / "torch.py").write_text("raise ImportError('torch was imported')")
    for out_dir in (str(tmp_path / "a_file" / "run"), "/proc/nope/run"):
        code, out, err = run_cli("--method", "alignprop", "--reward", "colour", "--model", "shapes", "--out", out_dir,
                                 env=dict(PYTHONPATH=str(tmp_path / "no_torch")))
        assert (code == 2 and out == "" and err.startswith("error: cannot write the run directory")
                and len(err.splitlines()) == 1), err
    assert runs.try_writing(str(tmp_path / "new" / "deeper" / "run")) is None
    assert sorted(os.listdir(tmp_path)) == ["a_file", "no_torch"]


def test_sigint_says_so_finishes_the_epoch_saves_and_exits_zero(tmp_path):
    run = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "diffexp.py"), "--method", "alignprop",
                             "--reward", "aesthetic", *TINY_RUN, "--epochs", "100", "--eval-every", "0",
                             "--save-every", "50", "--out", run],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until the first epoch is logged, then interrupt the second
        if line.startswith('{"epoch": 1'):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "signal 2: finishing this epoch, then saving and stopping" in out
    epochs = [r["epoch"] for r in read_log(run)]
    assert 2 <= epochs[-1] < 100 and epochs == list(range(1, epochs[-1] + 1))
    assert f"stopped after epoch {epochs[-1]} of 100" in out and f"continue with --resume {run}" in out
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["epoch"] == epochs[-1]


def test_tiny_runs_print_no_warnings(tmp_path):
    """Both tiny pipelines are built in the wanted dtype, not cast after (which makes diffusers warn): one fresh
    process runs both, so that every warning is shown the first time its line warns."""
    script = ["import diffexp"]
    for model in ("tiny", "tiny-sdxl"):
        argv = ["--method", "ddpo", "--reward", "jpeg", *TINY_RUN[2:], "--model", model, "--epochs", "1", "--out",
                str(tmp_path / model)]
        script.append(f"diffexp.main({argv!r})")
    # -W: the deprecation warnings that Python shows for a script's own code (diffexp.py run as __main__)
    command = [sys.executable, "-W", "default::DeprecationWarning:diffexp", "-c", "; ".join(script)]
    proc = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert all(os.path.exists(tmp_path / model / "checkpoint") for model in ("tiny", "tiny-sdxl"))
    text = (proc.stdout + proc.stderr).replace(str(tmp_path), "").lower()
    assert "warn" not in text and "casting" not in text and "deprecat" not in text, proc.stdout + proc.stderr


def test_main_in_process_restores_the_signal_handlers(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    diffexp.main(["--method", "ddpo", "--reward", "jpeg", *TINY_RUN, "--epochs", "1", "--eval-every", "0",
                  "--out", str(tmp_path / "run")])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def torchrun(tmp_path, *argvs):
    """diffexp.main under torchrun with 2 CPU processes (gloo, one thread each), a launch per argv in `argvs`, one
    after the other until one fails; each rank saves its LoRA at the start and end of its run, as RUN_DIR.rankR.pt.
    One launch per run: a second init_process_group in the same launch reuses the first's store keys (its group
    counter starts again at 0), so a rank that gets there first can read the other's stale address and fail."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(f"""
import json, os, sys, torch
sys.path.insert(0, {HERE!r})
import diffexp
from peft.utils import get_peft_model_state_dict
train = diffexp.train
def train_and_dump(pipe, reward_fns, args, *rest):
    start = {{k: v.clone() for k, v in get_peft_model_state_dict(pipe.unet).items()}}
    row = train(pipe, reward_fns, args, *rest)
    path = "%s.rank%s.pt" % (args.out, os.environ["RANK"])
    torch.save(dict(start=start, end=get_peft_model_state_dict(pipe.unet)), path)
    return row
diffexp.train = train_and_dump
if os.environ["RANK"] == "0" and os.environ.get("RANK0_DELAY"):  # rank 0 lagging behind the others, as under load
    import time; time.sleep(float(os.environ["RANK0_DELAY"]))
diffexp.main(json.loads(sys.argv[1]))
""")
    stdout, stderr = "", ""
    for argv in argvs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
                   json.dumps(argv)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        stdout, stderr = stdout + proc.stdout, stderr + proc.stderr
        if proc.returncode != 0:
            break
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_two_processes_end_with_identical_lora(tmp_path):
    """torchrun with 2 CPU processes, DDPO then AlignProp: different samples per rank, averaged gradients, the same
    LoRA, metrics over both ranks."""
    methods = {"ddpo": "jpeg", "alignprop": "aesthetic"}
    proc = torchrun(tmp_path, *[["--method", method, "--reward", reward, *TINY_RUN, "--epochs", "2", "--eval-every",
                                 "2", "--out", str(tmp_path / method)] for method, reward in methods.items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in methods:
        run = str(tmp_path / method)
        r0, r1 = (torch.load(f"{run}.rank{r}.pt", weights_only=False) for r in (0, 1))
        assert all(torch.equal(r0["end"][k], r1["end"][k]) for k in r0["end"])  # bit-identical on both ranks
        assert any(not torch.equal(r0["start"][k], r0["end"][k]) for k in r0["end"])  # and trained
        assert all(torch.equal(r0["start"][k], r1["start"][k]) for k in r0["start"])
        rows = read_log(run)  # rank 0 alone writes; rewards are gathered from both ranks
        assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["reward_queries"] == 8
        assert os.path.exists(os.path.join(run, "checkpoint", "state.pt"))
        assert proc.stdout.count(f"run directory {run}\n") == 1  # printed by rank 0 only
    assert proc.stdout.count('{"epoch": 1') == 2  # once per run
    # each rank's AlignProp loss is -0.01 x the mean of its rewards: averaged over ranks, it matches reward_mean
    rows = read_log(str(tmp_path / "alignprop"))
    assert rows[1]["loss"] == pytest.approx(-0.01 * rows[1]["reward_mean"], rel=1e-4)


def test_two_processes_report_an_argument_error_once(tmp_path, monkeypatch):
    """Printed by rank 0 even when it is the slower one: a rank that failed first would make torchrun kill it unprinted.
    """
    monkeypatch.setenv("RANK0_DELAY", "3")
    proc = torchrun(tmp_path, ["--model", "tiny", "--t-thres", "1000", "--out", str(tmp_path / "run")])
    assert proc.returncode != 0 and proc.stderr.count("error: --t-thres 1000 is outside") == 1


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        replicate.plot_runs([str(tmp_path)], str(tmp_path / "plot.png"))


def test_plot_draws_training_evaluation_and_judge_curves_per_run(tmp_path, monkeypatch):
    """The figure's data, checked through a recording stand-in for matplotlib (an optional import): one panel for the
    training reward, one for the unseen prompts' reward, and one for the judge where a run logged it."""
    lines, labels = [], {}
    axes = [SimpleNamespace(plot=lambda x, y, fmt, label, k=k: lines.append((k, list(x), list(y), label)),
                            set=lambda k=k, **kw: labels.__setitem__(k, kw), legend=lambda: None) for k in range(3)]
    figure = SimpleNamespace(tight_layout=lambda: None, savefig=lambda path, dpi: open(path, "w").close())
    pyplot = SimpleNamespace(subplots=lambda rows, cols, figsize: (figure, axes[:cols]), close=lambda what: None)
    monkeypatch.setitem(sys.modules, "matplotlib", SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    for name, explore, reward in (("diffexp", False, "aesthetic"), ("baseline", True, "aesthetic"),
                                  ("other", False, "jpeg"), ("shapes", False, "fidelity")):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(dict(method="ddpo", reward=reward, no_explore=explore)))
        rows = [dict(epoch=0, reward_queries=0, **{f"eval_unseen_{reward}": 1.0}),
                dict(epoch=1, reward_queries=64, reward_mean=5.0),
                dict(epoch=2, reward_queries=128, reward_mean=6.0, **{f"eval_unseen_{reward}": 2.0})]
        if reward == "fidelity":
            rows[0]["eval_unseen_shapes_judge"], rows[2]["eval_unseen_shapes_judge"] = 0.9, 0.7
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    replicate.plot_runs([str(tmp_path / "diffexp"), str(tmp_path / "baseline")], str(tmp_path / "plot.png"))
    assert lines == [(0, [64, 128], [5.0, 6.0], "ddpo + DiffExp (diffexp)"),
                     (1, [0, 128], [1.0, 2.0], "ddpo + DiffExp (diffexp)"),
                     (0, [64, 128], [5.0, 6.0], "ddpo (baseline)"), (1, [0, 128], [1.0, 2.0], "ddpo (baseline)")]
    assert (labels[0]["ylabel"] == labels[1]["ylabel"] == "mean aesthetic" and 2 not in labels
            and os.path.exists(tmp_path / "plot.png"))
    lines.clear()
    replicate.plot_runs([str(tmp_path / "shapes")], str(tmp_path / "plot.png"))
    assert (lines[-1] == (2, [0, 128], [0.9, 0.7], "ddpo + DiffExp (shapes)")
            and labels[2]["ylabel"] == "mean shapes_judge")
    with pytest.raises(ValueError, match=r"different rewards \(aesthetic, jpeg\)"):  # no single y-label fits
        replicate.plot_runs([str(tmp_path / "diffexp"), str(tmp_path / "other")], str(tmp_path / "plot.png"))
    with pytest.raises(ValueError, match="not a run directory"):
        replicate.plot_runs([str(tmp_path / "nothing")], str(tmp_path / "plot.png"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--plot-out /no/such/dir/plot.png: cannot write it"):
        replicate.plot_runs([str(tmp_path / "diffexp")], "/no/such/dir/plot.png")


def spy_run(tmp_path, monkeypatch, *argv):
    """A CLI run in-process on the tiny model that records, per epoch, every sample() call's guidance scales,
    every AlignProp truncation K, every DDPO log-prob recomputation and every optimizer step."""
    calls, epoch = [], [0]
    real_sample, real_loss, real_log_prob, real_step = (diffexp.sample, diffexp.alignprop_loss, diffexp.ddpo_log_prob,
                                                        diffexp.optimizer_step)
    real_epoch = {m: getattr(diffexp, f"{m}_epoch") for m in ("ddpo", "alignprop")}

    def record(kind, value, result):
        calls.append((epoch[0], kind, value))
        return result

    def epoch_of(method):
        def run(*a, **k):
            epoch[0] += 1
            return real_epoch[method](*a, **k)
        return run

    monkeypatch.setattr(diffexp, "sample", lambda pipe, cond, uncond, scales, *a, **k:
                        record("scales", scales.tolist(), real_sample(pipe, cond, uncond, scales, *a, **k)))
    monkeypatch.setattr(diffexp, "alignprop_loss", lambda pipe, fn, prompts, g, K, *a, **k:
                        record("K", K, real_loss(pipe, fn, prompts, g, K, *a, **k)))
    monkeypatch.setattr(diffexp, "ddpo_log_prob", lambda pipe, batch, i, s, eta:
                        record("log_prob", len(i), real_log_prob(pipe, batch, i, s, eta)))
    monkeypatch.setattr(diffexp, "optimizer_step", lambda *a: record("step", None, real_step(*a)))
    for method in ("ddpo", "alignprop"):
        monkeypatch.setattr(diffexp, f"{method}_epoch", epoch_of(method))
    diffexp.main(["--model", "tiny", "--steps", "4", "--eval-every", "0", "--out", str(tmp_path / "run"), *argv])
    return calls, read_log(str(tmp_path / "run"))


@pytest.mark.parametrize("epochs", [4, 5])
def test_exploration_runs_for_the_first_three_quarters_of_the_epochs(tmp_path, monkeypatch, epochs):
    calls, rows = spy_run(tmp_path, monkeypatch, "--method", "alignprop", "--reward", "aesthetic", "--batch-size", "4",
                          "--micro-batch-size", "2", "--train-batch-size", "4", "--epochs", str(epochs),
                          "--t-thres", "500")
    explored = math.ceil(0.75 * epochs)
    assert [r["explore"] for r in rows] == [True] * explored + [False] * (epochs - explored)
    for e in range(1, epochs + 1):  # 4 steps: t = 751, 501, 251, 1; while exploring, t > 500 runs at w_low = 1
        scales = [v for k, kind, v in calls if k == e and kind == "scales"]
        assert (len(scales) == 2
                and all(v == ([1.0, 1.0, 7.5, 7.5] if e <= explored else [7.5] * 4) for v in scales)), (e, scales)


def test_no_explore_samples_plainly_throughout(tmp_path, monkeypatch):
    calls, rows = spy_run(tmp_path, monkeypatch, "--method", "alignprop", "--reward", "aesthetic",
                          "--batch-size", "4", "--micro-batch-size", "2", "--train-batch-size", "4", "--epochs", "2",
                          "--t-thres", "500", "--no-explore")
    assert [r["explore"] for r in rows] == [False, False]
    assert all(v == [7.5] * 4 for _, kind, v in calls if kind == "scales")
    calls, rows = spy_run(tmp_path / "b", monkeypatch, "--method", "alignprop", "--reward", "aesthetic",
                          "--batch-size", "4", "--micro-batch-size", "2", "--train-batch-size", "4", "--epochs", "2",
                          "--t-thres", "500")
    assert all(v == [1.0, 1.0, 7.5, 7.5] for _, kind, v in calls if kind == "scales")  # t = 751, 501 > 500: w_low


def test_ddpo_inner_epochs_and_timestep_fraction(tmp_path, monkeypatch):
    common = ["--method", "ddpo", "--reward", "jpeg", "--batch-size", "8", "--micro-batch-size", "2",
              "--train-batch-size", "4", "--epochs", "1"]
    calls, _ = spy_run(tmp_path / "a", monkeypatch, *common)
    assert sum(kind == "step" for *_, kind, _ in calls) == 2  # 8 samples, 4 per optimizer step
    assert sum(v for *_, kind, v in calls if kind == "log_prob") == 8 * 4  # every sample trains on all 4 steps
    monkeypatch.undo()
    calls, _ = spy_run(tmp_path / "b", monkeypatch, *common, "--inner-epochs", "2", "--timestep-fraction", "0.5")
    assert sum(kind == "step" for *_, kind, _ in calls) == 4  # two passes over the batch
    assert sum(v for *_, kind, v in calls if kind == "log_prob") == 2 * 8 * 2  # each pass: 2 of the 4 steps per sample


def test_alignprop_draws_one_truncation_per_batch(tmp_path, monkeypatch):
    common = ["--method", "alignprop", "--reward", "aesthetic", "--batch-size", "16", "--micro-batch-size", "1",
              "--train-batch-size", "16", "--epochs", "1", "--steps", "4"]
    K = lambda calls: [v for *_, kind, v in calls if kind == "K"]
    default = K(spy_run(tmp_path / "a", monkeypatch, *common)[0])
    assert len(default) == 16 and set(default) == {1, 2, 3, 4}  # K ~ U{1..steps}, one per micro-batch
    monkeypatch.undo()
    assert K(spy_run(tmp_path / "b", monkeypatch, *common, "--backprop-steps", "2")[0]) == [2] * 16  # fixed K
    monkeypatch.undo()
    drawn = K(spy_run(tmp_path / "c", monkeypatch, *common, "--backprop-steps", "2", "--backprop-random")[0])
    assert len(drawn) == 16 and set(drawn) == {1, 2}  # K ~ U{1..2}


def test_eq8_alpha_is_applied_in_fp32_before_the_cast():
    g = torch.Generator().manual_seed(0)
    c, c_empty = torch.randn(2, 5, 8, generator=g).bfloat16(), torch.randn(1, 5, 8, generator=g).bfloat16()
    alpha = torch.tensor([1.001, 1.9999])  # bf16 would round these to 1.0 and 2.0
    out = diffexp.weight_prompt_embeds(c, c_empty, torch.tensor([1, 3]), alpha)
    expected = (c_empty[0, [1, 3]].float()
                + alpha[:, None] * (c[[0, 1], [1, 3]].float() - c_empty[0, [1, 3]].float())).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out[[0, 1], [1, 3]], expected)


def test_evaluation_covers_the_whole_prompt_set(pipe, monkeypatch):
    """Every prompt of a set is evaluated, in order, cycled to at least --batch-size images."""
    args = runs.parse_args(["--model", "tiny", "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2",
                            "--train-batch-size", "4", *UNUSED_OUT])
    seen = []
    monkeypatch.setattr(diffexp, "sample_batch", lambda pipe, prompts, generator, **k:
                        seen.extend(prompts) or dict(images=torch.rand(len(prompts), 3, 8, 8)))
    prompts = [f"prompt {k}" for k in range(7)]
    metrics, shown = diffexp.evaluate(pipe, {"jpeg": rewards.load_reward("jpeg", "cpu", torch.float32)},
                                      {"unseen": prompts}, args, 1)
    assert seen == prompts + prompts[:1]  # 7 prompts, rounded up to whole micro-batches of 2
    assert ([p for _, p, _ in shown["unseen"]] == seen
            and all(set(r) == {"jpeg"} and isinstance(r["jpeg"], float) for *_, r in shown["unseen"]))
    seen.clear()
    diffexp.evaluate(pipe, {"jpeg": rewards.load_reward("jpeg", "cpu", torch.float32)},
                     {"unseen": prompts[:3]}, args, 1)
    assert seen == prompts[:3] + prompts[:1]  # a small set is cycled to --batch-size 4


# ---------------------------------------------------------------------------------------------
# The shapes world (shapes.py): data, judge, the pixel VAE, the shipped model, its rewards and learning


def test_caption_grammar_round_trips():
    assert (shapes.caption_of("red", "circle") == "a red circle"
            and shapes.caption_of("orange", "square", size="large") == "a large orange square")
    assert (shapes.caption_of("blue", "triangle", count=2, size="small", background="white")
            == "two small blue triangles on a white background")
    assert shapes.caption_of("green", "circle", background="orange") == "a green circle on an orange background"
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = shapes.random_attributes(rng)
        parsed = shapes.parse_caption(shapes.caption_of(**a))
        assert parsed == {k: a[k] for k in ("colour", "shape", "count", "background")}
    with pytest.raises(ValueError, match="names no colour or no shape"):
        shapes.parse_caption("a cat")


def judge_accuracy(attributes, images):
    """The fraction of images whose every named attribute the judge reads back."""
    readings = shapes.judge(images)
    return np.mean([(all(r[k] == a[k] for k in ("colour", "shape", "count"))
                     and a["background"] in (None, r["background"]))
                    for a, r in zip(attributes, readings)])


def test_judge_reads_fresh_drawings_and_their_pixel_vae_round_trip():
    rng = np.random.default_rng(123)  # not a seed that pretraining draws from
    attributes = [shapes.random_attributes(rng) for _ in range(300)]
    images = torch.from_numpy(np.stack([shapes.draw(a, rng) for a in attributes]))
    assert images.shape == (300, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert judge_accuracy(attributes, images) >= 0.95
    vae = shapes.pixel_vae(1.25)
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.sample()  # [B, 4, 16, 16]
        decoded = vae.decode(latents).sample / 2 + 0.5
    # the latent is the 2 x 2-averaged image in channels 0-2 (to float error), zero in channel 3
    assert (torch.allclose(latents[:, :3], torch.nn.functional.avg_pool2d(images * 2 - 1, 2), atol=1e-4)
            and latents[:, 3].abs().max() < 1e-4)
    assert 10 * torch.log10(1 / (decoded - images).pow(2).mean()) > 25  # dB
    assert judge_accuracy(attributes, decoded) >= 0.95


def test_shapes_py_imports_nothing_from_the_project():
    import ast

    tree = ast.parse(open(os.path.join(HERE, "shapes.py")).read())
    imported = {n.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"diffexp", "rewards", "replicate"}
    strings = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    # no code of the project in a string
    assert not any(re.search(r"import [^\n]*\bdiffexp\b", text) for text in strings)


def test_pretraining_is_deterministic_from_its_seed(tmp_path):
    for name in ("a", "b"):
        shapes.pretrain(str(tmp_path / name), seed=3, steps=3, batch_size=4)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / n / "unet" / "diffusion_pytorch_model.safetensors") for n in ("a", "b"))
    assert (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            and all(v.dtype == torch.float32 for v in a.values()))


def test_shipped_shapes_model_loads_plainly_draws_and_is_small():
    """The first thing anyone does with a diffusers pipeline, exactly so: load it without a dtype and call it."""
    from diffusers import StableDiffusionPipeline

    total = sum(os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(os.path.join(HERE, "shapes_model")) for f in files)
    assert total <= 20e6  # the fidelity scorer's weights included
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(HERE, "shapes_model"))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)  # the pipeline's noise comes from the global generator when it is given none
    image = pipe("a red circle").images[0]
    assert image.size == (32, 32) and {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    assert shapes.judge(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None] / 255.0)[0]["colour"] == "red"
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"


def test_shipped_shapes_model_follows_its_prompts():
    """96 samples of "a COLOUR SHAPE" (each of the 24 pairs 4 times), 20 DDIM steps, fixed noise, read by the judge."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(HERE, "shapes_model"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cfg5, _ = shapes.quality(pipe, guidance_scale=5.0, n=96)
    cfg1, _ = shapes.quality(pipe, guidance_scale=1.0, n=96)
    # colour and shape as named; guidance matters: the whole caption (colour, shape and count) is followed at least
    # 15 points more often at CFG 5 than unguided. (The colour alone is followed unguided too: see the README.)
    assert cfg5["colour"] >= 0.85 and cfg5["shape"] >= 0.60 and cfg5["all"] >= cfg1["all"] + 0.15, (cfg5, cfg1)


@pytest.mark.parametrize("explore", [True, False])
def test_alignprop_fine_tuning_raises_bold_on_held_out_prompts_and_noise(explore):
    """Learning, measured where training never looked (unseen prompts, held-out noise), for 3 seeds, with DiffExp's
    exploration and without; only the LoRA changes. Measured (10 steps, 2 epochs of 32, lr 2e-3): from 0.43-0.47 up by
    0.09-0.17; a frozen LoRA (no change) or the loss's sign flipped (a fall) fails it, planted and seen."""
    for seed in range(3):
        before, after, s0, s1 = fine_tune_shapes(seed, explore, epochs=2, lr=2e-3)
        assert after > before + 0.05, (seed, before, after)
    assert_only_lora_changed(s0, s1)


def ddpo_update_on_bold(seed):
    """One DDPO epoch at the shapes model's defaults (128 samples, 8 prompts x 16, one update, lr 5e-4, 10 steps, no
    exploration); returns bold's mean on the held-out prompts of [unseen_bold] from held-out noise (never a training
    draw) before the update, after it, and after its mirror."""
    args = runs.parse_args(["--method", "ddpo", "--model", "shapes", "--no-explore", "--seed", str(seed),
                            *UNUSED_OUT])
    assert (args.reward, args.batch_size, args.train_batch_size, args.lr) == ("bold", 128, 128, 5e-4)
    torch.manual_seed(seed)
    p = diffexp.load_pipeline("shapes", 4, "cpu", torch.float32)
    p.scheduler.set_timesteps(args.steps)
    reward, held_out = rewards.load_reward("bold", "cpu", torch.float32), runs.load_prompts(args.eval_prompts) * 4

    def evaluate():
        with torch.no_grad():
            g = torch.Generator().manual_seed(10_000 + seed)
            images = torch.cat([diffexp.sample_batch(p, held_out[k : k + 16], g,
                                                     **diffexp.sampling_settings(args))["images"]
                                for k in range(0, len(held_out), 16)])
            return reward(images, held_out).mean().item()

    tracker = diffexp.PerPromptStatTracker(32, 16)
    lora = [q for q in p.unet.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=args.lr, weight_decay=args.weight_decay)
    before, w0 = evaluate(), [q.detach().clone() for q in lora]
    row, _ = diffexp.ddpo_epoch(p, reward, runs.load_prompts(args.prompts), args, False,
                                diffexp.seeded_generator(seed, 1, 0), optimizer,
                                torch.amp.GradScaler("cpu", enabled=False), tracker, 1)
    assert row["skipped_updates"] == 0 and row["clipfrac"] == 0.0  # one update: the ratio is 1 throughout
    after = evaluate()
    # The mirror: the same samples with the advantages negated. Before the one update the ratio is 1, so the loss is
    # linear in the advantages and its gradient is this update's negated (clipping by the norm alike); AdamW's first
    # step, decay w <- w (1 - lr wd) then the step -lr m / (sqrt(v) + eps), is reflected: w_mirror = 2 w0 (1 - lr wd)
    # - w1. (Trained for real instead, on seed 0, the mirror's weights came out bit for bit these; computing them
    # halves the test's time.)
    with torch.no_grad():
        for q, q0 in zip(lora, w0):
            q.copy_(2 * q0 * (1 - args.lr * args.weight_decay) - q)
    return before, after, evaluate()


def test_one_ddpo_update_raises_bold_on_held_out_prompts_and_noise_above_its_mirror():
    """DDPO's learning, measured where training never looked, for 3 seeds. Its policy gradient is mostly noise here
    (two independent 256-sample gradients have a cosine near 0.1), so a few updates move the held-out reward by less
    than the seeds' spread (2 epochs at lr 1e-3: -0.013 to +0.030 over 5 seeds); the test therefore compares one
    update with its mirror, the same samples with the advantages negated: the two end at +Delta and -Delta from the
    same weights, so the damage any random step does cancels and the gap is the update's own effect on held-out noise.
    Measured on 5 seeds: the update +0.001 to +0.007, its mirror -0.003 to -0.012, the gap +0.006 to +0.019. Negated
    advantages inside the epoch (the gap turns negative) or a frozen LoRA (no gap) fail it, planted and seen."""
    for seed in range(3):
        before, up, down = ddpo_update_on_bold(seed)
        assert up > down + 0.003, (seed, before, up, down)


def test_replicate_writes_figures_and_tables_that_follow_from_its_logs(tmp_path, monkeypatch, capsys):
    """`replicate.py` at a tiny size: 2 seeds x 2 arms run as `python diffexp.py` subprocesses; the tables, the final
    values, the per-seed ratios and the paired differences are recomputed here from the runs' own log.jsonl files."""
    small = ["--epochs", "2", "--batch-size", "4", "--micro-batch-size", "4", "--train-batch-size", "4", "--steps", "4",
             "--eval-every", "1", "--prompts", "unseen_bold"]  # 12 prompts to evaluate, not 36
    argv = ["--method", "alignprop", "--seeds", "2", "--out", str(tmp_path), *small]
    replicate.main(argv)
    out = capsys.readouterr().out
    # a progress line per run and epoch
    assert "[diffexp s1] epoch 2" in out and "[baseline s0] epoch 0" in out
    assert {"curves.png", "diversity.png", "results.json"} <= set(os.listdir(tmp_path))
    results = json.load(open(tmp_path / "results.json"))
    assert replicate.markdown(results) in out  # what the README shows is what the file says
    logs = {arm: [read_log(str(tmp_path / "runs" / f"{arm}-s{s}")) for s in range(2)]
            for arm in ("diffexp", "baseline")}
    curve = lambda arm, metric: np.array([[r[metric] for r in log if metric in r]
                                          for log in logs[arm]])  # [seeds, points]
    for metric in ("reward_mean", "eval_unseen_bold", "eval_unseen_shapes_judge", "eval_unseen_explored_bold",
                   "eval_unseen_explored_shapes_judge"):  # the judge beside the reward, both under both samplers
        for arm in ("diffexp", "baseline"):
            assert results["curves"][f"{arm}/{metric}"]["per_seed"] == curve(arm, metric).tolist()
            assert results["final"][f"{arm}/{metric}"]["mean"] == pytest.approx(curve(arm, metric)[:, -1].mean())
    metric = "eval_unseen_bold"
    queries = [r["reward_queries"] for r in logs["baseline"][0] if metric in r]
    base = curve("baseline", metric).mean(axis=0)
    for row in results["table"][metric]:
        level = base[0] + row["fraction"] * (base[-1] - base[0])
        assert row["level"] == pytest.approx(level)
        counted = {}  # per arm and seed: the queries after which the curve first reaches the level, else the budget
        for arm in ("diffexp", "baseline"):
            firsts = [next((q for q, v in zip(queries, values) if q > 0 and v >= level), None)
                      for values in curve(arm, metric)]
            assert row["queries"][arm] == firsts
            counted[arm] = np.array([queries[-1] if q is None else q for q in firsts], dtype=float)
            assert row["ratio"]["censored"][arm.replace("diffexp", "compared")] == firsts.count(None)
        ratios = counted["diffexp"] / counted["baseline"]  # censored seeds counted, never dropped
        assert row["ratio"]["n"] == 2 and row["ratio"]["per_seed"] == pytest.approx(ratios.tolist())
        assert row["ratio"]["mean"] == pytest.approx(np.exp(np.log(ratios).mean()))  # the geometric mean
        assert row["ratio"]["low"] is None  # 2 seeds: no interval, the per-seed values instead
    # both readings: the area under each seed's gain curve over the baseline's start of that seed, per arm, by the
    # trapezoid rule, over the budget
    for reading in ("reward_mean", metric):
        at = [r["reward_queries"] for r in logs["baseline"][0] if reading in r]
        for arm in ("diffexp", "baseline"):
            gains = curve(arm, reading) - curve("baseline", reading)[:, :1]
            areas = np.trapezoid(gains, at, axis=1) / at[-1]
            assert results["area"][reading]["areas"][arm] == pytest.approx(areas.tolist())
    # the unseen prompts under both samplers: each arm's gain from DiffExp's sampler, paired per seed
    final = lambda arm, metric: curve(arm, metric)[:, -1]
    gain = {arm: final(arm, "eval_unseen_explored_bold") - final(arm, metric) for arm in ("diffexp", "baseline")}
    samplers = results["samplers"][metric]
    assert samplers["diffexp"]["per_seed"] == pytest.approx(gain["diffexp"].tolist())
    assert samplers["interaction"]["per_seed"] == pytest.approx((gain["diffexp"] - gain["baseline"]).tolist())
    user = final("diffexp", "eval_unseen_explored_bold") - final("baseline", metric)
    assert samplers["user"]["per_seed"] == pytest.approx(user.tolist())
    assert os.path.exists(tmp_path / "samplers.png")
    # paired, per seed: 2 seeds, so the values without an interval
    d = curve("diffexp", metric)[:, -1] - curve("baseline", metric)[:, -1]
    paired = results["paired"][f"final {metric}"]
    assert paired["mean"] == pytest.approx(d.mean()) and paired["per_seed"] == pytest.approx(d.tolist())
    assert paired["low"] is None and "(2 seeds, no interval)" in replicate.markdown(results)
    assert (set(results["diversity"]) == {"plain", "diffexp"}
            and all(v["distinct_readings"] >= 1 for v in results["diversity"].values()))
    assert ([r["explore"] for r in logs["diffexp"][0][1:]] == [True, True]
            and not any(r["explore"] for r in logs["baseline"][0][1:]))
    # the two arms of a seed start from the same LoRA and draw the same noise: their first evaluation is identical
    assert curve("diffexp", metric)[:, 0].tolist() == curve("baseline", metric)[:, 0].tolist()
    # run again, it reuses the finished runs (their RUN_DIR.done): the same results, no run started
    replicate.main(argv)
    again = capsys.readouterr().out
    assert again.count("ran before with these arguments") == 4 and "] epoch" not in again
    assert json.load(open(tmp_path / "results.json"))["curves"] == results["curves"]
    # a published file of this replication on 1 seed takes the place of seed 0's runs (gone): only seed 1's are read;
    # its seed predates the reading under DiffExp's sampler, which then holds seed 1 alone
    explored = [f"{arm}/{m}" for arm in ("diffexp", "baseline") for m in replicate.explored_metrics("bold")]
    first = copy.deepcopy(results) | dict(seeds=1)
    first["curves"] = {key: c | dict(per_seed=c["per_seed"][:1]) for key, c in first["curves"].items()
                       if key not in explored}
    json.dump(first, open(tmp_path / "first.json", "w"))
    for arm in ("diffexp", "baseline"):
        shutil.rmtree(tmp_path / "runs" / f"{arm}-s0")
    replicate.main([*argv, "--seeds-from", str(tmp_path / "first.json")])
    again = capsys.readouterr().out
    assert again.count("ran before with these arguments") == 2 and "] epoch" not in again
    mixed = json.load(open(tmp_path / "results.json"))
    assert mixed["explored_seeds"] == [1] and results["explored_seeds"] == [0, 1]
    for key, c in results["curves"].items():
        assert mixed["curves"][key]["per_seed"] == (c["per_seed"][1:] if key in explored else c["per_seed"]), key
    assert mixed["samplers"][metric]["diffexp"]["per_seed"] == pytest.approx(gain["diffexp"][1:].tolist())
    assert mixed["samplers"][metric]["user"]["per_seed"] == pytest.approx(user[1:].tolist())
    assert "by sampler: paired difference (same seed) (seed 1 of 0-1: the others' runs predate" in again
    # its samplers figure compares the two samplers on the same seeds: seed 1's plain curves, not both seeds' mean
    import matplotlib.axes
    drawn = {}  # {a line's label: [its y in the left panel, in the right]}
    with monkeypatch.context() as m:
        m.setattr(matplotlib.axes.Axes, "plot",
                  lambda ax, x, y, style, label, **kw: drawn.setdefault(label, []).append(y))
        m.setattr(matplotlib.axes.Axes, "legend", lambda ax, **kw: None)  # no lines drawn: nothing to list
        replicate.draw_samplers(mixed, tmp_path / "samplers_mixed.png")
    for arm, name in (("diffexp", "DiffExp's LoRA"), ("baseline", "the baseline's LoRA (alignprop)")):
        for panel, reading in enumerate(("bold", "shapes_judge")):  # the figure's two panels, left to right
            plain = mixed["curves"][f"{arm}/eval_unseen_{reading}"]["per_seed"][1]
            explored = mixed["curves"][f"{arm}/eval_unseen_explored_{reading}"]["per_seed"][0]  # seed 1's
            assert np.allclose(drawn[f"{name}, plain sampler"][panel], plain)
            assert np.allclose(drawn[f"{name}, exploring sampler"][panel], explored)
    # that file continued in turn: its curves under DiffExp's sampler hold seed 1 alone, and both seeds come from it
    shutil.copy(tmp_path / "results.json", tmp_path / "mixed.json")
    replicate.main([*argv, "--seeds-from", str(tmp_path / "mixed.json")])
    assert capsys.readouterr().out.count("ran before with these arguments") == 0
    assert json.load(open(tmp_path / "results.json"))["curves"] == mixed["curves"]
    for other in (dict(settings=first["settings"] + ["--lr", "0.5"]), dict(diffexp_flags=["--t-thres", "900"]),
                  dict(exploration=first["exploration"] | dict(t_thres=900))):  # a default changed since
        json.dump(first | other, open(tmp_path / "other.json", "w"))
        with pytest.raises(SystemExit, match="other.json: its arms"):
            replicate.main([*argv, "--seeds-from", str(tmp_path / "other.json")])
    # a run stopped before its end (a stop signal during epoch 1: it ends the epoch, saves and exits) continues from
    # its checkpoint and ends as the unbroken run did; only its epoch 2 runs
    run_dir = str(tmp_path / "runs" / "diffexp-s1")
    script, run_argv = json.load(open(run_dir + ".done"))
    os.remove(run_dir + ".done")
    shutil.rmtree(run_dir)

    append_log = runs.append_log

    def append_then_stop(out, row):
        append_log(out, row)
        if row["epoch"] == 0:  # the starting model's evaluation: the signal comes in epoch 1
            runs.STOP_REQUESTED.set()

    with monkeypatch.context() as m:
        m.setattr(runs, "append_log", append_then_stop)
        try:
            diffexp.main([*run_argv, "--out", run_dir])
        finally:
            runs.STOP_REQUESTED.clear()  # for the tests after this one
    assert [row["epoch"] for row in replicate.read_log(run_dir)] == [0, 1]
    assert replicate.stopped(script, run_argv, run_dir) and not replicate.finished(script, run_argv, run_dir)
    replicate.main([*argv, "--seeds-from", str(tmp_path / "first.json")])
    again = capsys.readouterr().out
    assert "[diffexp s1] stopped before its end: continues from its checkpoint" in again
    assert "[diffexp s1] epoch 2" in again and "[diffexp s1] epoch 1" not in again
    assert replicate.finished(script, run_argv, run_dir)
    resumed = json.load(open(tmp_path / "results.json"))["curves"]
    for key, c in mixed["curves"].items():  # this process ran epoch 1 at its own thread count: equal to rounding
        assert np.allclose(resumed[key]["per_seed"], c["per_seed"], atol=1e-5), key
    # ... unless the code now gives its arguments other settings (a changed default): then the run is stale
    run_dir = str(tmp_path / "runs" / "baseline-s1")
    script, argv = json.load(open(run_dir + ".done"))
    assert replicate.finished(script, argv, run_dir)
    monkeypatch.setitem(runs.DEFAULTS[("shapes", "alignprop")], "lr", 0.5)
    assert not replicate.finished(script, argv, run_dir)


def test_replicate_never_counts_a_run_that_a_signal_stopped_as_finished(tmp_path, monkeypatch):
    """A run stopped by a signal saves and exits 0, like a finished one: replicate.py must not write its RUN_DIR.done
    (the run would then count as finished), but say that it stopped. Here each subprocess is a stand-in that writes
    its log (for `python diffexp.py`, a 2-epoch run's stopped after epoch 1) and exits 0; a premise sweep (no log)
    and a peer's run (arguments diffexp.py does not know) that exit 0 are done."""
    argv = ["--model", "shapes", "--method", "alignprop", "--seed", "0", "--epochs", "2"]
    commands = {"diffexp s0": ("diffexp.py", argv, str(tmp_path / "diffexp-s0")),
                "premise": ("replicate.py", ["--premise-of", "alignprop"], str(tmp_path / "alignprop")),
                "trl s0": ("replicate.py", [*argv, "--run-peer", "trl"], str(tmp_path / "trl-s0"))}
    logged = {"diffexp-s0": [0, 1], "alignprop": [], "trl-s0": [0, 1, 2]}  # the epochs each stand-in logs
    real_popen = subprocess.Popen

    def popen(command, **kw):
        run_dir = command[command.index("--out") + 1]
        os.makedirs(run_dir)
        for epoch in logged[os.path.basename(run_dir)]:
            runs.append_log(run_dir, dict(epoch=epoch, reward_queries=4 * epoch))
        return real_popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(replicate.subprocess, "Popen", popen)
    with pytest.raises(RuntimeError, match="run diffexp s0 stopped after epoch 1 "):
        replicate.run_in_parallel(commands, parallel=1)
    assert not os.path.exists(commands["diffexp s0"][2] + ".done")
    del commands["diffexp s0"]
    replicate.run_in_parallel(commands, parallel=1)
    assert all(os.path.exists(run_dir + ".done") for _, _, run_dir in commands.values())


def test_a_race_counts_every_seed_censored_at_the_budget_on_a_log_scale():
    """The queries ratio and the area ratio, hand-computed: a seed whose arm never reaches the level counts at the
    budget (the ratio is then a bound, and says so), ratios are averaged as logs, 2 seeds give values, not an
    interval."""
    ratio = replicate.censored_ratio([100, 300, None], [100, 150, 200], budget=400)  # DiffExp never got there on one
    logs = np.log([1.0, 2.0, 2.0])  # 100/100, 300/150, 400/200
    half = 4.303 * logs.std(ddof=1) / np.sqrt(3)  # Student's t, 2 degrees of freedom
    assert ratio["per_seed"] == [1.0, 2.0, 2.0] and ratio["censored"] == dict(compared=1, baseline=0)
    assert (ratio["mean"], ratio["low"], ratio["high"]) == pytest.approx(
        (np.exp(logs.mean()), np.exp(logs.mean() - half), np.exp(logs.mean() + half)))
    assert replicate.ratio_text(ratio, "DiffExp") == (
        f">= 1.59 [{np.exp(logs.mean() - half):.2f}, {np.exp(logs.mean() + half):.2f}] (3 seeds; never reached by "
        "DiffExp on 1, counted at the budget)")
    baseline_censored = replicate.censored_ratio([100, 100, 200], [100, None, 200], budget=400)
    assert replicate.ratio_text(baseline_censored, "DiffExp").startswith("<= 0.63 [")
    assert replicate.ratio_text(replicate.censored_ratio([100, 200], [100, 100], budget=400), "DiffExp") == (
        "per seed 1.00, 2.00 (2 seeds, no interval)")
    # a curve's first point is the starting model's: the evaluation at 0 queries, and the first batch of training
    # samples (drawn before the first update; a lucky draw of prompts can lie above the level) alike
    assert replicate.first_reach([0, 100, 200], [0.9, 0.6, 0.8], level=0.7) == 200
    assert replicate.first_reach([128, 256, 384], [0.9, 0.6, 0.65], level=0.7) is None
    # the area under the gain over the start, by trapezoids, over the budget: (0 + 0.2) / 2 * 100 + (0.2 + 0.4) / 2 *
    # 100 = 40, over 200 queries
    assert replicate.gain_area([0, 100, 200], [0.5, 0.7, 0.9], start=0.5) == pytest.approx(0.2)
    # ... over the baseline's start of the same seed where the compared arm starts lower (the training samples of an
    # exploring sampler): (-0.1 + 0.2) / 2 * 100 + (0.2 + 0.4) / 2 * 100 = 35, over 200 queries
    assert replicate.gain_area([0, 100, 200], [0.4, 0.7, 0.9], start=0.5) == pytest.approx(0.175)


def a_setting(kind, distance, low, judge, bold):
    """A sweep's setting with the differences from plain sampling that the rule reads."""
    difference = dict(distance=dict(mean=distance, low=low, high=distance + 1), judge=dict(mean=judge),
                      bold=dict(mean=bold))
    return dict(kind=kind, setting=dict(w_low=distance), difference=difference)


def test_the_premise_rule_takes_the_most_diverse_setting_that_keeps_quality():
    """The rule, written before any training run: among the settings whose judge and bold means fall by at most 0.03
    and whose pairwise distance rises (its interval above zero), the most diverse; if none, the more diverse setting
    with the smallest quality loss."""
    settings = [a_setting("Eq. 7", 3.0, 2.0, -0.01, -0.05),  # the most diverse, but bold falls by 0.05
                a_setting("Eq. 7", 2.0, 1.0, -0.03, +0.02),  # keeps quality (a fall of exactly 0.03 is kept)
                a_setting("Eq. 8", 2.5, -0.1, 0.0, 0.0),  # more diverse on average, not surely: its interval has 0
                a_setting("both", 1.0, 0.5, +0.01, 0.0)]
    choice, verdict = replicate.premise_choice(settings)
    assert choice is settings[1] and verdict == "keeps the premise"
    assert replicate.best_of_kind(settings, "Eq. 7", 1) == [settings[1]]
    lossy = [a_setting("Eq. 7", 3.0, 2.0, -0.04, -0.05), a_setting("Eq. 8", 2.0, 1.0, -0.10, 0.0),
             a_setting("both", 1.0, -0.5, 0.0, 0.0)]
    choice, verdict = replicate.premise_choice(lossy)
    assert choice is lossy[0] and verdict == "closest to the premise"  # a loss of 0.05 beats 0.10
    with pytest.raises(ValueError, match="no setting is more diverse than plain sampling"):
        replicate.premise_choice([a_setting("Eq. 7", 1.0, -0.5, 0.0, 0.0)])


def test_the_shapes_models_exploration_is_the_premise_sweeps_choice():
    """Each method's exploration on the shapes model is what the rule chooses from the committed sweep, whose
    differences and intervals follow from its per-prompt values; figures/README.md shows the sweep's tables."""
    sweep = json.load(open(os.path.join(HERE, "figures", "premise.json")))
    assert list(sweep["samplers"]) == ["ddpo", "alignprop"]
    for method, measured in sweep["samplers"].items():
        for setting in measured["settings"]:
            for metric, difference in setting["difference"].items():
                per_prompt = np.subtract(setting["per_prompt"][metric], measured["plain"]["per_prompt"][metric])
                assert len(per_prompt) == 36 and differences(replicate.bootstrap(per_prompt), difference) == []
        choice, verdict = replicate.premise_choice(measured["settings"])
        assert measured["choice"] == dict(setting=choice["setting"], verdict=verdict)
        args = runs.parse_args(["--model", "shapes", "--method", method, *UNUSED_OUT])
        defaults = {k: getattr(args, k) for k in ("w_low", "t_thres", "alpha_min", "alpha_max")}
        assert differences(defaults, choice["setting"]) == []  # to rounding: the file may come from another CPU
    full = open(os.path.join(HERE, "figures", "README.md"), encoding="utf-8").read()
    assert replicate.premise_markdown(sweep) in full and "premise.png" in full


def test_the_premise_sweep_measures_settings_against_plain_sampling_on_the_same_noise(tmp_path, monkeypatch):
    """replicate.premise_sweep at a tiny size (2 prompts, 2 settings of Eq. 7 and 2 of Eq. 8): a setting that changes
    nothing (w_low = w_high, alpha 1) differs from plain by rounding alone, as it draws the same noise (Eq. 8 at
    alpha 1 recomputes the embedding in fp32); the sweep's choice is the rule's."""
    monkeypatch.setattr(replicate, "PREMISE_EQ7", [(5.0, 900), (0.0, 600)])
    monkeypatch.setattr(replicate, "PREMISE_EQ8", (1.1, 2.0))
    monkeypatch.setattr(replicate, "PREMISE_COMBINED", 1)
    real_load = runs.load_prompts
    monkeypatch.setattr(runs, "load_prompts", lambda name: real_load(name)[:2])
    sweep = replicate.premise_sweep("ddpo", str(tmp_path))
    assert json.load(open(tmp_path / "premise.json")) == json.loads(json.dumps(sweep))
    kinds = [s["kind"] for s in sweep["settings"]]
    assert kinds == ["SD 1.5 default", "Eq. 7", "Eq. 7", "Eq. 8", "Eq. 8", "both"]
    unchanged, changed = sweep["settings"][1:3]  # w_low 5 = w_high, alpha 1; and w_low 0 for t > 600
    assert all(abs(d["mean"]) < 1e-3 for d in unchanged["difference"].values()), unchanged["difference"]
    assert changed["difference"]["distance"]["mean"] > 0.5
    choice, verdict = replicate.premise_choice(sweep["settings"])
    assert sweep["choice"] == dict(setting=choice["setting"], verdict=verdict)


def test_the_peer_runs_only_what_it_implements_and_says_how_to_install_it(tmp_path, monkeypatch):
    """`replicate.py --peer trl` compares TRL's DDPOTrainer with our DDPO without exploration: any other arm is refused
    in one sentence, and without trl on the path the error says how to install it apart (trl is never a dependency)."""
    shapes_ddpo = ["--model", "shapes", "--method", "ddpo", "--reward", "bold", "--out", str(tmp_path / "run")]
    for refused in (["--device", "cpu"], ["--no-explore"], ["--no-explore", "--device", "cpu", "--lora-rank", "8"],
                    ["--method", "alignprop", "--no-explore", "--device", "cpu"],
                    ["--no-explore", "--device", "cpu", "--eval-explored"]):
        with pytest.raises(ValueError, match="--peer trl compares DDPO without exploration"):
            replicate.run_peer("trl", shapes_ddpo + refused)
    for method, ablation in (("alignprop", None), ("ddpo", "eq7")):  # refused before any run starts
        with pytest.raises(ValueError, match="--peer trl compares DDPO without exploration"):
            replicate.replicate(method, 2, str(tmp_path / "replication"), ablation=ablation, peer="trl")
    assert not os.path.exists(tmp_path / "replication")
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    with pytest.raises(RuntimeError, match="pip install --no-deps --target DIR trl==0.23.1"):
        replicate.run_peer("trl", shapes_ddpo + ["--no-explore", "--device", "cpu"])


def draw_other_style(attributes, rng, size):
    """A second way of drawing a caption, not shapes.py's: PIL's ellipse and polygons on a canvas 4x the size, shrunk
    with a Lanczos filter; other radii, squares turned by up to 10 degrees, isosceles triangles, a stronger colour
    jitter, and any image size. [3, size, size] in [0, 1]."""
    from PIL import ImageDraw

    S = 4 * size
    jitter = lambda name: tuple(int(round(255 * float(np.clip(c + rng.uniform(-0.07, 0.07), 0, 1))))
                                for c in shapes.PALETTE_RGB[name])
    canvas = Image.new("RGB", (S, S), jitter(attributes["background"] or "grey"))
    pen, colour, n = ImageDraw.Draw(canvas), jitter(attributes["colour"]), attributes["count"]
    lo, hi = {1: {"small": (0.09, 0.14), "": (0.10, 0.26), "large": (0.2, 0.29)},
              2: {"small": (0.09, 0.13), "": (0.1, 0.16), "large": (0.15, 0.18)}}[n][attributes["size"]]
    while True:  # non-overlapping positions
        r = rng.uniform(lo, hi, size=n) * S
        margin = 1.15 * r + 0.03 * S
        x, y = rng.uniform(margin, S - margin), rng.uniform(margin, S - margin)
        if n == 1 or math.hypot(x[0] - x[1], y[0] - y[1]) > 1.2 * (r[0] + r[1]) + 0.03 * S:
            break
    for cx, cy, rr in zip(x, y, r):
        if attributes["shape"] == "circle":
            pen.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=colour)
        elif attributes["shape"] == "square":
            a, h = math.radians(rng.uniform(-10, 10)), 0.85 * rr
            pen.polygon([(cx + h * (math.cos(a) * u - math.sin(a) * v), cy + h * (math.sin(a) * u + math.cos(a) * v))
                         for u, v in ((-1, -1), (1, -1), (1, 1), (-1, 1))], fill=colour)
        else:
            pen.polygon([(cx, cy - 1.1 * rr), (cx - 1.05 * rr, cy + 0.8 * rr), (cx + 1.05 * rr, cy + 0.8 * rr)],
                        fill=colour)
    return (torch.from_numpy(np.asarray(canvas.resize((size, size), Image.LANCZOS)).copy())
            .permute(2, 0, 1).float() / 255)  # HWC -> CHW


def caption_ranking(fn, images, attributes):
    """The fractions of images whose own caption scores above every caption with the shape changed, and above every
    caption with the colour changed."""
    own = fn(images, [shapes.caption_of(**a) for a in attributes])
    right = {"shape": [], "colour": []}
    for k, a in enumerate(attributes):
        for name, values in (("shape", shapes.SHAPES), ("colour", shapes.COLOURS)):
            others = [shapes.caption_of(**(a | {name: v})) for v in values if v != a[name]]
            right[name].append(bool((own[k] > fn(images[k : k + 1].expand(len(others), -1, -1, -1), others)).all()))
    return np.mean(right["shape"]), np.mean(right["colour"])


def test_fidelity_ranks_an_images_own_caption_first_in_two_drawing_styles():
    fidelity = rewards.load_reward("fidelity", "cpu", torch.float32)
    rng = np.random.default_rng(123)  # not a seed the scorer was trained on
    attributes = [shapes.random_attributes(rng) for _ in range(300)]
    images = torch.from_numpy(np.stack([shapes.draw(a, rng) for a in attributes]))
    with torch.no_grad():
        shape, colour = caption_ranking(fidelity, images, attributes)
        assert shape >= 0.95 and colour >= 0.95, (shape, colour)  # measured: 100%, 100%
        for size in (32, 64):  # drawn by another renderer, at two image sizes; measured: 98-99% and 100%
            attributes = [shapes.random_attributes(rng) for _ in range(300)]
            images = torch.stack([draw_other_style(a, rng, size) for a in attributes])
            shape, colour = caption_ranking(fidelity, images, attributes)
            assert shape >= 0.95 and colour >= 0.95, (size, shape, colour)


def test_fidelity_agrees_with_the_judge_on_the_shipped_models_samples():
    """On the model's own samples (96, every prompt of [shapes] and [unseen_shapes] twice, AlignProp's sampling), the
    mean fidelity is the judge's whole-caption accuracy within 0.1 (measured: 0.589 and 0.521)."""
    p = diffexp.load_pipeline("shapes", 4, "cpu", torch.float32)
    p.scheduler.set_timesteps(20)
    prompts = (runs.load_prompts("shapes") + runs.load_prompts("unseen_shapes")) * 2
    with torch.no_grad():
        images = torch.cat([diffexp.sample_batch(p, prompts[k : k + 32], torch.Generator().manual_seed(k),
                                                 w_high=7.5, eta=0.0)["images"]
                            for k in range(0, len(prompts), 32)])
        fidelity = rewards.load_reward("fidelity", "cpu", torch.float32)(images, prompts)
    whole = [all(r[k] == v for k, v in shapes.parse_caption(c).items() if v is not None)
             for c, r in zip(prompts, shapes.judge(images))]
    assert abs(fidelity.mean().item() - np.mean(whole)) <= 0.1, (fidelity.mean().item(), np.mean(whole))
    assert 0 <= fidelity.min() and fidelity.max() <= 1


def test_fidelity_is_differentiable_and_its_scorer_trains_deterministically(tmp_path):
    fidelity = rewards.load_reward("fidelity", "cpu", torch.float32)
    assert fidelity.differentiable and not any(p.requires_grad for net in fidelity.networks for p in net.parameters())
    x = torch.from_numpy(shapes.draw(dict(colour="red", shape="circle", count=1, size="", background=None),
                                     np.random.default_rng(0)))[None]
    x.requires_grad_(True)
    fidelity(x, ["a red circle"]).sum().backward()
    assert x.grad.abs().sum() > 0
    for name in ("a", "b"):
        shapes.train_fidelity(str(tmp_path / name), seed=3, steps=3, batch_size=8)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / n) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.getsize(shapes.FIDELITY_WEIGHTS) < 2e6  # shipped beside the shapes model


def test_runs_on_a_shapes_reward_are_also_read_by_the_judge(tmp_path, capsys):
    """The judge scores every evaluation of a shapes-world reward, in the log and in the grids' captions: a reward that
    rises while the judge falls is being hacked."""
    run = str(tmp_path / "run")
    diffexp.main(["--method", "alignprop", "--reward", "colour", "--model", "shapes", "--steps", "2",
                  "--batch-size", "4", "--micro-batch-size", "4", "--train-batch-size", "4", "--epochs", "1",
                  "--eval-every", "1", "--out", run])
    rows = read_log(run)
    assert all({"eval_seen_colour", "eval_unseen_colour", "eval_seen_shapes_judge", "eval_unseen_shapes_judge"}
               <= set(r) for r in rows)
    assert "eval_unseen_shapes_judge" in capsys.readouterr().out.splitlines()[-1]  # the summary line too
    args = runs.parse_args(["--model", "shapes", "--steps", "2", "--batch-size", "4", "--micro-batch-size", "4",
                            "--train-batch-size", "4", *UNUSED_OUT])
    p = diffexp.load_pipeline("shapes", 4, "cpu", torch.float32)
    p.scheduler.set_timesteps(2)
    fns = {name: rewards.load_reward(name, "cpu", torch.float32) for name in ("fidelity", "shapes_judge")}
    _, shown = diffexp.evaluate(p, fns, {"unseen": runs.load_prompts("unseen_shapes")}, args, 1)
    assert all(set(scores) == {"fidelity", "shapes_judge"} for *_, scores in shown["unseen"])  # what each caption shows


# figures/headline_NAME.json: the replications on bold, the peer, then the harder task and the hacked reward
PUBLISHED = ["alignprop-bold", "alignprop-bold-rule-t900", "alignprop-bold-rule-t800", "alignprop-bold-rule-t700",
             "alignprop-bold-sd15", "ddpo-bold", "ddpo-bold-sd15", "alignprop-bold-eq7", "alignprop-bold-eq8",
             "alignprop-bold-t600", "ddpo-bold-trl", "alignprop-fidelity", "ddpo-fidelity", "alignprop-fidelity-eq7",
             "alignprop-fidelity-eq8", "alignprop-colour"]


def differences(computed, committed, where="", rel=1e-9):
    """Where two JSON trees differ: their structure and text exactly, their floats beyond a relative `rel` (and 1e-12
    absolute). Numbers committed from one CPU and computed on another agree to rounding, not to the bit."""
    if isinstance(committed, dict) and isinstance(computed, dict) and computed.keys() == committed.keys():
        return [d for k in committed for d in differences(computed[k], committed[k], f"{where}/{k}", rel)]
    if isinstance(committed, list) and isinstance(computed, list) and len(computed) == len(committed):
        return [d for k, (a, b) in enumerate(zip(computed, committed)) for d in differences(a, b, f"{where}[{k}]", rel)]
    if isinstance(committed, float) and isinstance(computed, (int, float)) and not isinstance(computed, bool):
        return [] if computed == pytest.approx(committed, rel=rel, abs=1e-12) else [f"{where}: {computed} {committed}"]
    return [] if computed == committed else [f"{where}: {computed!r} {committed!r}"]


def report_errors(published, readme, full):
    """What the READMEs fail to report of the results files {name: results}: figures/README.md holds every file's
    tables as `replicate.py --redraw` prints them, under an anchor of its name, with its figures beside it; the README's
    headline table has a row per file, as replicate.headline() writes it (a peer's in a table of its own); every
    file's statistics are what replicate.derive() gives from its curves today, to rounding."""
    errors = []
    if replicate.HEADLINE not in readme or replicate.HEADLINE_PEER not in readme:
        errors.append("the README's headline tables have other columns")
    for name, results in published.items():
        errors += [f"{name}: derived {d}" for d in differences(replicate.derive(copy.deepcopy(results)), results)]
        if f"\n## {name}\n" not in full or replicate.markdown(results) not in full:
            errors.append(f"{name}: figures/README.md")
        if replicate.headline(name, results) not in readme:
            errors.append(f"{name}: README")
    return errors


def test_the_readmes_report_the_committed_results():
    """The READMEs report every committed results file (report_errors), and go on doing so where the files' floats
    differ in their last bit (another CPU's, simulated: every float but an exact zero one ulp up), but not where a
    printed digit changes: a curve's value (its statistics no longer derive from it), a statistic (its table row is
    not the README's) or a digit of the README."""
    readme, full = (open(os.path.join(HERE, *path), encoding="utf-8").read()
                    for path in (["README.md"], ["figures", "README.md"]))
    published = {name: json.load(open(os.path.join(HERE, "figures", f"headline_{name}.json"))) for name in PUBLISHED}
    assert report_errors(published, readme, full) == []
    for name in PUBLISHED:
        figures = ("curves",) if name.endswith("-trl") else ("curves", "diversity")
        figures += ("samplers",) if published[name]["samplers"] else ()
        for figure in figures:
            path = os.path.join(HERE, "figures", f"headline_{name}_{figure}.png")
            assert os.path.getsize(path) < 300_000 and f"headline_{name}_{figure}.png" in full, path

    def ulp_up(tree):
        if isinstance(tree, dict):
            return {k: ulp_up(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [ulp_up(v) for v in tree]
        return float(np.nextafter(tree, np.inf)) if isinstance(tree, float) and tree != 0 else tree  # 0 is exact

    assert report_errors({name: ulp_up(r) for name, r in published.items()}, readme, full) == []
    curve, moved = copy.deepcopy(published["alignprop-bold"]), copy.deepcopy(published["alignprop-bold"])
    curve["curves"]["diffexp/eval_unseen_bold"]["per_seed"][0][-1] += 0.01
    moved["paired"]["final eval_unseen_bold"]["mean"] += 0.001  # the README's third decimal
    for changed in (curve, moved):
        assert report_errors({"alignprop-bold": changed}, readme, full) != []
    # ... and a digit of either README: the judge's last in the headline row, the last in figures/README.md's tables
    row = replicate.headline("alignprop-bold", published["alignprop-bold"])
    bumped = re.sub(r"\d(?=\] \|$)", lambda digit: str((int(digit.group()) + 1) % 10), row)
    assert bumped != row and report_errors(published, readme.replace(row, bumped), full) != []
    tables = replicate.markdown(published["alignprop-bold"])
    bumped = re.sub(r"\d(?=\D*$)", lambda digit: str((int(digit.group()) + 1) % 10), tables)
    assert bumped != tables and report_errors(published, readme, full.replace(tables, bumped)) != []


DOSE_FILES = ["alignprop-bold-rule-t900", "alignprop-bold-rule-t800", "alignprop-bold-rule-t700", "alignprop-bold"]


def test_the_dose_puts_each_files_ratios_at_its_steps_at_w_low(tmp_path):
    """The t_thres dose (the paper's Fig. 9b): each committed file's queries ratio at 75% of the baseline's gain and
    its area ratio, both readings, at its number of denoising steps at w_low (t > t_thres among the 20 steps: 2, 4, 6
    and 8 for t_thres 900 to 600), as figures/README.md shows them; files whose settings differ are refused."""
    files = [os.path.join(HERE, "figures", f"headline_{name}.json") for name in DOSE_FILES]
    path, points = replicate.draw_dose(files, str(tmp_path))
    assert path == str(tmp_path / "dose_alignprop-bold.png") and os.path.getsize(path) > 0
    for (panel, metric), drawn in points.items():
        assert [steps for steps, _ in drawn] == [2, 4, 6, 8]
        for (_, ratio), name in zip(drawn, DOSE_FILES):
            results = json.load(open(os.path.join(HERE, "figures", f"headline_{name}.json")))
            expected = results["area"][metric] if panel == "area" else results["table"][metric][1]["ratio"]
            assert ratio == expected and results["table"][metric][1]["fraction"] == 0.75
    full = open(os.path.join(HERE, "figures", "README.md"), encoding="utf-8").read()
    assert replicate.dose_markdown(points) in full and "(dose_alignprop-bold.png)" in full
    assert os.path.getsize(os.path.join(HERE, "figures", "dose_alignprop-bold.png")) < 300_000
    first = json.load(open(files[0]))
    others = {"settings": first | dict(settings=["--method", "alignprop", "--lr", "0.5"]),
              "alpha": first | dict(exploration=first["exploration"] | dict(alpha_max=2.0, t_thres=500)),
              "t_thres": first}  # the same t_thres twice
    for name, other in others.items():
        json.dump(other, open(tmp_path / f"{name}.json", "w"))
        with pytest.raises(ValueError, match="must share their settings and exploration but for t_thres, and differ"):
            replicate.dose_points([*files, str(tmp_path / f"{name}.json")])
    with pytest.raises(ValueError, match="cannot read /no/such.json as a results file"):
        replicate.dose_points([*files, "/no/such.json"])


def test_queries_are_counted_only_to_a_gain_beyond_the_seeds_spread():
    """A baseline whose mean moves less than its seeds' spread has no gain whose fractions could be reached: the table
    says so instead of counting queries to noise (a seed that starts above a level would "reach" it at 0 queries)."""
    results = json.load(open(os.path.join(HERE, "figures", "headline_ddpo-fidelity.json")))
    curve = results["curves"]["baseline/eval_unseen_fidelity"]
    assert curve["mean"][-1] - curve["mean"][0] <= results["final"]["baseline/eval_unseen_fidelity"]["std"]
    rows = replicate.markdown(results).splitlines()
    assert rows[3].startswith("| evaluation, unseen prompts | no gain: the baseline's mean moved by")
    held_out = lambda row: row.split(" | ")[5:7]  # the held-out prompts' queries and area cells
    assert held_out(replicate.headline("ddpo-fidelity", results)) == ["no gain (+0.002)", "no gain"]
    shifted = copy.deepcopy(results)  # the same runs with the baseline's last point raised well beyond the spread
    shifted["curves"]["baseline/eval_unseen_fidelity"]["mean"][-1] += 0.2
    assert "no gain" not in replicate.markdown(shifted).splitlines()[3]
    assert not any("no gain" in cell for cell in held_out(replicate.headline("ddpo-fidelity", shifted)))


def test_a_published_curve_reproduces_from_the_committed_code(tmp_path):
    """Seed 0 of the baseline arm of the published AlignProp replication on bold, rerun at its committed settings up
    to its first evaluation after epoch 0, gives the committed numbers: the training reward and every evaluation the
    file holds (the reward and the judge, under each sampler it was read with), to 1e-5 (the published runs used one
    thread; this process's threads, or another CPU's kernels, change the last bits)."""
    results = json.load(open(os.path.join(HERE, "figures", "headline_alignprop-bold.json")))
    settings = results["settings"]
    epochs = settings[settings.index("--eval-every") + 1]
    run = str(tmp_path / "run")
    diffexp.main(["--model", "shapes", "--seed", "0", *settings, *results["evaluation"], "--no-explore", "--epochs",
                  epochs, "--out", run])
    rows = read_log(run)
    metrics = [key.split("/")[1] for key in results["curves"] if key.startswith("baseline/")]
    assert {"reward_mean", "eval_unseen_bold", "eval_unseen_explored_bold"} <= set(metrics)
    for metric in metrics:
        published = results["curves"][f"baseline/{metric}"]
        rerun = [(r["reward_queries"], r[metric]) for r in rows if metric in r]
        assert len(rerun) >= 1 and [q for q, _ in rerun] == published["queries"][: len(rerun)]
        assert [v for _, v in rerun] == pytest.approx(published["per_seed"][0][: len(rerun)], abs=1e-5), metric


def large_drawing_and_its_gamings(colour, shape, background, rng):
    """A fresh drawing of the grammar's largest size ("large") and the ways of gaming a size-and-background reward seen
    so far, each built from it: {name: image [3, 32, 32]}."""
    legit = torch.from_numpy(shapes.draw(dict(colour=colour, shape=shape, count=1, size="large", background=background),
                                         rng))
    c, b = (torch.tensor(shapes.PALETTE_RGB[name])[:, None, None] for name in (colour, background or "grey"))
    on_background = (legit - b).norm(dim=0) < 0.15  # [32, 32]
    g = torch.Generator().manual_seed(0)
    specks = (torch.rand(32, 32, generator=g) < 0.15) & on_background  # 15% of the background, single pixels
    framed, speckled, coloured_specks = legit.clone(), legit.clone(), legit.clone()
    framed[:, :2], framed[:, -2:], framed[:, :, :2], framed[:, :, -2:] = c, c, c, c  # a frame 2 pixels wide
    speckled[:, specks] = torch.rand(3, int(specks.sum()), generator=g)
    coloured_specks[:, specks] = c.expand(3, 32, 32)[:, specks]
    small = torch.from_numpy(shapes.draw(dict(colour=colour, shape=shape, count=1, size="small", background=background),
                                         rng))
    dusted = small.clone()  # a small shape, and the colour's area made up with specks of it
    dust = (torch.rand(32, 32, generator=g) < 0.3) & ((small - b).norm(dim=0) < 0.15)
    dusted[:, dust] = c.expand(3, 32, 32)[:, dust]
    tinted = torch.where(on_background, legit + 0.15 * (c - b) / (c - b).norm(), legit)  # twice the colour jitter
    return dict(legit=legit, filled=c.expand(3, 32, 32), framed=framed, tinted=tinted, speckled=speckled,
                coloured_specks=coloured_specks, small_and_dust=dusted)


def test_bold_scores_large_drawings_above_every_way_to_game_it():
    """bold's optimum is a legitimate drawing: fresh drawings of the grammar's largest size ("large") score at least
    0.95 (as drawn, at 64 px, and through the shapes model's VAE, whose images the model can reach), and each way of
    gaming it seen so far scores below such a drawing; a large drawing of another shape never scores above it."""
    bold = rewards.load_reward("bold", "cpu", torch.float32)
    vae = diffexp.load_pipeline("shapes", 4, "cpu", torch.float32).vae
    rng, cases = np.random.default_rng(21), []
    for k, colour in enumerate(shapes.COLOURS):
        for j, shape in enumerate(shapes.SHAPES):
            background = [None, list(shapes.COLOURS)[(k + j + 1) % 8], list(shapes.COLOURS)[(k + 4) % 8]][j]
            cases.append((shapes.caption_of(colour, shape, background=background),
                          large_drawing_and_its_gamings(colour, shape, background, rng), shape, background))
    with torch.no_grad():
        for caption, images, shape, background in cases:
            scores = dict(zip(images, bold(torch.stack(list(images.values())), [caption] * len(images)).tolist()))
            legit = scores.pop("legit")
            assert legit >= 0.95 and all(score < legit - 0.1 for score in scores.values()), (caption, legit, scores)
            x = images["legit"][None]
            big = F.interpolate(x, size=64, mode="bilinear", align_corners=False)  # the same drawing at 64 px
            decoded = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
            assert bold(big, [caption]).item() >= 0.95 and bold(decoded, [caption]).item() >= 0.95, caption
            wanted = shapes.parse_caption(caption)
            others = [torch.from_numpy(shapes.draw(wanted | dict(shape=s, size="large"), rng))
                      for s in shapes.SHAPES if s != shape]
            assert bold(torch.stack(others), [caption] * 2).max() <= legit + 0.01, caption


def test_bold_reads_one_shape_of_any_unsmall_size_refuses_the_rest_and_is_differentiable(capsys):
    bold = rewards.load_reward("bold", "cpu", torch.float32)
    assert bold.differentiable and bold.networks == ()
    rng = np.random.default_rng(3)
    x = torch.from_numpy(shapes.draw(dict(colour="red", shape="circle", count=1, size="", background="white"), rng))
    x = x[None].requires_grad_(True)
    assert bold(x, ["a red circle on a white background"]).item() > 0.1
    assert bold(x, ["a blue circle on a white background"]).item() < 0.01  # another colour is no coverage
    assert bold(x, ["a red circle"]).item() < 0.01  # a white background where grey is wanted
    bold(x, ["a red circle on a white background"]).sum().backward()
    assert x.grad.abs().sum() > 0
    for prompt in ("two red circles", "a small red circle", "a small, red circle", "a cat",
                   "a red circle on a red background"):
        with pytest.raises(ValueError, match="bold rewards one large shape|names no colour or no shape|nothing to see"):
            bold(x.detach(), [prompt])
    with pytest.raises(SystemExit):
        runs.parse_args(["--model", "shapes", "--reward", "bold", "--prompts", "shapes", *UNUSED_OUT])
    assert "bold rewards one large shape, and prompt 'two red circles' asks for two" in capsys.readouterr().err


def test_shapes_rewards_read_the_prompt():
    rng = np.random.default_rng(7)
    red = dict(colour="red", shape="circle", count=1, size="large", background="white")
    image = torch.from_numpy(shapes.draw(red, rng))[None]  # [1, 3, 32, 32]
    colour, judge = (rewards.load_reward(name, "cpu", torch.float32) for name in ("colour", "shapes_judge"))
    assert colour.differentiable and not judge.differentiable
    area = torch.from_numpy(shapes.coverage("circle", 16, 16, 9.5)).mean()  # a large circle covers about a quarter
    assert colour(image, ["a red circle"]).item() > 0.1 and colour(image, ["a blue circle"]).item() < 0.01
    prompts = ["a red circle", "a red square", "two blue squares", "a red circle on a black background"]
    assert judge(image.expand(4, -1, -1, -1), prompts).tolist() == pytest.approx([1.0, 2 / 3, 0.0, 0.75])
    x = image.clone().requires_grad_(True)
    colour(x, ["a red circle"]).sum().backward()
    assert x.grad.abs().sum() > 0 and area > 0.1
    with pytest.raises(ValueError, match="names no colour or no shape"):
        judge(image, ["a cat"])


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


def test_aesthetic_head_of_another_shape_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "head.pth"
    torch.save({"layers.0.weight": torch.zeros(1, 1)}, path)
    monkeypatch.setenv("DIFFEXP_AESTHETIC_HEAD", str(path))
    with pytest.raises(ValueError, match="not the LAION aesthetic predictor"):
        rewards.load_reward("aesthetic", "cpu", torch.float32)
    # a ViT-B/32 head: 512 inputs
    head = {k: torch.zeros_like(v) for k, v in rewards._aesthetic_mlp(512).state_dict().items()}
    torch.save(head, path)
    with pytest.raises(ValueError, match="takes 512 inputs, not the 768 of CLIP ViT-L/14"):
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


# ---------------------------------------------------------------------------------------------
# The real architectures at full size, random weights: SD 1.5 and the reward models through the real loading code.
# Only the downloads are replaced: SD 1.5 is saved to a directory (--model DIR), and the reward models' files are
# put into a Hugging Face cache of our own (HF_HUB_CACHE, HF_HUB_OFFLINE=1) under their real repository names.


def random_fp16(make, seed):
    """The module make() builds, built on the meta device (no memory, no initialisation), then given fp16 storage and
    random weights in the manner of PyTorch's defaults: matrices and kernels U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    norms' weights 1 and biases 0, other biases 0, other vectors N(0, 0.02). A few seconds, where the default
    initialisation of a billion parameters and their fp16 copy take half a minute."""
    with torch.device("meta"):
        module = make()
    module = module.to(torch.float16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.dim() >= 2:
                    bound = p[0].numel() ** -0.5  # 1 / sqrt(fan_in)
                    p.uniform_(-bound, bound, generator=generator)
                elif name == "bias":
                    p.zero_()
                else:
                    p.normal_(0, 0.02, generator=generator)
    return module


def build_sd15(path, sample_size):
    """SD 1.5's published architecture with random weights (UNet 320/640/1280/1280, 2 layers per block, cross-attention
    768, 8 heads; VAE 128/256/512/512, scaling 0.18215; CLIP ViT-L/14 text encoder), saved in fp16. sample_size is
    the default latent size only (64 at 512 px): a smaller one keeps a CPU run short without changing a weight."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = random_fp16(lambda: UNet2DConditionModel(sample_size=sample_size, block_out_channels=(320, 640, 1280, 1280),
                                                    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8),
                       seed=0)
    vae = random_fp16(lambda: AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                            latent_channels=4, sample_size=512, scaling_factor=0.18215,
                                            down_block_types=("DownEncoderBlock2D",) * 4,
                                            up_block_types=("UpDecoderBlock2D",) * 4), seed=1)
    text_encoder = random_fp16(lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407)), seed=2)
    with torch.no_grad():  # keep a random decoder's images inside [-1, 1], where decode_latents' clamp passes
        vae.decoder.conv_out.weight *= 1e-3  # gradients to the LoRA: the last layer is scaled down (same architecture)
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder)]
    assert [round(c / 1e6, 1) for c in counts] == [859.5, 83.7, 123.1]  # SD 1.5's published parameter counts
    # the hub's SD 1.5 scheduler_config.json: PNDM, which keeps "clip_sample": false for the DDIM that load_pipeline
    # swaps in (DDIM's own default clips x_0 to [-1, 1], which would wreck SD's latents: it is refused)
    scheduler = PNDMScheduler.from_config(dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                                               num_train_timesteps=1000, trained_betas=None, clip_sample=False))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=shapes.clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)


def build_reward_hub(cache):
    """The reward models' files, random weights in their real architectures, in a Hugging Face cache under their
    real repository ids and file names, so that rewards.py fetches them exactly as from the hub."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    def snapshot(repo):
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        return folder / "snapshots" / ("0" * 40)

    torch.manual_seed(1)
    head = rewards._aesthetic_mlp(768).state_dict()  # the LAION MLP: keys layers.0/2/4/6/7
    torch.save(head, snapshot(rewards.AESTHETIC_HEAD_REPO) / rewards.AESTHETIC_HEAD_FILE)
    vit_l = random_fp16(lambda: open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True,
                                                       device="meta"), seed=3)
    save_file({k: v.contiguous() for k, v in vit_l.state_dict().items()},
              snapshot("timm/vit_large_patch14_clip_224.openai") / "open_clip_model.safetensors")
    del vit_l
    vit_h = random_fp16(lambda: open_clip.create_model("ViT-H-14", pretrained=None, device="meta"), seed=4)
    torch.save(dict(state_dict=vit_h.state_dict()), snapshot("xswu/HPSv2") / "HPS_v2.1_compressed.pt")  # HPS v2.1's
    del vit_h
    text = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                hidden_act="gelu")
    vision = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, patch_size=14,
                  image_size=224, hidden_act="gelu")
    # CLIP ViT-H/14, as PickScore_v1
    pickscore = random_fp16(lambda: CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)),
                            seed=5)
    assert round(sum(p.numel() for p in pickscore.parameters()) / 1e6) == 986
    pickscore.save_pretrained(snapshot("yuvalkirstain/PickScore_v1"))
    del pickscore
    laion = snapshot("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")  # its tokenizer files and config.json, as on the hub
    shapes.clip_tokenizer().save_pretrained(laion)
    CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024).save_pretrained(laion)


def test_full_size_sd15_and_reward_models_train_end_to_end(tmp_path):
    """One AlignProp epoch with the hps+aesthetic+pickscore ensemble (every reward model, loaded as from the hub, in its
    real architecture) and one DDPO epoch with the aesthetic reward, through the CLI, on SD 1.5's architecture (at
    128 px, one DDIM step: the weights are those of 512 px)."""
    build_sd15(tmp_path / "sd15", sample_size=16)
    build_reward_hub(tmp_path / "hub")
    env = dict(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    small = ["--model", str(tmp_path / "sd15"), "--steps", "1", "--micro-batch-size", "1", "--epochs", "1",
             "--eval-every", "0"]
    # DDPO needs two samples: the advantage of a lone sample, (r - mean) / std, is 0
    for method, reward, n in (("alignprop", "hps+aesthetic+pickscore", "1"), ("ddpo", "aesthetic", "2")):
        run = str(tmp_path / method)
        code, out, err = run_cli("--method", method, "--reward", reward, *small, "--batch-size", n,
                                 "--train-batch-size", n, "--out", run, env=env)
        assert code == 0, err[-3000:]
        row = read_log(run)[-1]
        assert (row["epoch"] == 1 and row["skipped_updates"] == 0 and math.isfinite(row["reward_mean"])
                and math.isfinite(row["loss"]))
        trained = lora_weights(run)
        assert (len(trained) == 4 * 2 * 32
                and any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k or "lora.up" in k))


def measure_memory(Ks=(1, 10, 50), resolution=512, small=256):
    """The figures of the README's Memory section, on SD 1.5's architecture with random weights, fp32, on the CPU:
    bytes saved for backward (distinct storages, counted with saved_tensors_hooks) by one AlignProp micro-batch of
    one image at `resolution` through the aesthetic reward's architecture (CLIP ViT-L/14 + MLP), for each K with
    checkpointing, and (at `small` px: at 512 px they do not fit 24 GB of RAM in fp32) for K = 1 without checkpointing
    and one DDPO training step of one image; and the parameter bytes. Checkpointed calls save only their inputs, which
    the hooks do not see (checkpoint's own hooks take over inside): those are a few latents and embeddings per step.
    Run: MALLOC_MMAP_THRESHOLD_=131072 python -c "import test_diffexp as t; t.measure_memory()" (about 15 minutes on
    2 cores; the fixed threshold stops glibc's heap from keeping freed activations, which otherwise grows the process
    by 1-2 GB per step until the graph is freed and runs K = 50 out of memory)."""
    import tempfile

    import open_clip

    with tempfile.TemporaryDirectory() as d:
        build_sd15(d, sample_size=resolution // 8)
        pipe = diffexp.load_pipeline(d, 4, "cpu", torch.float32)
    clip = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True).eval().requires_grad_(False)
    head = rewards._aesthetic_mlp(768).eval().requires_grad_(False)
    reward = lambda images, prompts: head(torch.nn.functional.normalize(
        clip.encode_image(rewards.clip_preprocess(images, 224)), dim=-1))

    def saved(run):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sum(storages.values())

    mb = 2 ** 20
    frozen = {name: sum(p.numel() for p in getattr(pipe, name).parameters() if not p.requires_grad)
              for name in ("unet", "vae", "text_encoder")}
    lora = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    print(f"parameters: frozen {frozen} (fp32 {4 * sum(frozen.values()) / mb:.0f} MB, "
          f"bf16 {2 * sum(frozen.values()) / mb:.0f} MB), LoRA {lora} ({4 * lora / mb:.1f} MB fp32, "
          f"with AdamW's two moments {12 * lora / mb:.1f} MB); aesthetic reward "
          f"{sum(p.numel() for p in clip.parameters()) + sum(p.numel() for p in head.parameters())} parameters")
    settings = dict(w_high=7.5, eta=0.0)
    for K, checkpoint in [(K, True) for K in Ks] + [(1, False)]:
        if not checkpoint:
            resolution = small
            pipe.unet.register_to_config(sample_size=small // 8)  # the latent size sample_batch draws
        pipe.scheduler.set_timesteps(K)  # steps before the last K save nothing (tested above), so K steps suffice
        run = lambda: reward(diffexp.sample_batch(pipe, ["a photo of a cat"], torch.Generator().manual_seed(0),
                                                  backprop_steps=K, checkpoint=checkpoint, **settings)["images"], None)
        print(f"AlignProp, 1 image at {resolution} px, K = {K}, checkpointing {'on' if checkpoint else 'off'}: "
              f"{saved(run) / mb:.0f} MB saved for backward", flush=True)
    pipe.scheduler.set_timesteps(2)
    with torch.no_grad():
        batch = diffexp.sample_batch(pipe, ["a photo of a cat"], torch.Generator().manual_seed(0), w_high=5.0, eta=1.0)
    step = lambda: diffexp.ddpo_log_prob(pipe, batch, torch.tensor([0]), torch.tensor([1]), 1.0)
    print(f"DDPO, 1 image at {resolution} px, one training step (CFG: 2 UNet passes): "
          f"{saved(step) / mb:.0f} MB saved for backward")


def measure_gpu_memory():
    """The README's GPU figures: SD 1.5's architecture (random weights) at 512 px, 50 DDIM steps, one epoch of one
    micro-batch at the defaults (bf16 frozen weights, fp32 LoRA; and once --dtype fp16) through diffexp.main, with the
    aesthetic reward's architecture in a local Hugging Face cache; prints each run's peak CUDA memory and time. On a
    CUDA machine: python -c "import test_diffexp as t; t.measure_gpu_memory()" (about 3 minutes on an H200)."""
    import tempfile

    import open_clip
    from safetensors.torch import save_file

    work = tempfile.mkdtemp()
    build_sd15(os.path.join(work, "sd15"), sample_size=64)
    for repo, name in ((rewards.AESTHETIC_HEAD_REPO, rewards.AESTHETIC_HEAD_FILE),
                       ("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")):
        folder = os.path.join(work, "hub", f"models--{repo.replace('/', '--')}")
        os.makedirs(os.path.join(folder, "refs"))
        os.makedirs(os.path.join(folder, "snapshots", "0" * 40))
        with open(os.path.join(folder, "refs", "main"), "w") as f:
            f.write("0" * 40)
        path = os.path.join(folder, "snapshots", "0" * 40, name)
        if name == rewards.AESTHETIC_HEAD_FILE:
            torch.save(rewards._aesthetic_mlp(768).state_dict(), path)
        else:
            vit_l = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
            save_file({k: v.half().contiguous() for k, v in vit_l.state_dict().items()}, path)
    # huggingface_hub reads HF_HUB_CACHE when it is imported: the runs go in a fresh process
    subprocess.run([sys.executable, "-c", f"import test_diffexp as t; t.gpu_peaks({work!r})"], cwd=HERE, check=True,
                   env={**os.environ, "HF_HUB_CACHE": os.path.join(work, "hub"), "HF_HUB_OFFLINE": "1"})


def gpu_peaks(work):
    """measure_gpu_memory's runs, in a process that sees the local cache."""
    import time

    configs = {"alignprop bf16 K=1": ["--method", "alignprop", "--backprop-steps", "1"],
               "alignprop bf16 K=10": ["--method", "alignprop", "--backprop-steps", "10"],
               "alignprop bf16 K=50": ["--method", "alignprop", "--backprop-steps", "50"],
               "alignprop fp16 K=10": ["--method", "alignprop", "--backprop-steps", "10", "--dtype", "fp16"],
               "ddpo bf16": ["--method", "ddpo"]}
    for name, argv in configs.items():
        torch.cuda.reset_peak_memory_stats()
        start, n = time.time(), "2" if "alignprop" in name else "4"  # one micro-batch of the method's default size
        diffexp.main(["--model", os.path.join(work, "sd15"), "--reward", "aesthetic", "--epochs", "1",
                      "--eval-every", "0", "--save-every", "0", "--batch-size", n, "--train-batch-size", n, *argv,
                      "--out", os.path.join(work, name.replace(" ", "_").replace("=", ""))])
        print(f"{name}: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, {time.time() - start:.0f} s",
              flush=True)
