"""DiffExp: efficient exploration in reward fine-tuning of text-to-image diffusion models (AAAI 2025).

DiffExp changes only how the online samples of DDPO (policy gradient, Black et al. 2024) and
AlignProp (reward backprop, Prabhudesai et al. 2023) are drawn, and only for the first 3/4 of the
training epochs. This file, read with the paper:

1. The method, which copies alone (it needs math, torch and diffusers' DDIMScheduler, nothing else):
   Eq. (7)      w_t = w_low if t > t_thres else w_high .............. cfg_scale_schedule
   Eq. (8)      c'_i = c_empty_i + alpha (c_i - c_empty_i) .......... draw_prompt_weights,
                                                                      weight_prompt_embeds
   Eq. (4)      classifier-free guidance ............................ cfg_noise_pred
   Eq. (2)-(3)  the DDIM step as a Gaussian policy, its log-prob .... ddim_step_with_logprob
                the denoising loop (AlignProp's truncated backprop) . sample
                one batch, Eq. 7 and 8 applied ...................... encode_prompts, sample_batch
   Eq. (6)      DDPO's advantages, log-probs, clipped-ratio loss .... PerPromptStatTracker,
                                                                      ddpo_log_prob, ddpo_loss
                AlignProp's loss ..................................... alignprop_loss
2. Training: an epoch of each method, the optimizer step, evaluation, the loop over epochs.
3. The run: the model and its LoRA, processes, image grids, checkpoints, main().
Settings and the command line live in runs.py, which needs the standard library alone: a bad flag is
refused before torch loads.

The paper explores for the first 3/4 of the training epochs: a run counts them when it starts
(runs.exploring_epochs, --explore-epochs) and train() samples plainly after them, resumed or not.

Ours where the paper is silent, or where its text lost the numbers (its formulas and inline values
did not survive; the README lists them all): for SD 1.5, w_low 1.0, t_thres 900 and alpha ~ U(1, 2);
for the offline shapes model, each method's exploration is set by a sweep at its starting model and
a rule written before any training run; DDPO's eta 1.0; AlignProp's loss coefficient 0.01 (its
configs). Unlike the baselines' code, AlignProp draws K ~ U{1..steps} once per sampled micro-batch,
not per step, and checkpoints every UNet call under gradient; processes average the LoRA's gradients
with one all_reduce, not DDP; each epoch's generator is seeded from (seed, epoch, rank), so that a
resumed run draws what the unbroken one did.
"""

import math
import sys

if __name__ == "__main__":  # a bad command line is refused before torch and diffusers load (5 s)
    import runs

    runs.parse_args(sys.argv[1:])

import importlib
import json
import logging
import os
import shutil
import textwrap
import time

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from diffusers import StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torchvision.utils import make_grid
from tqdm.auto import tqdm

import rewards
import runs
import shapes


# ==== 1. The method. Needs: import math, import torch, from diffusers import DDIMScheduler ====
def cfg_scale_schedule(timesteps, w_low, w_high, t_thres):
    """Eq. (7): w_t = w_low if t > t_thres else w_high. timesteps [T] count down (981 ... 1)."""
    return torch.where(torch.as_tensor(timesteps) > t_thres, w_low, w_high).float()  # [T]


def draw_prompt_weights(input_ids, special_ids, alpha_min, alpha_max, generator):
    """Eq. (8)'s random draw, per sample: a token position i uniform over the real tokens of
    input_ids [B, L] (CPU), never special_ids (BOS, EOS, padding), and alpha ~ U(alpha_min,
    alpha_max). Returns token_index [B], alpha [B]."""
    real = ~torch.isin(input_ids, torch.as_tensor(list(special_ids)))  # [B, L]: the real tokens
    if not real.any(dim=1).all():
        raise ValueError("a prompt has no tokens to weight (is it empty?); give every prompt text.")
    # The argmax of i.i.d. uniform scores over the real positions is a uniform choice among them.
    scores = torch.where(real, torch.rand(input_ids.shape, generator=generator), -1.0)  # [B, L]
    token_index = scores.argmax(dim=1)  # [B]
    u = torch.rand(input_ids.shape[0], generator=generator)  # [B]
    alpha = alpha_min + (alpha_max - alpha_min) * u
    return token_index, alpha


def weight_prompt_embeds(prompt_embeds, empty_embeds, token_index, alpha):
    """Eq. (8): c'_i = c_empty_i + alpha * (c_i - c_empty_i) at one position i per sample, the
    others unchanged. prompt_embeds c [B, L, D], empty_embeds c_empty [1 or B, L, D] (of the
    prompt ""), token_index i [B], alpha [B]. In fp32: bf16 would round alpha to steps of 1/128."""
    rows = torch.arange(len(prompt_embeds), device=prompt_embeds.device)  # [B]
    c_i = prompt_embeds[rows, token_index].float()  # [B, D]
    c_empty_i = empty_embeds.expand_as(prompt_embeds)[rows, token_index].float()  # [B, D]
    alpha = alpha.to(prompt_embeds.device, torch.float32)[:, None]  # [B, 1]
    c_prime_i = c_empty_i + alpha * (c_i - c_empty_i)  # [B, D]
    return prompt_embeds.index_put((rows, token_index), c_prime_i.to(prompt_embeds.dtype))


