"""DiffExp: efficient exploration in reward fine-tuning of text-to-image diffusion models (AAAI 2025).

DiffExp changes only how the online samples of DDPO (policy gradient, Black et al. 2024) and AlignProp
(reward backprop, Prabhudesai et al. 2023) are drawn, and only for the first 3/4 of the training epochs:
  Eq. (7)  dynamic CFG scale: w_t = w_low while t > t_thres (early, noisy steps), then w_high.
  Eq. (8)  random prompt weighting: one random real token i of each prompt is pushed away from the
           empty prompt, c'_i = c_empty_i + alpha * (c_i - c_empty_i), alpha ~ U(alpha_min, alpha_max).
The same code runs SD 1.5 and SDXL. Ours where the paper is silent (marked in Args): w_low 1.0, t_thres 900, alpha ~
U(1, 2); DDPO eta 1.0; AlignProp loss coefficient 0.01 (its configs). Unlike the baselines' code, AlignProp draws K ~
U{1..steps} once per batch, not per step, and checkpoints every UNet call under gradient; processes average LoRA
gradients with one all_reduce, not DDP; each epoch's generator is seeded from (seed, epoch, rank): no RNG state to save.
"""

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import textwrap
import time
from collections import ChainMap
from dataclasses import dataclass, field, fields


# ---- Settings, one field and one line of doc each: they come before the heavy imports so that --help is quick.
def arg(default, doc):
    return field(default=default, metadata={"doc": doc})


@dataclass
class Args:
    method: str = arg("alignprop", "ddpo (policy gradient) or alignprop (reward backprop)")
    reward: str = arg(None, "a reward of rewards.py, e.g. aesthetic, pickscore, hps, jpeg, bold, or a+b+c")
    model: str = arg("stable-diffusion-v1-5/stable-diffusion-v1-5", "hub id or directory (SD 1.x, SDXL); offline: "
                     "shapes, tiny, tiny-sdxl")
    prompts: str = arg(None, "training prompts: a [set] of prompts.txt, or a file with one prompt per line")
    eval_prompts: str = arg(None, "evaluation prompts, unseen in training (a set or a file)")
    seed: int = arg(0, "random seed")
    steps: int = arg(None, "DDIM denoising steps")
    eta: float = arg(None, "DDIM eta (DDPO needs eta > 0 for its log-probabilities)")
    w_high: float = arg(None, "Eq. 7: the ordinary CFG scale, for t <= t_thres (paper's values)")
    w_low: float = arg(1.0, "Eq. 7: the CFG scale for t > t_thres, the early steps (ours)")
    t_thres: int = arg(900, "Eq. 7: the timestep where the scale switches from w_low to w_high (ours)")
    alpha_min: float = arg(1.0, "Eq. 8: lower bound of the prompt weight alpha (ours)")
    alpha_max: float = arg(2.0, "Eq. 8: upper bound of the prompt weight alpha (ours)")
    no_explore: bool = arg(False, "plain sampling throughout: the DDPO or AlignProp baseline without DiffExp")
    epochs: int = arg(None, "training epochs; each samples --batch-size images")
    batch_size: int = arg(None, "images sampled per epoch, over all processes (paper: 64)")
    samples_per_prompt: int = arg(None, "k: an epoch draws batch_size / k prompts, k samples of each (ours; paper: 1)")
    micro_batch_size: int = arg(None, "images per forward pass on one process: the memory knob")
    train_batch_size: int = arg(None, "samples per optimizer step, over all processes")
    lr: float = arg(None, "AdamW learning rate (paper's values)")
    weight_decay: float = arg(None, "AdamW weight decay")
    max_grad_norm: float = arg(None, "gradient-norm clip")
    lora_rank: int = arg(4, "LoRA rank on the UNet's to_q, to_k, to_v, to_out.0")
    inner_epochs: int = arg(1, "optimisation passes over each sampled batch")
    timestep_fraction: float = arg(1.0, "fraction of the denoising steps trained on, per sample")
    clip_range: float = arg(1e-4, "clip range eps of the likelihood ratio (paper)")
    adv_clip_max: float = arg(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]")
    backprop_steps: int = arg(None, "a fixed K: the last K steps keep the UNet's gradient (unset: K ~ U{1..steps})")
    backprop_random: bool = arg(False, "draw K ~ U{1..--backprop-steps} once per batch instead of a fixed K")
    loss_coeff: float = arg(0.01, "loss = -loss_coeff * mean(reward) (AlignProp's configs)")
    out: str = arg(None, "run directory (unset: runs/METHOD-REWARD-MODEL-ARM[-CHANGED SETTINGS]-sSEED)")
    resume: str = arg(None, "continue the run in this directory from its last checkpoint, with its settings")
    overwrite: bool = arg(False, "replace an existing run directory")
    device: str = arg(None, "torch device (unset: cuda if available, else cpu)")
    dtype: str = arg(None, "frozen-weight dtype: fp32, fp16 or bf16 (unset: bf16 on cuda, fp32 on cpu)")
    eval_every: int = arg(None, "evaluate (plain sampling, fixed noise) every N epochs, first and last; 0: never")
    eval_reward: str = arg(None, "an extra reward scored at evaluation only, e.g. imagereward")
    save_every: int = arg(10, "checkpoint every N epochs and at the end; 0: at the end only")
    wandb: bool = arg(False, "also log to Weights & Biases (pip install wandb)")
    generate: str = arg(None, "images of --eval-prompts with and without this run's LoRA, then exit")


FIELDS = {f.name: f for f in fields(Args)}
GROUPS = {"method": "what to fine-tune", "steps": "sampling", "w_low": "DiffExp (Eq. 7, Eq. 8)",  # --help's groups,
          "epochs": "training", "inner_epochs": "DDPO", "backprop_steps": "AlignProp", "out": "run"}  # by first setting
# The defaults that depend on something: a small offline model's first, then the method's (paper, appendix B).
COMMON_DEFAULTS = dict(reward="aesthetic", prompts="animals", eval_prompts="unseen_animals", epochs=200, batch_size=64,
                       samples_per_prompt=1, steps=50, eval_every=10)
METHOD_DEFAULTS = dict(ddpo=dict(w_high=5.0, eta=1.0, lr=3e-4, weight_decay=1e-4, max_grad_norm=1.0, micro_batch_size=4,
                                 train_batch_size=32),
                       alignprop=dict(w_high=7.5, eta=0.0, lr=1e-3, weight_decay=0.1, max_grad_norm=5.0,
                                      micro_batch_size=2, train_batch_size=64))