def cfg_noise_pred(unet, x_t, t, cond, uncond, w):
    """Eq. (4): eps = eps(x_t, t, c_empty) + w * (eps(x_t, t, c) - eps(x_t, t, c_empty)), fp32
    [B, C, h, w]. cond, uncond: the two branches' UNet conditioning, dicts of tensors [B or 1, ...]
    ("encoder_hidden_states"; SDXL adds its pooled "text_embeds" and size "time_ids"). t, w: one
    value or one per sample [B]. Where every w is 1 (or 0), one UNet branch gives the same numbers
    as the pair: it runs alone, at half the compute."""
    B = x_t.shape[0]
    dtype = cond["encoder_hidden_states"].dtype
    t = torch.as_tensor(t, device=x_t.device).expand(B)  # [B]
    w = torch.as_tensor(w, device=x_t.device, dtype=torch.float32).expand(B)  # [B]

    def eps(x, t, c):  # SDXL's pooled text embedding and size ids go in added_cond_kwargs
        added = {k: v.to(dtype) for k, v in c.items() if k != "encoder_hidden_states"}
        out = unet(x.to(dtype), t, encoder_hidden_states=c["encoder_hidden_states"],
                   added_cond_kwargs=added or None)
        return out.sample.float()

    if (w == 1).all():
        return eps(x_t, t, cond)
    uncond = {k: v.expand_as(cond[k]) for k, v in uncond.items()}  # [1 or B, ...] -> [B, ...]
    if (w == 0).all():
        return eps(x_t, t, uncond)
    # [2B, ...], the unconditional half first, as diffusers does
    pair = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    eps_uncond, eps_cond = eps(torch.cat([x_t, x_t]), torch.cat([t, t]), pair).chunk(2)
    return eps_uncond + w.view(B, 1, 1, 1) * (eps_cond - eps_uncond)  # [B, C, h, w]


def check_scheduler(scheduler):
    """Refuse, in one line, a scheduler that ddim_step_with_logprob does not compute: not DDIM,
    or one that predicts anything but epsilon, or clips or thresholds x_0 (SD does neither)."""
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"this is a DDIM step, and the scheduler is {type(scheduler).__name__}; "
                        "convert it first: "
                        "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
    config = scheduler.config
    if config.prediction_type != "epsilon" or config.clip_sample or config.thresholding:
        raise ValueError("this DDIM step needs a scheduler that predicts epsilon and neither "
                         "clips nor thresholds x_0; this one predicts "
                         f"{config.prediction_type!r}, clip_sample={config.clip_sample}, "
                         f"thresholding={config.thresholding}.")


def ddim_step_with_logprob(scheduler, noise_pred, timestep, latents, eta, prev_latents=None,
                           generator=None):
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy (Eq. 2-3; DDPO's formulation) with
    DDIMScheduler.step's mean (SD never clips). latents x_t, noise_pred eps [B, C, h, w];
    timestep t, an int or [B]. Without prev_latents, x_{t-1} = mu + sigma_t z, z ~ N(0, I) from
    `generator`; with them, the given x_{t-1} is scored (DDPO's training pass). Returns
    (prev_latents [B, C, h, w], log_prob [B] averaged over C*h*w, or None if eta = 0: no density).
    """
    check_scheduler(scheduler)
    # 1. The previous timestep (timesteps count down) and the cumulative alphas abar_t and
    #    abar_{t-1}; past the last step, abar_{t-1} is the scheduler's final alpha.
    t = torch.as_tensor(timestep).cpu().long()
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = scheduler.alphas_cumprod
    abar_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    abar_t = abar[t].to(latents.device, torch.float32).view(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
    abar_prev = abar_prev.to(latents.device, torch.float32).view(-1, 1, 1, 1)
    # 2. The predicted x_0 (DDIM, Song et al. 2021, Eq. 12).
    x0_hat = (latents - (1 - abar_t).sqrt() * noise_pred) / abar_t.sqrt()
    # 3. sigma_t (DDIM's Eq. 16, scaled by eta) and the mean mu of x_{t-1} (Eq. 2).
    std = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    mu = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).sqrt() * noise_pred
    if eta == 0:
        if prev_latents is not None:
            raise ValueError("eta = 0 makes the DDIM step deterministic: x_{t-1} has no density.")
        return mu, None
    # 4. Sample x_{t-1} ~ N(mu, sigma_t^2 I) (Eq. 3), the noise drawn on the generator's device.
    if prev_latents is None:
        noise_device = generator.device if generator is not None else latents.device
        z = torch.randn(latents.shape, generator=generator, device=noise_device)
        prev_latents = mu + std * z.to(latents.device)
    # 5. log N(x_{t-1}; mu, sigma_t^2 I) per dimension, averaged, as DDPO does: a sum would put
    #    nearly every ratio outside the 1e-4 clip range. The sample itself is data (detached).
    log_prob = (-((prev_latents.detach() - mu) ** 2) / (2 * std**2) - std.log()
                - math.log(math.sqrt(2 * math.pi)))  # [B, C, h, w]
    return prev_latents, log_prob.mean(dim=(1, 2, 3))  # [B]


def decode_latents(vae, latents):
    """VAE decode of x_0 latents [B, 4, h, w] to images [B, 3, H, W] in [0, 1], fp32."""
    latents = (latents / vae.config.scaling_factor).to(vae.dtype)
    images = vae.decode(latents).sample.float()  # [B, 3, H, W] in [-1, 1]
    return (images / 2 + 0.5).clamp(0, 1)


def sample(pipe, cond, uncond, scales, latents, eta, generator=None, backprop_steps=None,
           checkpoint=False):
    """The DDIM denoising loop with a guidance scale per step (Eq. 7) and an embedding per sample
    (Eq. 8). pipe.scheduler: a DDIMScheduler after set_timesteps(T); cond, uncond: the CFG
    branches' conditioning (see sample_batch); scales [T]; latents [B, C, h, w]: the noise x_T.

    Under grad, backprop_steps=K keeps the graph of the last K steps only (AlignProp's truncated
    backprop): the earlier steps run under no_grad, the same as detaching their eps, as x_t depends
    on the weights only through eps. checkpoint=True recomputes each UNet call under grad in the
    backward pass, so that memory stays flat in K and T. Returns the trajectory x_T ... x_0, the
    log-probs, the images, and the inputs that DDPO's training pass needs."""
    check_scheduler(pipe.scheduler)  # before any UNet call
    timesteps = pipe.scheduler.timesteps
    T = len(timesteps)
    if len(scales) != T:
        raise ValueError(f"got {len(scales)} guidance scales for {T} timesteps; compute them "
                         "from scheduler.timesteps.")

    def checkpointed(fn, *inputs):
        if checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False)
        return fn(*inputs)

    x_t = latents
    trajectory = [latents]
    log_probs = []
    for i, t in enumerate(timesteps):
        # AlignProp's truncated backprop: no gradient through the steps before the last K
        truncated = backprop_steps is not None and i < T - backprop_steps
        with torch.set_grad_enabled(torch.is_grad_enabled() and not truncated):
            eps = checkpointed(cfg_noise_pred, pipe.unet, x_t, t, cond, uncond, scales[i])
            x_t, log_prob = ddim_step_with_logprob(pipe.scheduler, eps, t, x_t, eta,
                                                   generator=generator)
        trajectory.append(x_t)
        log_probs.append(log_prob)
    images = checkpointed(decode_latents, pipe.vae, x_t)
    if eta == 0:
        log_probs = None
    else:
        log_probs = torch.stack(log_probs, dim=1)  # T x [B] -> [B, T]
    return dict(latents=torch.stack(trajectory, dim=1),  # T+1 x [B, C, h, w] -> [B, T+1, C, h, w]
                log_probs=log_probs,
                scales=torch.as_tensor(scales).expand(len(latents), -1),  # [T] -> [B, T], for DDPO
                timesteps=timesteps, cond=cond, uncond=uncond, images=images)


@torch.no_grad()  # the text encoders are frozen
def encode_prompts(pipe, prompts):
    """The UNet's text conditioning for `prompts`, as StableDiffusion[XL]Pipeline computes it, and
    the token ids [B, L] (CPU) for Eq. 8. SD 1.5: {"encoder_hidden_states": the last layer
    [B, L, 768]}. SDXL: both encoders' penultimate layers [B, L, 768 + 1280], the pooled
    "text_embeds" [B, 1280] and "time_ids" [B, 6] (sizes, no crop)."""
    def token_ids(tokenizer):  # padded and truncated to its model_max_length (77)
        return tokenizer(prompts, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    input_ids = token_ids(pipe.tokenizer)
    if not hasattr(pipe, "text_encoder_2"):
        hidden = pipe.text_encoder(input_ids.to(pipe.device))[0]  # [B, L, 768]
        return {"encoder_hidden_states": hidden}, input_ids
    first = pipe.text_encoder(input_ids.to(pipe.device), output_hidden_states=True)
    second_ids = token_ids(pipe.tokenizer_2).to(pipe.device)
    second = pipe.text_encoder_2(second_ids, output_hidden_states=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=pipe.device)
    time_ids = time_ids.expand(len(prompts), -1)  # [B, 6]
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # [B, L, 2048]
    return {"encoder_hidden_states": hidden, "text_embeds": second.text_embeds,
            "time_ids": time_ids}, input_ids


def sample_batch(pipe, prompts, generator, w_high, eta, explore=False, w_low=1.0, t_thres=900,
                 alpha_min=1.0, alpha_max=2.0, backprop_steps=None, checkpoint=False):
    """One batch for `prompts` from x_T ~ N(0, I) drawn from `generator`: with `explore`, Eq. 8's
    weighting (per sample) and Eq. 7's schedule, else plain CFG at w_high. Needs
    scheduler.set_timesteps; returns sample()'s dict."""
    cond, input_ids = encode_prompts(pipe, prompts)
    empty, _ = encode_prompts(pipe, [""])  # [1, ...]: Eq. 8's reference, and the CFG's uncond
    uncond = dict(empty)
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):  # SDXL: zeros, but size ids
        uncond["encoder_hidden_states"] = torch.zeros_like(empty["encoder_hidden_states"])
        uncond["text_embeds"] = torch.zeros_like(empty["text_embeds"])
    if explore:
        scales = cfg_scale_schedule(pipe.scheduler.timesteps, w_low, w_high, t_thres)  # [T], Eq. 7
    else:
        scales = torch.full((len(pipe.scheduler.timesteps),), float(w_high))  # [T]
    size = pipe.unet.config.sample_size
    channels = pipe.unet.config.in_channels
    latents = torch.randn((len(prompts), channels, size, size), generator=generator)  # x_T
    latents = latents.to(pipe.device)
    # Eq. 8 draws from a generator of its own, seeded from `generator` whether or not it explores:
    # DiffExp and its baseline then draw the same x_T and DDIM noise from one seed (paired runs).
    eq8_seed = int(torch.randint(2**62, (1,), generator=generator))
    eq8_generator = torch.Generator().manual_seed(eq8_seed)
    if explore:
        special = pipe.tokenizer.all_special_ids  # BOS, EOS and padding
        token_index, alpha = draw_prompt_weights(input_ids, special, alpha_min, alpha_max,
                                                 eq8_generator)
        # Eq. 8 weights the per-token embeddings (on SDXL both encoders' at once), not the pooled
        c_prime = weight_prompt_embeds(cond["encoder_hidden_states"],
                                       empty["encoder_hidden_states"], token_index, alpha)
        cond = cond | {"encoder_hidden_states": c_prime}
    return sample(pipe, cond, uncond, scales, latents, eta, generator, backprop_steps, checkpoint)


class PerPromptStatTracker:
    """DDPO's per-prompt advantages (r - mean) / (std + 1e-6): over the prompt's last
    `buffer_size` rewards (kept across epochs) once it has `min_count` of them, and over the whole
    batch before that."""

    def __init__(self, buffer_size, min_count):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers = {}  # prompt -> its last buffer_size rewards

    def update(self, prompts, rewards):
        """Advantages [B] (float64) of rewards [B] for prompts (B strings)."""
        rewards = torch.as_tensor(rewards, dtype=torch.float64).cpu()
        advantages = torch.empty_like(rewards)
        for prompt in sorted(set(prompts)):
            mine = torch.tensor([p == prompt for p in prompts])  # [B]
            buffer = self.buffers.get(prompt, []) + rewards[mine].tolist()
            self.buffers[prompt] = buffer[-self.buffer_size :]
            stats = torch.tensor(self.buffers[prompt], dtype=torch.float64)
            if len(stats) < self.min_count:
                stats = rewards
            advantages[mine] = (rewards[mine] - stats.mean()) / (stats.std(correction=0) + 1e-6)
        return advantages


def ddpo_log_prob(pipe, batch, i, s, eta):
    """log pi_theta(x_{t-1} | x_t, c) of stored transitions (samples i [b], step indices s [b]),
    with the SAME w_t and weighted c' that sampling used: else the ratio would compare two
    different policies."""
    t = batch["timesteps"][s]  # [b]
    x_t = batch["latents"][i, s]  # [b, C, h, w]
    x_prev = batch["latents"][i, s + 1]  # [b, C, h, w]
    cond = {k: v[i] for k, v in batch["cond"].items()}
    eps = cfg_noise_pred(pipe.unet, x_t, t, cond, batch["uncond"], batch["scales"][i, s])
    _, log_prob = ddim_step_with_logprob(pipe.scheduler, eps, t, x_t, eta, prev_latents=x_prev)
    return log_prob  # [b]


def ddpo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """The clipped-ratio surrogate of Eq. (6): with A = clamp(advantage, -adv_clip_max,
    adv_clip_max) and r = exp(log_prob - old_log_prob),
    loss = mean(max(-A r, -A clamp(r, 1 - eps, 1 + eps)))."""
    A = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -A * ratio
    clipped = -A * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def alignprop_loss(pipe, reward_fn, prompts, generator, K, loss_coeff, **sampling):
    """AlignProp's objective for one batch: sample with the UNet's gradient kept through the last K
    steps (each call checkpointed), decode, score; loss = -loss_coeff * mean(reward). Returns
    (loss, rewards [B], images)."""
    out = sample_batch(pipe, prompts, generator, backprop_steps=K, checkpoint=True, **sampling)
    reward = reward_fn(out["images"], prompts)
    return -loss_coeff * reward.mean(), reward, out["images"]


# ==== 2. Training: an epoch of each method, the optimizer step, evaluation, the loop over epochs. ====
def draw_prompt_ids(num_prompts, n, k, generator):
    """An epoch's n prompt ids [n]: n // k prompts drawn uniformly, k samples of each in a row. k = 1 is the paper's
    independent draws; with k > 1 (ours, as GRPO-style trainers) DDPO compares samples of one prompt at once."""
    return torch.randint(num_prompts, (n // k,), generator=generator).repeat_interleave(k)


def sampling_settings(args):
    """The keyword arguments of sample_batch that come from a run's settings."""
    return {k: getattr(args, k) for k in ("w_high", "eta", "w_low", "t_thres", "alpha_min", "alpha_max")}


def with_grid(grid, images, prompts, scores, size=16):
    """The epoch's image grid, topped up to `size` entries of (image [3, H, W] on the CPU, prompt, {reward: score})."""
    room = size - len(grid)
    return grid + list(zip(images[:room].detach().cpu(), prompts[:room], scores[:room]))


def ddpo_sample(pipe, reward_fn, prompts, args, explore, generator, world):
    """DDPO's step 1: this process's share of the epoch's trajectories, sampled without a graph (with DiffExp's Eq. 7
    and 8 when `explore`) and scored. Returns the batch (the stored transitions, per sample) and its grid."""
    n = args.batch_size // world
    prompt_ids = draw_prompt_ids(len(prompts), n, args.samples_per_prompt, generator)  # [n]
    samples = []
    grid = []
    with torch.no_grad():
        for ids in tqdm(prompt_ids.split(args.micro_batch_size), desc="sampling", disable=not is_main()):
            drawn = [prompts[k] for k in ids]
            out = sample_batch(pipe, drawn, generator, explore=explore, **sampling_settings(args))
            out["rewards"] = reward_fn(out["images"], drawn).float()  # [micro-batch]
            out["prompt_ids"] = ids
            scores = [{args.reward: r} for r in out["rewards"].tolist()]
            grid = with_grid(grid, out.pop("images"), drawn, scores)  # at 512 px the images are large: not kept
            samples.append(out)
    batch = {k: torch.cat([s[k] for s in samples]) for k in ("latents", "log_probs", "scales", "rewards", "prompt_ids")}
    batch["cond"] = {k: torch.cat([s["cond"][k] for s in samples]) for k in samples[0]["cond"]}
    batch["uncond"] = samples[0]["uncond"]
    batch["timesteps"] = pipe.scheduler.timesteps
    return batch, grid


def ddpo_train(pipe, batch, advantages, args, generator, optimizer, scaler, world):
    """DDPO's step 3: clipped-ratio updates over shuffled (sample, timestep) pairs, --inner-epochs times; one
    optimizer step per --train-batch-size samples. Returns the mean loss, approx_kl, clipfrac and gradient stats."""
    n = len(advantages)
    micro_batch = args.micro_batch_size
    T = len(batch["timesteps"])
    T_train = max(1, int(args.timestep_fraction * T))  # steps trained on, per sample
    micro_batches_per_update = args.train_batch_size // world // micro_batch
    log = []  # per (micro-batch, step): loss, approx_kl, clipfrac
    norms = []  # per optimizer step: the gradient norm before clipping, None if skipped
    finite = True
    for _ in range(args.inner_epochs):
        order = torch.randperm(n, generator=generator).split(micro_batch)  # micro-batches of sample indices i
        steps = torch.stack([torch.randperm(T, generator=generator)[:T_train] for _ in range(n)])  # [n, T_train]
        for m, i in enumerate(tqdm(order, desc="training", disable=not is_main())):
            for s in steps[i].T:  # s [micro-batch]: each sample trains on its own shuffled steps
                log_prob = ddpo_log_prob(pipe, batch, i, s, args.eta)
                old_log_prob = batch["log_probs"][i, s]
                loss = ddpo_loss(log_prob, old_log_prob, advantages[i], args.clip_range, args.adv_clip_max)
                scaler.scale(loss / (micro_batches_per_update * T_train)).backward()
                finite &= bool(torch.isfinite(loss))
                log_ratio = (log_prob - old_log_prob).detach()
                approx_kl = 0.5 * (log_ratio**2).mean().item()
                clipfrac = (log_ratio.exp().sub(1).abs() > args.clip_range).float().mean().item()
                log.append([loss.item(), approx_kl, clipfrac])
            if (m + 1) % micro_batches_per_update == 0:
                norms.append(optimizer_step(optimizer, scaler, args.max_grad_norm, world, finite))
                finite = True
    means = all_gather(torch.as_tensor(np.mean(log, axis=0), device=pipe.device), world).view(world, 3).mean(0)
    return dict(zip(("loss", "approx_kl", "clipfrac"), means.tolist())) | gradient_stats(norms)


def ddpo_epoch(pipe, reward_fn, prompts, args, explore, generator, optimizer, scaler, tracker, world):
    """One DDPO epoch on this process's share of --batch-size: sample and score, advantages, updates."""
    # 1. Trajectories, sampled (with DiffExp's Eq. 7 and 8 when `explore`) and scored.
    batch, grid = ddpo_sample(pipe, reward_fn, prompts, args, explore, generator, world)
    # 2. Advantages from the rewards of every process, normalised per prompt.
    rewards = all_gather(batch["rewards"], world)
    prompt_ids = all_gather(batch["prompt_ids"].to(pipe.device), world)
    stats = dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item())
    if not torch.isfinite(rewards).all():  # never let a NaN into the buffers or the weights
        return stats | dict(skipped_updates=1), grid
    advantages = tracker.update([prompts[k] for k in prompt_ids.tolist()], rewards)  # [world * n]
    rank = torch.distributed.get_rank() if world > 1 else 0
    n = len(batch["rewards"])
    advantages = advantages.float().view(world, n)[rank].to(pipe.device)  # this process's [n]
    # 3. Clipped-ratio updates.
    return stats | ddpo_train(pipe, batch, advantages, args, generator, optimizer, scaler, world), grid


def alignprop_epoch(pipe, reward_fn, prompts, args, explore, generator, optimizer, scaler, world):
    """One AlignProp epoch on this process's share of --batch-size: one truncation depth K per sampled micro-batch
    (all its denoising steps share it), as the paper."""
    n = args.batch_size // world
    micro_batch = args.micro_batch_size
    micro_batches_per_update = args.train_batch_size // world // micro_batch
    K_max = args.backprop_steps or args.steps
    random_K = args.backprop_random or args.backprop_steps is None
    prompt_ids = draw_prompt_ids(len(prompts), n, args.samples_per_prompt, generator).split(micro_batch)
    rewards = []
    losses = []
    norms = []
    grid = []
    finite = True
    for m in tqdm(range(n // micro_batch), desc="alignprop", disable=not is_main()):
        drawn = [prompts[k] for k in prompt_ids[m]]
        K = K_max
        if random_K:
            K = int(torch.randint(1, K_max + 1, (1,), generator=generator))  # K ~ U{1..K_max}
        loss, reward, images = alignprop_loss(pipe, reward_fn, drawn, generator, K, args.loss_coeff, explore=explore,
                                              **sampling_settings(args))
        scaler.scale(loss / micro_batches_per_update).backward()
        finite &= bool(torch.isfinite(loss))
        rewards.append(reward.detach().float())
        losses.append(loss.item())
        grid = with_grid(grid, images, drawn, [{args.reward: r} for r in reward.tolist()])
        if (m + 1) % micro_batches_per_update == 0:
            norms.append(optimizer_step(optimizer, scaler, args.max_grad_norm, world, finite))
            finite = True
    rewards = all_gather(torch.cat(rewards), world)
    stats = dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item())
    loss = all_gather(torch.tensor([np.mean(losses)], device=pipe.device), world).mean().item()  # over processes
    return stats | dict(loss=loss) | gradient_stats(norms), grid


def optimizer_step(optimizer, scaler, max_grad_norm, world, loss_finite):
    """Average the optimizer's gradients (the LoRA's) over processes, clip their norm, step; returns the norm before
    clipping, or None: a non-finite loss or gradient on any process (a NaN reward, say) skips the step on all alike."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bad = torch.tensor([0.0 if loss_finite else 1.0], device=params[0].device)
    if world > 1:
        # One all_reduce of the flattened gradients (and the flag), not a DDP wrapper: AlignProp calls the UNet
        # many times per backward and checkpointing re-runs forward inside backward, which DDP does not support.
        flat = torch.cat([p.grad.flatten() for p in params] + [bad])
        torch.distributed.all_reduce(flat)
        bad = flat[-1:]
        for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p) / world)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    ok = bool(torch.isfinite(norm)) and bad.item() == 0
    if ok:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if not ok:
        return None
    return norm.item()  # the norm of the unscaled gradients


def gradient_stats(norms):
    """An epoch's optimizer steps (their gradient norms, None where skipped): the mean norm and the skips."""
    taken = [n for n in norms if n is not None]
    mean = np.mean(taken).item() if taken else math.nan
    return dict(grad_norm=mean, skipped_updates=norms.count(None))


EVAL_SEED = 1234  # evaluation always draws the same noise: seed (seed, EVAL_SEED, rank)


@torch.no_grad()
def evaluate(pipe, reward_fns, prompt_sets, args, world, explore=False):
    """Plain sampling (or, with `explore`, DiffExp's sampler at the run's settings) from fixed noise on each prompt set,
    every prompt, cycled to at least --batch-size images. Returns the mean rewards {"eval_SET_REWARD": float} and this
    process's (image, prompt, {reward: score}) per set."""
    rank = torch.distributed.get_rank() if world > 1 else 0
    micro_batch = args.micro_batch_size
    metrics = {}
    grids = {}
    for set_name, prompts in prompt_sets.items():
        per_process = world * micro_batch
        n = -(-max(args.batch_size, len(prompts)) // per_process) * per_process  # rounded up to whole micro-batches
        local_prompts = [prompts[k % len(prompts)] for k in range(rank * n // world, (rank + 1) * n // world)]
        generator = seeded_generator(args.seed, EVAL_SEED, rank)
        starts = tqdm(range(0, len(local_prompts), micro_batch), desc=f"evaluating {set_name}", disable=not is_main())
        images = torch.cat([sample_batch(pipe, local_prompts[k : k + micro_batch], generator, explore=explore,
                                         **sampling_settings(args))["images"] for k in starts])
        scores = {}
        for name, fn in reward_fns.items():
            scores[name] = torch.cat([fn(images[k : k + micro_batch], local_prompts[k : k + micro_batch]).float()
                                      for k in range(0, len(local_prompts), micro_batch)])  # [len(local_prompts)]
            metrics[f"eval_{set_name}_{name}"] = all_gather(scores[name], world).mean().item()
        grids[set_name] = [(image, prompt, {name: s[k].item() for name, s in scores.items()})
                           for k, (image, prompt) in enumerate(zip(images.cpu(), local_prompts))]
    return metrics, grids


def train(pipe, reward_fns, args, optimizer, scaler, tracker, start, world, rank):
    """The epochs: DiffExp sampling for the first --explore-epochs of them, an update, evaluation, a log line,
    checkpoints. Every process runs every collective; rank 0 alone writes files. Returns the last log row."""
    def write_epoch(row, grids, save):  # rank 0's files for one epoch
        for name, grid in grids.items():
            save_grid(os.path.join(args.out, f"{name}_{row['epoch']:04d}.png"), grid[:16])
        print(json.dumps(row), flush=True)
        runs.append_log(args.out, row)
        if args.wandb:
            importlib.import_module("wandb").log(row, step=row["reward_queries"])
        if save:
            save_checkpoint(args.out, pipe, optimizer, scaler, tracker, row["epoch"])

    def evaluated(row, grids):  # the epoch's row and grids, with the evaluation's added
        metrics, eval_grids = evaluate(pipe, reward_fns, eval_sets, args, world)
        if args.eval_explored:  # the unseen prompts under DiffExp's sampler, same noise: what the LoRA learned of it
            explored = evaluate(pipe, reward_fns, {"unseen_explored": eval_sets["unseen"]}, args, world, explore=True)
            metrics, eval_grids = metrics | explored[0], eval_grids | explored[1]
        return row | metrics, grids | {f"eval_{set_name}": grid for set_name, grid in eval_grids.items()}

    prompts = runs.load_prompts(args.prompts)
    eval_sets = {"seen": prompts, "unseen": runs.load_prompts(args.eval_prompts)}
    if start == 0 and args.eval_every:  # the starting model, so that curves begin at 0 reward queries
        row, grids = evaluated(dict(epoch=0, reward_queries=0), {})
        on_rank0(write_epoch, row, grids, False)
    for epoch in range(start + 1, args.epochs + 1):
        explore = not args.no_explore and epoch <= args.explore_epochs  # fixed at the start: a resume keeps it
        generator = seeded_generator(args.seed, epoch, rank)
        common = (pipe, reward_fns[args.reward], prompts, args, explore, generator, optimizer, scaler)
        if args.method == "ddpo":
            stats, grid = ddpo_epoch(*common, tracker, world)
        else:
            stats, grid = alignprop_epoch(*common, world)
        row = dict(epoch=epoch, reward_queries=epoch * args.batch_size, explore=explore) | stats
        grids = {"train": grid}
        if args.eval_every and (epoch % args.eval_every == 0 or epoch == args.epochs):
            row, grids = evaluated(row, grids)
        stopping = torch.tensor([float(runs.STOP_REQUESTED.is_set())], device=pipe.device)
        if world > 1:  # stop together: one process's signal stops all of them after the same epoch
            torch.distributed.all_reduce(stopping, op=torch.distributed.ReduceOp.MAX)
        periodic = args.save_every and epoch % args.save_every == 0
        save = epoch == args.epochs or bool(stopping.item()) or periodic
        on_rank0(write_epoch, row, grids, save)
        if stopping.item():
            break
    return row


# ==== 3. The run: the model with its LoRA, processes, image grids, checkpoints, main(). ====
HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES_MODEL = os.path.join(HERE, "shapes_model")  # made by `python shapes.py pretrain`
OFFLINE_HINT = "or run offline with --model shapes --reward bold"


def load_pipeline(model, lora_rank, device, dtype):
    """An SD 1.x or SDXL pipeline from a hub id or a directory ("shapes": shapes_model/; "tiny", "tiny-sdxl": random,
    from shapes.tiny_pipeline) with a DDIM scheduler, frozen weights in `dtype` on `device` and an fp32 LoRA. A hub
    model loads from the cache first, so that a cached one needs no network."""
    if model in ("tiny", "tiny-sdxl"):
        pipe = shapes.tiny_pipeline(sdxl=model == "tiny-sdxl", dtype=dtype)
    else:
        pipe = from_cache_or_hub(SHAPES_MODEL if model == "shapes" else model, dtype)
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ValueError(f"--model {model!r} is a {type(pipe).__name__}; this code fine-tunes SD 1.x and SDXL.")
    # DDPO's policy is the DDIM step. A scheduler whose config has no clip_sample (PNDM, Euler) never clips x_0:
    # DDIM's own default (True) must not come in with the conversion.
    config = pipe.scheduler.config
    pipe.scheduler = DDIMScheduler.from_config(config, clip_sample=config.get("clip_sample", False))
    try:
        check_scheduler(pipe.scheduler)  # epsilon, no clipping: what the step computes
    except ValueError as e:
        raise ValueError(f"--model {model!r}: {e}") from None
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    if isinstance(pipe, StableDiffusionXLPipeline):
        pipe.vae.float()  # SDXL's VAE overflows in fp16
    pipe.to(device)
    pipe.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    cast_training_params(pipe.unet, dtype=torch.float32)  # LoRA weights train in fp32 whatever the frozen dtype
    return pipe


def from_cache_or_hub(model, dtype):
    """DiffusionPipeline.from_pretrained(model) from a directory or the Hugging Face cache, else from the hub; one line
    of error where it cannot be had (without the half minute of retries of an unreachable hub)."""
    settings = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        return DiffusionPipeline.from_pretrained(model, local_files_only=True, **settings)
    except (OSError, ValueError):
        pass  # not a directory, nor in the cache: the hub, below
    unreachable = rewards.hub_unreachable()
    if unreachable:
        raise ValueError(f"cannot load --model {model!r}: not a pipeline directory nor in the cache, and the hub "
                         f"cannot be reached ({unreachable}); check the network and HF_HUB_OFFLINE, {OFFLINE_HINT}.")
    try:
        return DiffusionPipeline.from_pretrained(model, **settings)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load --model {model!r} ({type(e).__name__}): not a pipeline directory nor on the "
                         f"hub; check the id, the network and HF_HUB_OFFLINE, {OFFLINE_HINT}.") from None


def seeded_generator(*keys):
    """A CPU generator seeded from ints, e.g. (seed, epoch, rank): a resumed run draws what the unbroken run drew."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def is_main():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def all_gather(x, world):
    """Concatenate a tensor [n, ...] from every process, in rank order: [world * n, ...]."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def on_rank0(write, *args):
    """Run `write` (file output) on rank 0, then share its outcome: a failed write stops every process together."""
    error = [None]  # a list, as broadcast_object_list takes it
    if is_main():
        try:
            write(*args)
        except Exception as e:  # whatever it is, every process must hear of it
            error = [(str(e).strip() or type(e).__name__).splitlines()[0]]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(error, src=0)
    if error[0]:
        raise OSError(error[0])


def save_grid(path, grid, columns=4):
    """(image [3, H, W] in [0, 1], prompt, {reward: score}) triples as one PNG, each image captioned under it."""
    images = torch.stack([image for image, _, _ in grid]).float().cpu()
    size = min(max(images.shape[-1], 128), 256)  # small images enlarged so that their captions fit, large ones shrunk
    captions = []
    for _, prompt, scores in grid:
        caption = f"{prompt} (" + ", ".join(f"{name} {score:.3g}" for name, score in scores.items()) + ")"
        captions.append(textwrap.wrap(caption, width=size // 6))
    strip = 11 * max(map(len, captions)) + 2  # a white strip under each image for its caption
    mode = "nearest-exact" if size > images.shape[-1] else "area"
    images = F.interpolate(images, size=(size, size), mode=mode)
    grid_image = make_grid(F.pad(images, (0, 0, 0, strip), value=1.0), nrow=columns, padding=2, pad_value=1.0)
    picture = Image.fromarray(grid_image.mul(255).round().byte().permute(1, 2, 0).numpy())  # CHW -> HWC
    for k, lines in enumerate(captions):
        xy = (4 + (k % columns) * (size + 2), 3 + (k // columns) * (size + strip + 2) + size)
        ImageDraw.Draw(picture).multiline_text(xy, "\n".join(lines), fill="black", spacing=1)
    picture.save(path)


LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes and load_lora_weights reads


def save_checkpoint(run_dir, pipe, optimizer, scaler, tracker, epoch):
    """Write run_dir/checkpoint, the LoRA as diffusers' load_lora_weights(dir) reads it, then state.pt (epoch,
    optimizer, scaler, DDPO buffers), via checkpoint.tmp: a crash or a full disk never leaves the run without one."""
    final = os.path.join(run_dir, "checkpoint")
    tmp = os.path.join(run_dir, "checkpoint.tmp")
    if not os.path.exists(final) and os.path.exists(os.path.join(tmp, "state.pt")):
        os.replace(tmp, final)  # the last save was cut after removing the old one: its checkpoint.tmp is complete
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # state.pt last: a checkpoint.tmp with a state.pt is complete
        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        type(pipe).save_lora_weights(tmp, lora)
        state = dict(epoch=epoch, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                     tracker=tracker.buffers if tracker else None)
        torch.save(state, os.path.join(tmp, "state.pt"))
    except Exception as e:  # a full disk: OSError from PIL or os, RuntimeError from torch.save, safetensors' own
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise OSError(f"could not write a checkpoint to {run_dir} ({reason}); the last good one is intact.") from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_checkpoint(run_dir):
    """The checkpoint of run_dir (checkpoint/, or a complete checkpoint.tmp after a crash), read whole: (the LoRA's
    state dict in diffusers' keys, state.pt's dict). A file that is missing, cut short or unreadable is a ValueError
    of one line naming it; nothing is written."""
    path = None
    for name in ("checkpoint", "checkpoint.tmp"):
        if os.path.exists(os.path.join(run_dir, name, "state.pt")):
            path = os.path.join(run_dir, name)
            break
    if path is None:
        raise ValueError(f"{run_dir} has no checkpoint (expected {run_dir}/checkpoint/state.pt); start a new run.")
    files = {}
    for name, load in ((LORA_FILE, load_file), ("state.pt", lambda f: torch.load(f, map_location="cpu",
                                                                                   weights_only=False))):
        file = os.path.join(path, name)
        try:
            files[name] = load(file)
        except Exception as e:  # missing (OSError), cut short or garbled (safetensors', torch's and pickle's errors)
            reason = (getattr(e, "strerror", None) or str(e).strip() or type(e).__name__).splitlines()[0]
            raise ValueError(f"cannot read {file} ({reason}): the checkpoint is damaged; put back a copy of it, or "
                             "start the run again with --overwrite.") from None
    return files[LORA_FILE], files["state.pt"]


def put_lora(unet, lora):
    """Load a LoRA state dict in diffusers' keys ("unet.<module>...", as load_checkpoint returns it) into `unet`."""
    unet_lora = {k.removeprefix("unet."): v for k, v in lora.items()}
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_lora))


def choose_device(args, world):
    """The run's device and frozen-weight dtype, as set or the defaults (cuda and bf16 if there is a GPU, else the
    CPU and fp32); with several processes, each process's GPU and the process group."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA GPU is visible; use --device cpu.")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)[dtype_name]
    return device, dtype, dtype_name


def generate(pipe, reward_fns, args):
    """--generate: the evaluation images of --eval-prompts with the run's LoRA and without it, captioned."""
    for name in ("with_lora", "without_lora"):
        if name == "with_lora":
            pipe.unet.enable_adapters()
        else:
            pipe.unet.disable_adapters()
        metrics, grids = evaluate(pipe, reward_fns, {"unseen": runs.load_prompts(args.eval_prompts)}, args, 1)
        save_grid(os.path.join(args.generate, f"generate_{name}.png"), grids["unseen"], columns=8)
        print(f"wrote {args.generate}/generate_{name}.png; mean rewards {metrics}")


def main(argv=None):
    args = runs.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    handlers = runs.catch_stop_signals()  # restored at the end
    logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)  # its retry warnings: failures say why
    try:
        checkpoint = None
        if args.resume or args.generate:  # read first: a damaged checkpoint is refused before the model loads
            try:
                checkpoint = load_checkpoint(args.resume or args.generate)
            except ValueError as e:
                runs.refuse(str(e))
        run(args, checkpoint, world, rank)
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # no GPU, a missing model or download, a full disk
        sys.exit(f"error: {e}")
    finally:
        runs.restore_signals(handlers)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args, checkpoint, world, rank):
    """The run that main() set up: load the rewards and the model, then --generate, or train from the start or from
    `checkpoint`, and say where it ended."""
    lora, state = checkpoint or (None, dict(epoch=0))
    if args.resume and state["epoch"] >= args.epochs:
        return print(f"{args.out} has trained its {state['epoch']} epochs already; pass a larger --epochs.")
    device, dtype, dtype_name = choose_device(args, world)
    torch.backends.cuda.matmul.allow_tf32 = True  # on GPUs that have it
    torch.backends.cudnn.allow_tf32 = True
    tiny = args.model in ("tiny", "tiny-sdxl")
    if is_main():
        resumed = f", resumed after epoch {state['epoch']}" if args.resume else ""
        print(f"run directory {args.generate or args.out}{resumed}")
        if args.resume and not args.no_explore and args.explore_epochs != runs.exploring_epochs(args.epochs):
            print(f"DiffExp explores for the first {args.explore_epochs} epochs, as counted when the run started "
                  f"(3/4 of --epochs {args.epochs} would be {runs.exploring_epochs(args.epochs)})")
        print(f"device {device}, frozen weights {dtype_name}, LoRA weights and losses fp32, {world} process(es); "
              f"reward {args.reward}{' (tiny random networks)' if tiny else ''}")
    # The shapes world's judge scores every evaluation of its rewards: a reward that rises while the judge falls is
    # being hacked. Rewards load before the model, so that a failing download fails sooner.
    judge = ["shapes_judge"] if args.reward in rewards.SHAPES_WORLD else []
    names = dict.fromkeys(filter(None, [args.reward, args.eval_reward, *judge]))
    reward_fns = {name: rewards.load_reward(name, device, dtype, tiny=tiny) for name in names}
    torch.manual_seed(args.seed)  # the LoRA's random initialisation
    pipe = load_pipeline(args.model, args.lora_rank, device, dtype)
    pipe.scheduler.set_timesteps(args.steps)
    if args.generate:
        put_lora(pipe.unet, lora)
        return generate(pipe, reward_fns, args)
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]  # the LoRA's
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 gradients need loss scaling
    tracker = None
    if args.method == "ddpo":
        tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
    if args.resume:
        put_lora(pipe.unet, lora)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if tracker:
            tracker.buffers = state["tracker"]
    on_rank0(runs.start_run_dir, args, state["epoch"])  # only now, so that a failed set-up leaves no directory behind
    began = time.time()
    row = train(pipe, reward_fns, args, optimizer, scaler, tracker, state["epoch"], world, rank)
    if is_main():
        scores = "".join(f", {k} {v:.4g}" for k, v in row.items() if k.startswith("eval_"))
        minutes = (time.time() - began) / 60
        if row["epoch"] < args.epochs:
            print(f"stopped after epoch {row['epoch']} of {args.epochs} in {minutes:.1f} min{scores}; files in "
                  f"{args.out}; continue with --resume {args.out}")
        else:
            print(f"done after epoch {row['epoch']} of {args.epochs} in {minutes:.1f} min{scores}; files in {args.out}")


if __name__ == "__main__":
    main()