# Per (model, method) for the offline models (ours): runs of a minute (tiny) or minutes (shapes) on 2 cores; the
# shapes model's task is its style reward, bold (DDPO's budget: where plain DDPO gains about 0.10; see README).
TINY_RUN = dict(epochs=6, batch_size=16, steps=20, micro_batch_size=4, train_batch_size=8, lr=1e-2)
SHAPES_RUN = dict(reward="bold", prompts="bold", eval_prompts="unseen_bold", eval_every=1, micro_batch_size=16)
SMALL_MODEL_DEFAULTS = {
    ("shapes", "ddpo"): SHAPES_RUN | dict(epochs=48, batch_size=128, samples_per_prompt=16, steps=10,
                                          train_batch_size=128, lr=5e-4, eval_every=4),
    ("shapes", "alignprop"): SHAPES_RUN | dict(epochs=2, batch_size=64, steps=20, train_batch_size=16),
} | {(model, method): TINY_RUN for model in ("tiny", "tiny-sdxl") for method in METHOD_DEFAULTS}
EXPLORE_FRACTION = 0.75  # paper: exploration runs for the first three quarters of the epochs
RESUMABLE = {"epochs", "resume", "out", "overwrite", "eval_every", "eval_reward", "save_every", "wandb", "device",
             "generate"}  # the settings a --resume may change; the others define the run


def default_of(name, method, model):
    """The value a setting takes when its flag is not given: from the first table that has it, else Args'."""
    tables = ChainMap(SMALL_MODEL_DEFAULTS.get((model, method), {}), METHOD_DEFAULTS.get(method, {}), COMMON_DEFAULTS)
    return tables.get(name, FIELDS[name].default)


def build_parser():
    """One flag per Args field, in GROUPS, each help line ending with its default(s)."""
    parser = argparse.ArgumentParser(description="DiffExp reward fine-tuning (DDPO / AlignProp) of Stable Diffusion.")
    for name, f in FIELDS.items():
        if name in GROUPS:
            group = parser.add_argument_group(GROUPS[name])
        def shown(model):  # "5.0" or "ddpo 5.0, alignprop 7.5"
            ddpo, alignprop = (default_of(name, method, model) for method in METHOD_DEFAULTS)
            return f"ddpo {ddpo}, alignprop {alignprop}" if ddpo != alignprop else ddpo
        small = "".join(f"; {model} {shown(model)}" for model in dict.fromkeys(m for m, _ in SMALL_MODEL_DEFAULTS)
                        if any(name in SMALL_MODEL_DEFAULTS[model, method] for method in METHOD_DEFAULTS))
        flag, doc = "--" + name.replace("_", "-"), f"{f.metadata['doc']} (default: {shown(None)}{small})"
        if f.type is bool:
            group.add_argument(flag, action="store_true", help=f.metadata["doc"])
        else:
            choices = {"method": METHOD_DEFAULTS, "dtype": ["fp32", "fp16", "bf16"]}.get(name)
            group.add_argument(flag, type=f.type, default=f.default, help=doc, choices=choices)
    return parser


def try_writing(run_dir):
    """Do what a run will do, make run_dir and write a file in it, then undo both (os.access can be fooled, e.g. as
    root under /proc). Returns None, or why it failed."""
    path, missing = os.path.abspath(run_dir), []
    while not os.path.exists(path):
        missing.append(path)  # deepest first
        path = os.path.dirname(path)
    try:
        os.makedirs(run_dir, exist_ok=True)
        open(os.path.join(run_dir, f".write-test-{os.getpid()}"), "w").close()
        os.remove(os.path.join(run_dir, f".write-test-{os.getpid()}"))
    except OSError as e:
        return e.strerror or str(e)
    finally:
        for path in filter(os.path.isdir, missing):
            os.rmdir(path)


if __name__ == "__main__":  # --help, malformed flags and an unwritable --out, answered before torch loads (a second)
    early = (parser := build_parser()).parse_args()
    if early.out and int(os.environ.get("RANK", 0)) == 0 and (error := try_writing(early.out)):
        parser.exit(2, f"error: cannot write the run directory {early.out} ({error}); choose another --out.\n")

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torchvision.utils import make_grid
from tqdm.auto import tqdm

import rewards
import shapes


# ---- DiffExp: Eq. (7) and Eq. (8).
def cfg_scale_schedule(timesteps, w_low, w_high, t_thres):
    """Eq. (7): w_t = w_low if t > t_thres else w_high. timesteps [T] count down (981 ... 1)."""
    return torch.where(torch.as_tensor(timesteps) > t_thres, w_low, w_high).float()  # [T]


def weight_prompt_embeds(prompt_embeds, empty_embeds, token_index, alpha):
    """Eq. (8): c'_i = c_empty_i + alpha * (c_i - c_empty_i) at one position i per sample, the others unchanged.
    prompt_embeds c [B, L, D], empty_embeds c_empty [1 or B, L, D] (of the prompt ""), token_index i [B], alpha [B]."""
    rows = torch.arange(len(prompt_embeds), device=prompt_embeds.device)  # [B]
    c_i = prompt_embeds[rows, token_index].float()  # [B, D]
    c_empty_i = empty_embeds.expand_as(prompt_embeds)[rows, token_index].float()  # [B, D]
    alpha = alpha.to(prompt_embeds.device, torch.float32)[:, None]  # [B, 1]; fp32, as bf16 rounds to steps of 1/128
    return prompt_embeds.index_put((rows, token_index), (c_empty_i + alpha * (c_i - c_empty_i)).to(prompt_embeds.dtype))


def draw_prompt_weights(input_ids, special_ids, alpha_min, alpha_max, generator):
    """Eq. (8)'s random draw, per sample: a token position i uniform over the real tokens of input_ids [B, L] (CPU),
    never special_ids (BOS, EOS, padding), and alpha ~ U(alpha_min, alpha_max). Returns token_index [B], alpha [B]."""
    real = ~torch.isin(input_ids, torch.as_tensor(list(special_ids)))  # [B, L], True at real tokens
    if not real.any(dim=1).all():
        raise ValueError("a prompt has no tokens to weight (is it empty?); give every prompt some text.")
    # The argmax of i.i.d. uniform scores over the real positions is a uniform choice among them.
    token_index = torch.where(real, torch.rand(input_ids.shape, generator=generator), -1.0).argmax(dim=1)  # [B]
    return token_index, alpha_min + (alpha_max - alpha_min) * torch.rand(input_ids.shape[0], generator=generator)


# ---- The sampler: Eq. (4) guidance, Eq. (2)-(3) DDIM steps with log-probs, the denoising loop.
def cfg_noise_pred(unet, x_t, t, cond, uncond, w):
    """Eq. (4): eps = eps(x_t, t, c_empty) + w * (eps(x_t, t, c) - eps(x_t, t, c_empty)), in fp32 [B, C, h, w].
    cond, uncond: the two branches' UNet conditioning, dicts of tensors [B or 1, ...] ("encoder_hidden_states";
    SDXL adds its pooled "text_embeds" and size "time_ids"). t, w: one value or one per sample [B]."""
    B, dtype = x_t.shape[0], cond["encoder_hidden_states"].dtype
    t = torch.as_tensor(t, device=x_t.device).expand(B)  # [B]
    w = torch.as_tensor(w, device=x_t.device, dtype=torch.float32).expand(B)  # [B]

    def eps(x, t, c):  # SDXL's pooled text embedding and size ids go in added_cond_kwargs
        added = {k: v.to(dtype) for k, v in c.items() if k != "encoder_hidden_states"}
        out = unet(x.to(dtype), t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added or None)
        return out.sample.float()

    if (w == 1).all():  # one UNet branch on B samples instead of the pair on 2B (also where every w is 0)
        return eps(x_t, t, cond)
    uncond = {k: v.expand_as(cond[k]) for k, v in uncond.items()}  # [1 or B, ...] -> [B, ...]
    if (w == 0).all():
        return eps(x_t, t, uncond)
    pair = {k: torch.cat([uncond[k], cond[k]]) for k in cond}  # [2B, ...], unconditional half first (as diffusers)
    eps_uncond, eps_cond = eps(torch.cat([x_t, x_t]), torch.cat([t, t]), pair).chunk(2)
    return eps_uncond + w.view(B, 1, 1, 1) * (eps_cond - eps_uncond)


def ddim_step_with_logprob(scheduler, noise_pred, timestep, latents, eta, prev_latents=None, generator=None):
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy (Eq. 2-3; DDPO's formulation) with DDIMScheduler.step's
    mean (SD never clips); latents = x_t, noise_pred = eps, timestep an int or [B]. Without prev_latents, x_{t-1} =
    mu + sigma_t z, z ~ N(0, I) from `generator`; with them, the given x_{t-1} is scored (DDPO's training pass).
    Returns (prev_latents [B, C, h, w], log_prob [B] averaged over C*h*w, or None when eta == 0: no density)."""
    t = torch.as_tensor(timestep).cpu().long()
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # t counts down
    abar = scheduler.alphas_cumprod  # abar_{t_prev} of the last step is the scheduler's final alpha
    abar_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    abar_t, abar_prev = (a.to(latents.device, torch.float32).view(-1, 1, 1, 1) for a in (abar[t], abar_prev))  # [B|1]
    x0_hat = (latents - (1 - abar_t).sqrt() * noise_pred) / abar_t.sqrt()  # predicted x_0 (DDIM paper Eq. 12)
    std = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()  # sigma_t
    mu = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).sqrt() * noise_pred  # Eq. (2)'s mean
    if eta == 0:
        if prev_latents is not None:
            raise ValueError("eta = 0 makes the DDIM step deterministic, so a given x_{t-1} has no density.")
        return mu, None
    if prev_latents is None:  # sample x_{t-1} ~ N(mu, sigma_t^2 I), Eq. (3), with noise on the generator's device
        z = torch.randn(latents.shape, generator=generator, device=generator.device if generator else latents.device)
        prev_latents = mu + std * z.to(latents.device)
    # log N(x_{t-1}; mu, sigma_t^2 I), averaged over dimensions; the sample itself is data (detached)
    log_prob = -((prev_latents.detach() - mu) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return prev_latents, log_prob.mean(dim=(1, 2, 3))  # [B]


def decode_latents(vae, latents):
    """VAE decode of x_0 latents [B, 4, h, w] to images [B, 3, H, W] in [0, 1], fp32."""
    return (vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)


def sample(pipe, cond, uncond, scales, latents, eta, generator=None, backprop_steps=None, checkpoint=False):
    """The DDIM denoising loop with a guidance scale per step (Eq. 7) and an embedding per sample (Eq. 8).
    pipe.scheduler must have had set_timesteps(T); cond, uncond: the CFG branches' conditioning (see sample_batch);
    scales [T]; latents [B, C, h, w]: the noise x_T. Under grad, backprop_steps=K keeps the graph of the last K
    steps only (AlignProp's truncated backprop): earlier steps run under no_grad, the same as detaching their eps,
    as x_t depends on the weights only through eps. Returns the trajectory x_T ... x_0, log-probs, images and inputs."""
    def run(fn, *inputs):  # checkpoint=True: under grad, recomputed in backward, so memory stays flat in K and T
        if checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False)
        return fn(*inputs)

    timesteps, T = pipe.scheduler.timesteps, len(pipe.scheduler.timesteps)
    if len(scales) != T:
        raise ValueError(f"got {len(scales)} guidance scales for {T} timesteps; compute them from scheduler.timesteps.")
    x_t, trajectory, log_probs = latents, [latents], []
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and (backprop_steps is None or i >= T - backprop_steps)):
            eps = run(cfg_noise_pred, pipe.unet, x_t, t, cond, uncond, scales[i])
            x_t, log_prob = ddim_step_with_logprob(pipe.scheduler, eps, t, x_t, eta, generator=generator)
        trajectory.append(x_t)
        log_probs.append(log_prob)
    return dict(latents=torch.stack(trajectory, dim=1),  # T+1 x [B, C, h, w] -> [B, T+1, C, h, w]
                log_probs=None if eta == 0 else torch.stack(log_probs, dim=1),  # T x [B] -> [B, T]
                scales=torch.as_tensor(scales).expand(len(latents), -1),  # [T] -> [B, T]: stored per sample for DDPO
                timesteps=timesteps, cond=cond, uncond=uncond, images=run(decode_latents, pipe.vae, x_t))


@torch.no_grad()  # the text encoders are frozen
def encode_prompts(pipe, prompts):
    """The UNet's text conditioning for `prompts`, as StableDiffusion[XL]Pipeline computes it, and the token ids
    [B, L] (CPU) for Eq. 8. SD 1.5: {"encoder_hidden_states": the last layer [B, L, 768]}. SDXL: both encoders'
    penultimate layers [B, L, 768 + 1280], the pooled "text_embeds" [B, 1280], "time_ids" [B, 6] (sizes, no crop)."""
    def token_ids(tokenizer):  # padded and truncated to the tokenizer's model_max_length (77)
        return tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids

    input_ids = token_ids(pipe.tokenizer)
    if not hasattr(pipe, "text_encoder_2"):
        return {"encoder_hidden_states": pipe.text_encoder(input_ids.to(pipe.device))[0]}, input_ids
    first = pipe.text_encoder(input_ids.to(pipe.device), output_hidden_states=True)
    second = pipe.text_encoder_2(token_ids(pipe.tokenizer_2).to(pipe.device), output_hidden_states=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=pipe.device).expand(len(prompts), -1)  # [B, 6]
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # [B, L, 768 + 1280]
    return {"encoder_hidden_states": hidden, "text_embeds": second.text_embeds, "time_ids": time_ids}, input_ids


def sample_batch(pipe, prompts, generator, w_high, eta, explore=False, w_low=1.0, t_thres=900, alpha_min=1.0,
                 alpha_max=2.0, backprop_steps=None, checkpoint=False):
    """One batch for `prompts` from x_T ~ N(0, I) drawn from `generator`: with `explore`, Eq. 8's weighting (per
    sample) and Eq. 7's schedule, else plain CFG at w_high. Needs scheduler.set_timesteps; returns sample()'s dict."""
    cond, input_ids = encode_prompts(pipe, prompts)
    c_empty, _ = encode_prompts(pipe, [""])  # [1, ...], Eq. 8's reference
    zeros = getattr(pipe.config, "force_zeros_for_empty_prompt", False)  # SDXL's uncond: zeros, but the size ids
    uncond = {k: v if k == "time_ids" or not zeros else torch.zeros_like(v) for k, v in c_empty.items()}
    scales = cfg_scale_schedule(pipe.scheduler.timesteps, w_low if explore else w_high, w_high, t_thres)  # [T]
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    latents = torch.randn((len(prompts), channels, size, size), generator=generator).to(pipe.device)  # x_T
    # Eq. 8 draws from a generator of its own, seeded from `generator` whether or not it explores: DiffExp and its
    # baseline then draw the same x_T and DDIM noise from one seed (paired comparisons).
    eq8_generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    if explore:
        special = pipe.tokenizer.all_special_ids  # BOS, EOS and padding
        token_index, alpha = draw_prompt_weights(input_ids, special, alpha_min, alpha_max, eq8_generator)
        # Eq. 8 weights the per-token embeddings (on SDXL both encoders' at once), not SDXL's pooled one
        c, c_empty = cond["encoder_hidden_states"], c_empty["encoder_hidden_states"]
        cond = cond | {"encoder_hidden_states": weight_prompt_embeds(c, c_empty, token_index, alpha)}
    return sample(pipe, cond, uncond, scales, latents, eta, generator, backprop_steps, checkpoint)


# ---- DDPO (Black et al. 2024): per-prompt advantages and the clipped-ratio loss of Eq. (6).
def draw_prompt_ids(num_prompts, n, k, generator):
    """An epoch's n prompt ids [n]: n // k prompts drawn uniformly, k samples of each in a row. k = 1 is the paper's
    independent draws; with k > 1 (ours, as GRPO-style trainers) DDPO compares samples of one prompt at once."""
    return torch.randint(num_prompts, (n // k,), generator=generator).repeat_interleave(k)


class PerPromptStatTracker:
    """DDPO's per-prompt advantages (r - mean) / (std + 1e-6): over the prompt's last `buffer_size` rewards (kept
    across epochs) once it has `min_count` of them, and over the whole batch before that."""

    def __init__(self, buffer_size, min_count):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, {}  # buffers: prompt -> its rewards

    def update(self, prompts, rewards):
        prompts, rewards = np.asarray(prompts), np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            r = rewards[prompts == prompt]
            buffer = self.buffers[prompt] = (self.buffers.get(prompt, []) + r.tolist())[-self.buffer_size :]
            stats = buffer if len(buffer) >= self.min_count else rewards
            advantages[prompts == prompt] = (r - np.mean(stats)) / (np.std(stats) + 1e-6)
        return advantages


def ddpo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """The clipped-ratio surrogate of Eq. (6): with A = clamp(advantage, -adv_clip_max, adv_clip_max)
    and r = exp(log_prob - old_log_prob), loss = mean(max(-A r, -A clamp(r, 1 - eps, 1 + eps)))."""
    A = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()


def ddpo_log_prob(pipe, batch, i, s, eta):
    """log pi_theta(x_{t-1} | x_t, c) of stored transitions (samples i [b], step indices s [b]), with the SAME w_t
    and weighted c' that sampling used: otherwise the ratio would compare two different policies."""
    t = batch["timesteps"][s]  # [b]
    x_t, x_prev = batch["latents"][i, s], batch["latents"][i, s + 1]  # [b, C, h, w] each
    cond = {k: v[i] for k, v in batch["cond"].items()}
    eps = cfg_noise_pred(pipe.unet, x_t, t, cond, batch["uncond"], batch["scales"][i, s])
    return ddim_step_with_logprob(pipe.scheduler, eps, t, x_t, eta, prev_latents=x_prev)[1]


def ddpo_epoch(pipe, reward_fn, prompts, args, explore, generator, optimizer, scaler, tracker, world):
    """One DDPO epoch on this process's share of --batch-size: sample, score, normalise, update."""
    n, mb = args.batch_size // world, args.micro_batch_size
    # 1. Sample trajectories without a graph (DiffExp's Eq. 7 and 8 when `explore`), score them.
    samples, shown = [], []
    with torch.no_grad():
        for ids in tqdm(draw_prompt_ids(len(prompts), n, args.samples_per_prompt, generator).split(mb), desc="sampling",
                        disable=not is_main()):
            drawn = [prompts[k] for k in ids]
            out = sample_batch(pipe, drawn, generator, explore=explore, **sampling(args))
            out["rewards"], out["prompt_ids"] = reward_fn(out["images"], drawn).float(), ids
            images = out.pop("images").cpu()  # only the grid's 16 are kept: at 512 px they are large
            shown += list(zip(images, drawn, [{args.reward: r} for r in out["rewards"].tolist()]))[: 16 - len(shown)]
            samples.append(out)
    batch = {k: torch.cat([s[k] for s in samples]) for k in ("latents", "log_probs", "scales", "rewards", "prompt_ids")}
    batch["cond"] = {k: torch.cat([s["cond"][k] for s in samples]) for k in samples[0]["cond"]}
    batch["uncond"], batch["timesteps"] = samples[0]["uncond"], pipe.scheduler.timesteps
    # 2. Advantages from the rewards of every process, normalised per prompt.
    rewards, prompt_ids = all_gather(batch["rewards"], world), all_gather(batch["prompt_ids"].to(pipe.device), world)
    stats = dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item())
    if not torch.isfinite(rewards).all():  # never let a NaN into the buffers or the weights
        return stats | dict(skipped_updates=1), shown
    advantages = tracker.update([prompts[k] for k in prompt_ids.tolist()], rewards.cpu().numpy())
    rank = torch.distributed.get_rank() if world > 1 else 0
    advantages = torch.as_tensor(advantages, dtype=torch.float32).view(world, n)[rank].to(pipe.device)  # this process's
    # 3. Clipped-ratio updates over shuffled (sample, timestep) pairs, --inner-epochs times.
    T, T_train = len(batch["timesteps"]), max(1, int(args.timestep_fraction * len(batch["timesteps"])))
    per_update = args.train_batch_size // world // mb  # micro-batches per optimizer step
    log, norms, finite = [], [], True  # log: per (micro-batch, step) loss, approx_kl, clipfrac; norms: per update
    for _ in range(args.inner_epochs):
        order = torch.randperm(n, generator=generator).split(mb)  # micro-batches of sample indices i [mb]
        steps = torch.stack([torch.randperm(T, generator=generator)[:T_train] for _ in range(n)])  # [n, T_train]
        for m, i in enumerate(tqdm(order, desc="training", disable=not is_main())):
            for s in steps[i].T:  # s [mb]: each sample trains on its own shuffled steps
                log_prob, old_log_prob = ddpo_log_prob(pipe, batch, i, s, args.eta), batch["log_probs"][i, s]
                loss = ddpo_loss(log_prob, old_log_prob, advantages[i], args.clip_range, args.adv_clip_max)
                log_ratio = (log_prob - old_log_prob).detach()
                scaler.scale(loss / (per_update * T_train)).backward()
                finite &= bool(torch.isfinite(loss))
                log.append([loss.item(), 0.5 * (log_ratio**2).mean().item(),
                            (log_ratio.exp().sub(1).abs() > args.clip_range).float().mean().item()])
            if (m + 1) % per_update == 0:
                norms.append(optimizer_step(optimizer, scaler, args.max_grad_norm, world, finite))
                finite = True
    means = all_gather(torch.as_tensor(np.mean(log, axis=0), device=pipe.device), world).view(world, 3).mean(0)
    return stats | dict(zip(("loss", "approx_kl", "clipfrac"), means.tolist())) | update_stats(norms), shown


# ---- AlignProp (Prabhudesai et al. 2023): truncated backprop of a differentiable reward.
def alignprop_loss(pipe, reward_fn, prompts, generator, K, loss_coeff, **sampling_settings):
    """AlignProp's objective for one batch: sample with the UNet's gradient kept through the last K steps
    (each call checkpointed), decode, score; loss = -loss_coeff * mean(reward). Returns (loss, rewards [B], images)."""
    out = sample_batch(pipe, prompts, generator, backprop_steps=K, checkpoint=True, **sampling_settings)
    reward = reward_fn(out["images"], prompts)
    return -loss_coeff * reward.mean(), reward, out["images"]


def alignprop_epoch(pipe, reward_fn, prompts, args, explore, generator, optimizer, scaler, world):
    """One AlignProp epoch on this process's share of --batch-size: one truncation depth K per batch, as the paper."""
    n, mb = args.batch_size // world, args.micro_batch_size
    per_update = args.train_batch_size // world // mb
    K_max, random_K = args.backprop_steps or args.steps, args.backprop_random or args.backprop_steps is None
    rewards, losses, shown, norms, finite = [], [], [], [], True
    ids = draw_prompt_ids(len(prompts), n, args.samples_per_prompt, generator).split(mb)
    for m in tqdm(range(n // mb), desc="alignprop", disable=not is_main()):
        drawn = [prompts[k] for k in ids[m]]
        K = int(torch.randint(1, K_max + 1, (1,), generator=generator)) if random_K else K_max  # K ~ U{1..K_max}
        loss, reward, images = alignprop_loss(pipe, reward_fn, drawn, generator, K, args.loss_coeff, explore=explore,
                                              **sampling(args))
        scaler.scale(loss / per_update).backward()
        finite &= bool(torch.isfinite(loss))
        rewards.append(reward.detach().float())
        losses.append(loss.item())
        shown += list(zip(images.detach().cpu(), drawn, [{args.reward: r} for r in reward.tolist()]))[: 16 - len(shown)]
        if (m + 1) % per_update == 0:
            norms.append(optimizer_step(optimizer, scaler, args.max_grad_norm, world, finite))
            finite = True
    rewards = all_gather(torch.cat(rewards), world)
    stats = dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item())
    loss = all_gather(torch.tensor([np.mean(losses)], device=pipe.device), world).mean().item()  # over processes
    return stats | dict(loss=loss) | update_stats(norms), shown


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
    return norm.item() if ok else None  # the norm of the unscaled gradients


def update_stats(norms):  # an epoch's optimizer steps (None: skipped): mean gradient norm before clipping, skips
    return dict(grad_norm=np.mean([n for n in norms if n is not None] or [math.nan]).item(),
                skipped_updates=norms.count(None))


# ---- Models: Stable Diffusion (or an offline model of shapes.py) with a LoRA on its UNet.
HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES_MODEL = os.path.join(HERE, "shapes_model")  # made by `python shapes.py pretrain`


def load_pipeline(model, lora_rank, device, dtype):
    """An SD 1.x or SDXL pipeline from a hub id or a directory ("shapes": shapes_model/; "tiny", "tiny-sdxl": random,
    from shapes.tiny_pipeline) with a DDIM scheduler, frozen weights in `dtype` on `device` and an fp32 LoRA."""
    if model in ("tiny", "tiny-sdxl"):
        pipe = shapes.tiny_pipeline(sdxl=model == "tiny-sdxl", dtype=dtype)
    for offline in (True, False) if model not in ("tiny", "tiny-sdxl") else ():  # the cache first: no network needed
        try:
            pipe = DiffusionPipeline.from_pretrained(SHAPES_MODEL if model == "shapes" else model, dtype=dtype,
                                                     local_files_only=offline, safety_checker=None,
                                                     requires_safety_checker=False)
            break
        except (OSError, ValueError) as e:
            if not offline:
                raise ValueError(f"cannot load --model {model!r} ({type(e).__name__}): not a pipeline directory nor on "
                                 "the hub; check the id, the network, HF_HUB_OFFLINE or use --model shapes.") from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ValueError(f"--model {model!r} is a {type(pipe).__name__}; this code fine-tunes SD 1.x and SDXL.")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # DDPO's policy is the DDIM step
    if pipe.scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"{model!r} predicts {pipe.scheduler.config.prediction_type!r}; this code needs epsilon.")
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


# ---- The run: prompts, evaluation, grids, checkpoints, several processes.
PROMPTS_FILE = os.path.join(HERE, "prompts.txt")
EVAL_SEED = 1234  # evaluation always draws the same noise: seed (seed, EVAL_SEED, rank)


def sampling(args):
    """The sampling settings of a run, as sample_batch takes them."""
    return {k: getattr(args, k) for k in ("w_high", "eta", "w_low", "t_thres", "alpha_min", "alpha_max")}


def load_prompts(name):
    """The prompts of a text file, one per line, or else the [name] set of prompts.txt, where a `[name]` line
    opens a set and each later line is one of its prompts. Lines starting with # are comments."""
    own_file = os.path.isfile(name)
    with open(name if own_file else PROMPTS_FILE, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    starts = [k for k, line in enumerate(lines) if line.startswith("[") and line.endswith("]")] + [len(lines)]
    if not own_file and starts[0] > 0:
        raise ValueError(f"prompts.txt: the prompt {lines[0]!r} comes before any [set] line.")
    sets = {name: lines} if own_file else {lines[a][1:-1]: lines[a + 1 : b] for a, b in zip(starts, starts[1:])}
    if not sets.get(name):
        raise ValueError(f"prompts {name!r}: no such file, nor a set of prompts.txt with prompts ({', '.join(sets)}).")
    return sets[name]


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


@torch.no_grad()
def evaluate(pipe, reward_fns, prompt_sets, args, world):
    """Plain sampling from fixed noise on each prompt set, every prompt, cycled to at least --batch-size images.
    Returns the mean rewards {"eval_SET_REWARD": float} and this process's (image, prompt, {reward: score}) per set."""
    rank, mb, metrics, shown = (torch.distributed.get_rank() if world > 1 else 0), args.micro_batch_size, {}, {}
    for set_name, prompts in prompt_sets.items():
        n = -(-max(args.batch_size, len(prompts)) // (world * mb)) * world * mb  # rounded up to whole micro-batches
        own = [prompts[k % len(prompts)] for k in range(rank * n // world, (rank + 1) * n // world)]
        rng = seeded_generator(args.seed, EVAL_SEED, rank)
        batches = tqdm(range(0, len(own), mb), desc=f"evaluating {set_name}", disable=not is_main())
        images = torch.cat([sample_batch(pipe, own[k : k + mb], rng, **sampling(args))["images"] for k in batches])
        scores = {name: torch.cat([fn(images[k : k + mb], own[k : k + mb]).float() for k in range(0, len(own), mb)])
                  for name, fn in reward_fns.items()}  # [len(own)] each
        metrics |= {f"eval_{set_name}_{name}": all_gather(s, world).mean().item() for name, s in scores.items()}
        shown[set_name] = [(image, prompt, {name: s[k].item() for name, s in scores.items()})
                           for k, (image, prompt) in enumerate(zip(images.cpu(), own))]
    return metrics, shown


def save_grid(path, shown, columns=4):
    """(image [3, H, W] in [0, 1], prompt, {reward: score}) triples as one PNG, each image captioned under it."""
    images = torch.stack([image for image, _, _ in shown]).float().cpu()
    size = min(max(images.shape[-1], 128), 256)  # small images enlarged so that their captions fit, large ones shrunk
    captions = [textwrap.wrap(f"{prompt} (" + ", ".join(f"{name} {score:.3g}" for name, score in scores.items()) + ")",
                              width=size // 6) for _, prompt, scores in shown]
    strip = 11 * max(map(len, captions)) + 2  # a white strip under each image for its caption
    images = F.interpolate(images, size=(size, size), mode="nearest-exact" if size > images.shape[-1] else "area")
    grid = make_grid(F.pad(images, (0, 0, 0, strip), value=1.0), nrow=columns, padding=2, pad_value=1.0)
    picture = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())  # CHW -> HWC
    for k, lines in enumerate(captions):
        xy = (4 + (k % columns) * (size + 2), 3 + (k // columns) * (size + strip + 2) + size)
        ImageDraw.Draw(picture).multiline_text(xy, "\n".join(lines), fill="black", spacing=1)
    picture.save(path)


def save_checkpoint(run_dir, pipe, optimizer, scaler, tracker, epoch):
    """Write run_dir/checkpoint, the LoRA as diffusers' load_lora_weights(dir) reads it, then state.pt (epoch,
    optimizer, scaler, DDPO buffers), via checkpoint.tmp: a crash or a full disk never leaves the run without one."""
    final, tmp = os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "checkpoint.tmp")
    if not os.path.exists(final) and os.path.exists(os.path.join(tmp, "state.pt")):
        os.replace(tmp, final)  # the last save was cut after removing the old one: its checkpoint.tmp is complete
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # state.pt last: a checkpoint.tmp with a state.pt is complete
        type(pipe).save_lora_weights(tmp, convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
        torch.save(dict(epoch=epoch, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        tracker=tracker and tracker.buffers), os.path.join(tmp, "state.pt"))
    except Exception as e:  # a full disk: OSError from PIL or os, RuntimeError from torch.save, safetensors' own
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise OSError(f"could not write a checkpoint to {run_dir} ({reason}); the last good one is intact.") from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_checkpoint(run_dir, unet=None):
    """State of run_dir/checkpoint (or a complete checkpoint.tmp, after a crash); its LoRA goes into `unet` if given."""
    path = next((os.path.join(run_dir, name) for name in ("checkpoint", "checkpoint.tmp")
                 if os.path.exists(os.path.join(run_dir, name, "state.pt"))), None)
    if path is None:
        raise ValueError(f"{run_dir} has no checkpoint (expected {run_dir}/checkpoint/state.pt).")
    if unet is not None:
        lora = load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))  # keys "unet.<module>..."
        set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in lora.items()}))
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)


# ---- Command line.
def parse_args(argv=None):
    """Args from the command line, unset settings from the defaults' tables (with --resume or --generate, the
    run's own). All that can be checked before loading anything is: bad input stops with one line."""
    def fail(message):  # one line from rank 0; other ranks exit 0, or torchrun might kill rank 0 before it prints
        parser.exit(*((2, f"error: {message}\n") if int(os.environ.get("RANK", 0)) == 0 else (0, "")))
    parser = build_parser()
    parser.error = fail
    namespace = parser.parse_args(argv)
    run_dir = namespace.resume or namespace.generate
    if run_dir:  # the run's own settings are the defaults; for --resume, a flag given again must agree
        try:
            with open(os.path.join(run_dir, "config.json")) as f:
                saved = {k: v for k, v in json.load(f).items() if k not in ("resume", "overwrite", "generate")}
        except (OSError, ValueError):  # missing, or cut short
            fail(f"{run_dir}: no config.json there, or not valid JSON; is it a run directory?")
        parser.set_defaults(**saved)
        namespace = parser.parse_args(argv)
        for name, value in vars(namespace).items():
            if namespace.resume and name in saved and name not in RESUMABLE and saved[name] != value:
                fail(f"--resume {run_dir}: setting {name} was {saved[name]!r} there and is {value!r} now.")
    args = Args(**{k: default_of(k, namespace.method, namespace.model) if v is None else v
                   for k, v in vars(namespace).items()})
    try:
        rewards.check_reward(args.reward, need_grad=args.method == "alignprop")
        rewards.check_reward(args.eval_reward or args.reward)
        prompts = load_prompts(args.prompts) + load_prompts(args.eval_prompts)
        for prompt in prompts:  # the shapes world's rewards read their prompts: captions of shapes.py
            for name in filter(None, (args.reward, args.eval_reward)):
                rewards.check_prompt(name, prompt)
    except ValueError as e:
        fail(str(e))
    world, mb = int(os.environ.get("WORLD_SIZE", 1)), args.micro_batch_size
    for name in ("epochs", "batch_size", "samples_per_prompt", "micro_batch_size", "train_batch_size", "steps",
                 "lora_rank", "inner_epochs"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1.")
    checks = [
        (args.seed < 0, "--seed must be at least 0."),
        (not 0 <= args.t_thres < 1000, f"--t-thres {args.t_thres} is outside [0, 1000), SD's timesteps."),
        (args.alpha_min > args.alpha_max, f"--alpha-min {args.alpha_min} is above --alpha-max {args.alpha_max}."),
        (args.method == "ddpo" and args.eta <= 0, "DDPO needs --eta > 0: a DDIM step with eta 0 has no log-prob."),
        (args.backprop_steps is not None and not 1 <= args.backprop_steps <= args.steps,
         f"--backprop-steps must be between 1 and --steps ({args.steps})."),
        (not 0 < args.timestep_fraction <= 1, "--timestep-fraction must be in (0, 1]."),
        (args.train_batch_size % (world * mb), f"--train-batch-size {args.train_batch_size} is not a multiple of "
         f"{world} process(es) x --micro-batch-size {mb}."),
        (args.batch_size % args.train_batch_size, f"--batch-size {args.batch_size} is not a multiple of "
         f"--train-batch-size {args.train_batch_size}."),
        (args.batch_size // world % args.samples_per_prompt, f"--batch-size {args.batch_size} over {world} process(es) "
         f"is not a multiple of --samples-per-prompt {args.samples_per_prompt}."),
        (args.device and args.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"),
         f"--device {args.device!r} is not a torch device; use e.g. cuda, cuda:1 or cpu."),
        (args.wandb and not importlib.util.find_spec("wandb"), "--wandb needs the wandb package: pip install wandb."),
        (os.path.isdir(args.model) and not os.path.exists(os.path.join(args.model, "model_index.json")),
         f"--model {args.model}: no model_index.json in it; give a diffusers pipeline directory."),
    ]
    for bad, message in checks:
        if bad:
            fail(message)
    if not args.generate:  # the run directory: a new one, or --overwrite of an old run, in a writable place
        changed = "-".join(f"{n}={v}" for n, v in vars(args).items() if v != default_of(n, args.method, args.model)
                           and n not in RESUMABLE | {"method", "reward", "model", "no_explore", "seed"})
        changed = changed if len(changed) <= 80 else "custom" + hashlib.sha1(changed.encode()).hexdigest()[:8]
        name = [args.method, args.reward, os.path.basename(args.model.rstrip("/")), "baseline" if args.no_explore
                else "diffexp", changed.replace("/", "_"), f"s{args.seed}"]
        args.out = args.resume or args.out or os.path.join("runs", "-".join(filter(None, name)))
        is_run = os.path.exists(os.path.join(args.out, "config.json"))
        if not args.resume and os.path.exists(args.out) and not (args.overwrite and is_run):
            fail(f"--overwrite: {args.out} is not a run directory (no config.json); delete it yourself if you mean it."
                 if args.overwrite else f"{args.out} exists; pass --resume {args.out}, --overwrite or another --out.")
        if int(os.environ.get("RANK", 0)) == 0 and (error := try_writing(args.out)):  # the one process that writes
            fail(f"cannot write the run directory {args.out} ({error}); choose another --out.")
    return args


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


def start_run_dir(args, start):
    """Create the run directory (replacing it with --overwrite), write config.json, start W&B; on --resume, drop
    the log lines of epochs after the checkpoint: the resumed run redoes them."""
    if os.path.exists(args.out) and not args.resume:  # --overwrite (parse_args checked it is a run directory)
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    with open(os.path.join(args.out, "log.jsonl"), "a+") as f:
        f.seek(0)
        kept = [line for line in f if line.endswith("}\n") and json.loads(line)["epoch"] <= start]  # not cut short
        f.truncate(0)
        f.writelines(kept)
    if args.wandb:  # an optional package: parse_args checked that it is installed
        importlib.import_module("wandb").init(project="diffexp", name=os.path.basename(args.out), config=vars(args))


STOP = []  # set by SIGINT / SIGTERM: the run finishes its epoch, saves and exits 0


def on_signal(signum, frame):
    if STOP:  # a second signal: stop at once
        raise KeyboardInterrupt
    STOP.append(signum)
    if is_main():
        print(f"\nsignal {signum}: finishing this epoch, then saving and stopping (again: now, unsaved)", flush=True)


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}  # restored at the end
    STOP.clear()
    logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)  # its retry warnings: failures say why
    try:  # every failure (no GPU, a missing model or download, a full disk) is one line, not a traceback
        state = load_checkpoint(args.out) if args.resume else dict(epoch=0)
        if state["epoch"] >= args.epochs:
            return print(f"{args.out} has trained its {state['epoch']} epochs already; pass a larger --epochs.")
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
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # on GPUs that have it
        tiny = args.model in ("tiny", "tiny-sdxl")
        if is_main():
            resumed = f", resumed after epoch {state['epoch']}" if args.resume else ""
            print(f"run directory {args.generate or args.out}{resumed}")
            print(f"device {device}, frozen weights {dtype_name}, LoRA weights and losses fp32, {world} process(es); "
                  f"reward {args.reward}{' (tiny random networks)' if tiny else ''}")
        # The shapes world's judge scores every evaluation of its rewards: a reward that rises while the judge falls
        # is being hacked. Rewards load before the model, so that a failing download fails sooner.
        judge = ["shapes_judge"] if args.reward in rewards.SHAPES_WORLD else []
        names = dict.fromkeys(filter(None, [args.reward, args.eval_reward, *judge]))
        reward_fns = {name: rewards.load_reward(name, device, dtype, tiny=tiny) for name in names}
        torch.manual_seed(args.seed)  # the LoRA's random initialisation
        pipe = load_pipeline(args.model, args.lora_rank, device, dtype)
        pipe.scheduler.set_timesteps(args.steps)
        if args.generate:  # the evaluation images of --eval-prompts with the run's LoRA and without it
            load_checkpoint(args.generate, pipe.unet)
            for name in ("with_lora", "without_lora"):
                pipe.unet.enable_adapters() if name == "with_lora" else pipe.unet.disable_adapters()
                metrics, shown = evaluate(pipe, reward_fns, {"unseen": load_prompts(args.eval_prompts)}, args, 1)
                save_grid(os.path.join(args.generate, f"generate_{name}.png"), shown["unseen"], columns=8)
                print(f"wrote {args.generate}/generate_{name}.png; mean rewards {metrics}")
            return
        lora = [p for p in pipe.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 gradients need loss scaling
        tracker = PerPromptStatTracker(buffer_size=32, min_count=16) if args.method == "ddpo" else None
        if args.resume:
            load_checkpoint(args.out, pipe.unet)
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            if tracker:
                tracker.buffers = state["tracker"]
        on_rank0(start_run_dir, args, state["epoch"])  # only now, so that a failed set-up leaves no directory behind
        began, row = time.time(), train(pipe, reward_fns, args, optimizer, scaler, tracker, state["epoch"], world, rank)
        scores = "".join(f", {k} {v:.4g}" for k, v in row.items() if k.startswith("eval_"))
        if is_main():
            resume = f"; continue with --resume {args.out}" if row["epoch"] < args.epochs else ""
            print(f"{'stopped' if resume else 'done'} after epoch {row['epoch']} of {args.epochs} in "
                  f"{(time.time() - began) / 60:.1f} min{scores}; files in {args.out}{resume}")
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        sys.exit(f"error: {e}")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(pipe, reward_fns, args, optimizer, scaler, tracker, start, world, rank):
    """The epochs: DiffExp sampling for the first 3/4 of them, an update, evaluation, a log line, checkpoints.
    Every process runs every collective; rank 0 alone writes files. Returns the last log row."""
    def write_epoch(row, grids, save):  # rank 0's files for one epoch
        for name, shown in grids.items():
            save_grid(os.path.join(args.out, f"{name}_{row['epoch']:04d}.png"), shown[:16])
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if args.wandb:
            importlib.import_module("wandb").log(row, step=row["reward_queries"])
        if save:
            save_checkpoint(args.out, pipe, optimizer, scaler, tracker, row["epoch"])

    def evaluated(row, grids):  # the epoch's row and grids, with the evaluation's added
        metrics, shown = evaluate(pipe, reward_fns, eval_sets, args, world)
        return row | metrics, grids | {f"eval_{set_name}": images for set_name, images in shown.items()}

    prompts = load_prompts(args.prompts)
    eval_sets = {"seen": prompts, "unseen": load_prompts(args.eval_prompts)}
    if start == 0 and args.eval_every:  # the starting model, so that curves begin at 0 reward queries
        row, grids = evaluated(dict(epoch=0, reward_queries=0), {})
        on_rank0(write_epoch, row, grids, False)
    for epoch in range(start + 1, args.epochs + 1):
        explore = not args.no_explore and epoch <= math.ceil(EXPLORE_FRACTION * args.epochs)  # as unbroken if resumed
        generator = seeded_generator(args.seed, epoch, rank)
        common = (pipe, reward_fns[args.reward], prompts, args, explore, generator, optimizer, scaler)
        row, shown = ddpo_epoch(*common, tracker, world) if args.method == "ddpo" else alignprop_epoch(*common, world)
        row, grids = dict(epoch=epoch, reward_queries=epoch * args.batch_size, explore=explore) | row, {"train": shown}
        if args.eval_every and (epoch % args.eval_every == 0 or epoch == args.epochs):
            row, grids = evaluated(row, grids)
        stopping = torch.tensor([float(bool(STOP))], device=pipe.device)
        if world > 1:  # stop together: one process's signal stops all of them after the same epoch
            torch.distributed.all_reduce(stopping, op=torch.distributed.ReduceOp.MAX)
        save = epoch == args.epochs or stopping.item() or (args.save_every and epoch % args.save_every == 0)
        on_rank0(write_epoch, row, grids, save)
        if stopping.item():
            break
    return row


if __name__ == "__main__":
    main()
