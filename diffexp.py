"""DiffExp: efficient exploration in reward fine-tuning of text-to-image diffusion models.

A single-file reference implementation of DiffExp (AAAI 2025) on top of its two baselines:
DDPO (policy gradient, Black et al. 2024) and AlignProp (reward backprop, Prabhudesai et al. 2023).
DiffExp changes only how the online samples are drawn during fine-tuning:

  Eq. (7)  dynamic CFG scale: w_t = w_low while t > t_thres (early, noisy steps), then w_high.
  Eq. (8)  random prompt weighting: one random real token i of each prompt is pushed away from the
           empty prompt, c'_i = c_empty_i + alpha * (c_i - c_empty_i), alpha ~ U(alpha_min, alpha_max).

Both run for the first 3/4 of the training epochs only; after that sampling is plain CFG.
The same code runs SD 1.5 and SDXL (two text encoders, pooled embedding and size ids).

Paper map (equation -> function):
  Eq. (2)-(3) DDIM transition as a Gaussian policy  -> ddim_step_with_logprob
  Eq. (4)     classifier-free guidance              -> cfg_noise_pred
  Eq. (6)     DDPO policy gradient (clipped ratio)  -> ddpo_loss, PerPromptStatTracker, ddpo_epoch
  Eq. (7)     CFG schedule                          -> cfg_scale_schedule
  Eq. (8)     prompt weighting                      -> weight_prompt_embeds, draw_prompt_weights
  sampling loop                                     -> sample
  AlignProp truncated reward backprop               -> alignprop_epoch

Our defaults, where the paper gives no value (see also README.md):
  w_low = 1.0 (unguided), t_thres = 900 (the first 5 of 50 DDIM steps), alpha ~ U(1.0, 2.0);
  DDPO: eta 1.0, 32 samples per optimizer step, 1 inner epoch, per-prompt advantage buffers of 32
  (min 16); AlignProp: eta 0, K ~ U{1..steps} drawn once per batch, 64 samples per optimizer step.
Deviations from the baselines' code: the DDIM log-prob is averaged over latent dimensions (as DDPO
does); AlignProp draws its truncation K once per batch, not at every step; steps before the last K
run without a graph at all, and every UNet call under gradient is checkpointed. Several processes
average their LoRA gradients with one all_reduce (no DDP wrapper; see optimizer_step); a resume
needs no RNG state, as every epoch's generator is seeded from (seed, epoch, rank). On SDXL the
unconditional branch is zeros where the pipeline says so (force_zeros_for_empty_prompt).
"""

import argparse
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.utils.checkpoint


# ----------------------------------------------------------------------------------------------
# Settings. One field, one line of doc; method-specific defaults live in METHOD_DEFAULTS.


def arg(default, doc):
    return field(default=default, metadata={"doc": doc})


@dataclass
class Args:
    method: str = arg("alignprop", "fine-tuning method: ddpo (policy gradient) or alignprop (reward backprop)")
    reward: str = arg("aesthetic", "reward from rewards.py: aesthetic, pickscore, hps, jpeg, or an ensemble a+b+c")
    model: str = arg("stable-diffusion-v1-5/stable-diffusion-v1-5", "hub id or directory of an SD 1.x or SDXL pipeline; tiny, tiny-sdxl: random, offline")
    prompts: str = arg("animals", "training prompt set, a [section] of prompts.txt")
    epochs: int = arg(None, "training epochs, each samples --batch-size images (ours: 200; tiny: 6)")
    batch_size: int = arg(None, "images sampled per epoch over all processes (paper: 64; tiny: 16)")
    micro_batch_size: int = arg(None, "images per forward pass on one process (a memory knob); DDPO 4, AlignProp 2")
    train_batch_size: int = arg(None, "samples per optimizer step over all processes; DDPO 32, AlignProp 64 (tiny: 8)")
    steps: int = arg(None, "DDIM denoising steps (paper: 50; tiny: 20)")
    eta: float = arg(None, "DDIM eta; DDPO 1.0 (it needs a density), AlignProp 0.0")
    w_high: float = arg(None, "Eq. 7: ordinary CFG scale, used for t <= t_thres; DDPO 5.0, AlignProp 7.5 (paper)")
    w_low: float = arg(1.0, "Eq. 7: CFG scale for t > t_thres (ours: 1.0, unguided)")
    t_thres: int = arg(900, "Eq. 7: timestep where the scale switches from w_low to w_high (ours: 900)")
    alpha_min: float = arg(1.0, "Eq. 8: lower bound of the prompt weight alpha (ours: 1.0)")
    alpha_max: float = arg(2.0, "Eq. 8: upper bound of the prompt weight alpha (ours: 2.0)")
    no_explore: bool = arg(False, "plain sampling all along: the DDPO / AlignProp baseline without DiffExp")
    lr: float = arg(None, "AdamW learning rate; DDPO 3e-4, AlignProp 1e-3 (paper)")
    weight_decay: float = arg(None, "AdamW weight decay; DDPO 1e-4, AlignProp 0.1")
    max_grad_norm: float = arg(None, "gradient-norm clip; DDPO 1.0, AlignProp 5.0")
    lora_rank: int = arg(4, "LoRA rank on the UNet's to_q, to_k, to_v, to_out.0")
    inner_epochs: int = arg(1, "DDPO: optimisation passes over each sampled batch")
    timestep_fraction: float = arg(1.0, "DDPO: fraction of the denoising steps trained on per sample")
    clip_range: float = arg(1e-4, "DDPO: PPO clip range eps of the likelihood ratio (paper: 1e-4)")
    adv_clip_max: float = arg(5.0, "DDPO: advantages are clipped to [-adv_clip_max, adv_clip_max]")
    backprop_steps: int = arg(None, "AlignProp: a fixed K, the last K steps keep the UNet gradient (default: K ~ U{1..steps})")
    backprop_random: bool = arg(False, "AlignProp: draw K ~ U{1..--backprop-steps} once per batch instead of a fixed K")
    loss_coeff: float = arg(1.0, "AlignProp: loss = -loss_coeff * mean(reward)")
    seed: int = arg(0, "random seed")
    out: str = arg(None, "run directory (default: runs/METHOD-REWARD-diffexp|baseline-sSEED)")
    device: str = arg(None, "torch device (default: cuda if available, else cpu)")
    dtype: str = arg(None, "frozen-weight dtype: fp32, fp16 or bf16 (default: bf16 on cuda, fp32 on cpu)")
    eval_prompts: str = arg("unseen_animals", "prompt set for evaluation on unseen prompts")
    eval_every: int = arg(10, "evaluate (plain sampling, fixed noise) every N epochs and at the end; 0 = never")
    eval_reward: str = arg(None, "an extra reward scored at evaluation only, e.g. imagereward")
    save_every: int = arg(10, "checkpoint every N epochs and at the end; 0 = at the end only")
    resume: str = arg(None, "continue the run in this directory from its last checkpoint, with its settings")
    overwrite: bool = arg(False, "delete an existing --out directory instead of refusing it")
    wandb: bool = arg(False, "also log to Weights & Biases (needs `pip install wandb`)")
    plot: list = arg(None, "draw reward against reward queries for these run directories, then exit")
    plot_out: str = arg("reward_curves.png", "where --plot writes its figure")
    generate: str = arg(None, "write images of --eval-prompts with and without this run's LoRA, then exit")


# The one place where defaults depend on the method (paper appendix B and SPEC.md) or on a tiny model.
COMMON_DEFAULTS = dict(epochs=200, batch_size=64, steps=50)
METHOD_DEFAULTS = {
    "ddpo": dict(w_high=5.0, eta=1.0, lr=3e-4, weight_decay=1e-4, max_grad_norm=1.0, micro_batch_size=4, train_batch_size=32),
    "alignprop": dict(w_high=7.5, eta=0.0, lr=1e-3, weight_decay=0.1, max_grad_norm=5.0, micro_batch_size=2, train_batch_size=64),
}
# --model tiny or tiny-sdxl: a one-minute CPU run; the random UNet reacts weakly to its LoRA, hence the large lr
TINY_MODELS = ("tiny", "tiny-sdxl")
TINY_DEFAULTS = dict(epochs=6, batch_size=16, steps=20, micro_batch_size=4, train_batch_size=8, lr=1e-2)
EXPLORE_FRACTION = 0.75  # paper: exploration runs for the first three quarters of the epochs


# ----------------------------------------------------------------------------------------------
# DiffExp: Eq. (7) and Eq. (8).


def cfg_scale_schedule(timesteps, w_low, w_high, t_thres):
    """Eq. (7): w_t = w_low if t > t_thres else w_high. timesteps [T] count down (981 ... 1)."""
    return torch.where(torch.as_tensor(timesteps) > t_thres, w_low, w_high).float()  # [T]


def weight_prompt_embeds(prompt_embeds, empty_embeds, token_index, alpha):
    """Eq. (8): c'_i = c_empty_i + alpha * (c_i - c_empty_i) at one position i per sample.

    prompt_embeds [B, L, D] is the text encoder's output c, empty_embeds [1 or B, L, D] that of the
    empty prompt "", token_index [B] the chosen position i, alpha [B] the weight. Every other position
    is returned unchanged (bit for bit).
    """
    B = prompt_embeds.shape[0]
    rows = torch.arange(B, device=prompt_embeds.device)
    c_i = prompt_embeds[rows, token_index]  # [B, D]
    c_empty_i = empty_embeds.expand(B, -1, -1)[rows, token_index]  # [B, D]
    alpha = alpha.to(prompt_embeds.device, prompt_embeds.dtype)[:, None]  # [B, 1]
    weighted = prompt_embeds.clone()
    weighted[rows, token_index] = c_empty_i + alpha * (c_i - c_empty_i)
    return weighted


def draw_prompt_weights(input_ids, special_ids, alpha_min, alpha_max, generator):
    """Eq. (8)'s random draw, per sample: a token position i uniform over the prompt's real tokens
    (never BOS, EOS or padding) and alpha ~ U(alpha_min, alpha_max). input_ids [B, L] on the CPU.
    Returns token_index [B] (long) and alpha [B]."""
    real = ~torch.isin(input_ids, torch.as_tensor(list(special_ids)))  # [B, L], True at real tokens
    if not real.any(dim=1).all():
        raise ValueError("a prompt has no tokens to weight (is it empty?); give every prompt some text.")
    # The argmax of i.i.d. uniform scores over the real positions is a uniform choice among them.
    scores = torch.rand(input_ids.shape, generator=generator)
    token_index = torch.where(real, scores, -1.0).argmax(dim=1)  # [B]
    alpha = alpha_min + (alpha_max - alpha_min) * torch.rand(input_ids.shape[0], generator=generator)  # [B]
    return token_index, alpha


# ----------------------------------------------------------------------------------------------
# The sampler: Eq. (4) guidance, Eq. (2)-(3) DDIM steps with log-probs, the denoising loop.


def cfg_noise_pred(unet, x_t, t, cond, uncond, w):
    """Eq. (4): eps = eps(x_t, t, c_empty) + w * (eps(x_t, t, c) - eps(x_t, t, c_empty)).

    cond and uncond are the UNet's text conditioning for the two branches, dicts of tensors [B or 1, ...]:
    {"encoder_hidden_states"} for SD 1.5, plus SDXL's pooled "text_embeds" and size "time_ids".
    t is a timestep or one per sample [B]; w a scale or one per sample [B]. When every w is 1 the
    result is eps(x_t, t, c) and when every w is 0 it is eps(x_t, t, c_empty): those steps run ONE
    UNet branch on B samples instead of the batched pair on 2B. x_t is cast to the conditioning's
    dtype (the frozen weights' fp16/bf16 on GPU); the returned eps [B, C, h, w] is fp32.
    """
    B, dtype = x_t.shape[0], cond["encoder_hidden_states"].dtype
    t = torch.as_tensor(t, device=x_t.device).expand(B)  # [B]
    w = torch.as_tensor(w, device=x_t.device, dtype=torch.float32).expand(B)  # [B]

    def eps(x, t, c):  # SDXL's pooled text embedding and size ids go in added_cond_kwargs
        added = {k: v.to(dtype) for k, v in c.items() if k != "encoder_hidden_states"}
        return unet(x.to(dtype), t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added or None).sample.float()

    if (w == 1).all():
        return eps(x_t, t, cond)
    uncond = {k: v.expand_as(cond[k]) for k, v in uncond.items()}  # [1 or B, ...] -> [B, ...]
    if (w == 0).all():
        return eps(x_t, t, uncond)
    pair = {k: torch.cat([uncond[k], cond[k]]) for k in cond}  # [2B, ...], unconditional half first (as diffusers)
    eps_uncond, eps_cond = eps(torch.cat([x_t, x_t]), torch.cat([t, t]), pair).chunk(2)
    return eps_uncond + w.view(B, 1, 1, 1) * (eps_cond - eps_uncond)


def ddim_step_with_logprob(scheduler, noise_pred, timestep, latents, eta, prev_latents=None, generator=None):
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy (Eq. 2-3; DDPO's formulation).

    Symbols: latents = x_t, noise_pred = eps, alpha_prod = abar (the scheduler's alphas_cumprod),
    std = sigma_t. timestep is an int or one per sample [B]. The mean equals diffusers'
    DDIMScheduler.step(..., eta=eta); SD's schedulers predict eps and never clip.
    Without prev_latents, x_{t-1} = mu + sigma_t * z with z ~ N(0, I) from `generator`; with it, the
    given x_{t-1} is scored (DDPO's training pass). Returns (prev_latents [B, C, h, w], log_prob [B]),
    log_prob averaged (not summed) over C*h*w, or None when eta == 0 (a deterministic step has no
    density).
    """
    # 1. previous timestep t_prev = t - 1000 / num_steps (t counts down)
    t = torch.as_tensor(timestep).cpu().long()
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # 2. abar_t and abar_{t_prev}; the last step goes to the scheduler's final alpha
    alpha_prod = scheduler.alphas_cumprod
    abar_t = alpha_prod[t]
    abar_prev = torch.where(t_prev >= 0, alpha_prod[t_prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    abar_t, abar_prev = (a.to(latents.device, torch.float32).reshape(-1, 1, 1, 1) for a in (abar_t, abar_prev))  # [B or 1, 1, 1, 1]
    # 3. predicted x_0 (DDIM paper Eq. 12, "predicted x0")
    x0_hat = (latents - (1 - abar_t).sqrt() * noise_pred) / abar_t.sqrt()
    # 4. sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    std = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    # 5. mean mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps  (Eq. 2)
    mu = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).sqrt() * noise_pred
    if eta == 0:
        if prev_latents is not None:
            raise ValueError("eta = 0 makes the DDIM step deterministic, so a given x_{t-1} has no density.")
        return mu, None
    # 6. sample x_{t-1} ~ N(mu, sigma_t^2 I)  (Eq. 3); noise drawn on the generator's device
    if prev_latents is None:
        z = torch.randn(latents.shape, generator=generator, device=generator.device if generator else latents.device)
        prev_latents = mu + std * z.to(latents.device)
    # 7. log N(x_{t-1}; mu, sigma_t^2 I), averaged over dimensions; the sample itself is data (detached)
    log_prob = -((prev_latents.detach() - mu) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return prev_latents, log_prob.mean(dim=(1, 2, 3))  # [B]


def decode_latents(vae, latents):
    """VAE decode of x_0 latents [B, 4, h, w] to images [B, 3, H, W] in [0, 1], fp32."""
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


def sample(pipe, cond, uncond, scales, latents, eta, generator=None, backprop_steps=None, checkpoint=False):
    """The DDIM denoising loop with a guidance scale per step (Eq. 7) and an embedding per sample (Eq. 8).

    pipe.scheduler must have had set_timesteps(T). cond is the (weighted) text conditioning of the
    prompts and uncond the unconditional branch's (see cfg_noise_pred and sample_batch), scales [T]
    one CFG scale per step, latents [B, C, h, w] the initial noise x_T.
    Gradients are the caller's choice: under torch.no_grad() nothing is recorded. Under grad,
    backprop_steps=K keeps the graph of the last K steps only (AlignProp's truncated backprop): the
    earlier steps run under no_grad and save nothing, which is the same as detaching their eps since
    x_t depends on the weights only through eps. checkpoint=True recomputes every UNet call and the
    VAE decode in backward instead of storing activations, so memory stays flat in K and T.
    Returns a dict: latents [B, T+1, C, h, w] (x_T ... x_0), log_probs [B, T] (None if eta == 0),
    timesteps [T], scales [B, T], cond and uncond (the conditioning used), images [B, 3, H, W] in [0, 1].
    """
    timesteps = pipe.scheduler.timesteps
    T = len(timesteps)
    if len(scales) != T:
        raise ValueError(f"got {len(scales)} guidance scales for {T} timesteps; compute them from scheduler.timesteps.")
    x_t, trajectory, log_probs = latents, [latents], []
    for i, t in enumerate(timesteps):
        keep_graph = torch.is_grad_enabled() and (backprop_steps is None or i >= T - backprop_steps)
        with torch.set_grad_enabled(keep_graph):
            inputs = (pipe.unet, x_t, t, cond, uncond, scales[i])
            if keep_graph and checkpoint:
                eps = torch.utils.checkpoint.checkpoint(cfg_noise_pred, *inputs, use_reentrant=False)
            else:
                eps = cfg_noise_pred(*inputs)
            x_t, log_prob = ddim_step_with_logprob(pipe.scheduler, eps, t, x_t, eta, generator=generator)
        trajectory.append(x_t)
        log_probs.append(log_prob)
    if torch.is_grad_enabled() and checkpoint:
        images = torch.utils.checkpoint.checkpoint(decode_latents, pipe.vae, x_t, use_reentrant=False)
    else:
        images = decode_latents(pipe.vae, x_t)
    return dict(
        latents=torch.stack(trajectory, dim=1),  # T+1 x [B, C, h, w] -> [B, T+1, C, h, w]
        log_probs=None if eta == 0 else torch.stack(log_probs, dim=1),  # T x [B] -> [B, T]
        timesteps=timesteps,
        scales=torch.as_tensor(scales).expand(latents.shape[0], -1),  # [T] -> [B, T], stored per sample for DDPO
        cond=cond,
        uncond=uncond,
        images=images,
    )


# ----------------------------------------------------------------------------------------------
# Models: the tiny offline pipeline, the real one with LoRA, prompt encoding.


def tiny_pipeline(seed=0, sdxl=False):
    """A random Stable Diffusion pipeline small enough for a CPU (32x32 images, 16x16 latents), built
    with no download; with sdxl=True a StableDiffusionXLPipeline of the same size, with SDXL's two
    text encoders, pooled embedding and size conditioning. Its tokenizer is SD's real CLIP tokenizer,
    rebuilt from the BPE vocabulary that open_clip ships: the 256 byte symbols, the same with '</w>',
    the 48,894 merges, then <|startoftext|> and <|endoftext|> (ids 49406, 49407; padding is
    <|endoftext|> as in SD 1.5). Saved with save_pretrained, it loads back through load_pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the lines open_clip's SimpleTokenizer reads
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({token: i for i, token in enumerate(vocab)}, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
    )
    # SDXL's UNet adds the pooled text embedding (32) and six size ids (8 each) to its time embedding
    sdxl_unet = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    with torch.random.fork_rng():  # random weights from `seed`, without touching the global RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64 if sdxl else 32, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **(sdxl_unet if sdxl else {}),
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64), latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config) if sdxl else None
    # SD's noise schedule; the hub configs use other schedulers with these betas
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if sdxl:
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_pipeline(model, lora_rank, device, dtype):
    """An SD 1.5 or SDXL pipeline from a hub id, a local directory, "tiny" or "tiny-sdxl"
    (tiny_pipeline), with a DDIM scheduler, frozen weights in `dtype` on `device`, and a trainable
    fp32 PEFT LoRA of rank `lora_rank` on the UNet's attention projections to_q, to_k, to_v, to_out.0
    (B initialised to zero: the LoRA starts as the identity). SDXL's VAE stays fp32: it overflows in
    fp16."""
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig

    if model in TINY_MODELS:
        pipe = tiny_pipeline(sdxl=model == "tiny-sdxl")
        if dtype != torch.float32:
            pipe.to(dtype=dtype)  # random weights are made in fp32; a hub model is loaded in `dtype`
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot load --model {model!r} ({reason}); check the hub id or directory, or use --model tiny to run offline.") from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ValueError(f"--model {model!r} is a {type(pipe).__name__}; this code fine-tunes Stable Diffusion 1.x and SDXL pipelines.")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # DDPO's policy is the DDIM step
    if pipe.scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"{model!r} predicts {pipe.scheduler.config.prediction_type!r}; this code implements epsilon prediction only.")
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    if isinstance(pipe, StableDiffusionXLPipeline):
        pipe.vae.float()
    pipe.to(device)
    pipe.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in pipe.unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights train in fp32 whatever the frozen weights' dtype
    return pipe


@torch.no_grad()  # the text encoders are frozen
def encode_prompts(pipe, prompts):
    """The UNet's text conditioning for `prompts` (as StableDiffusion[XL]Pipeline computes it) and the
    token ids [B, L] (CPU) that Eq. 8's draw needs. SD 1.5: {"encoder_hidden_states": the text
    encoder's last layer [B, L, 768]}. SDXL: the two encoders' penultimate layers side by side
    [B, L, 768 + 1280], the second encoder's pooled "text_embeds" [B, 1280], and the "time_ids"
    [B, 6] (original size, crop corner, target size; here all the default resolution, no crop)."""
    def token_ids(tokenizer):
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

    input_ids = token_ids(pipe.tokenizer)
    if not hasattr(pipe, "text_encoder_2"):
        return {"encoder_hidden_states": pipe.text_encoder(input_ids.to(pipe.device))[0]}, input_ids
    first = pipe.text_encoder(input_ids.to(pipe.device), output_hidden_states=True)
    second = pipe.text_encoder_2(token_ids(pipe.tokenizer_2).to(pipe.device), output_hidden_states=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=pipe.device).expand(len(prompts), -1)  # [B, 6]
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # [B, L, 768 + 1280]
    return {"encoder_hidden_states": hidden, "text_embeds": second.text_embeds, "time_ids": time_ids}, input_ids


def sample_batch(pipe, prompts, args, explore, generator, **sample_kwargs):
    """Draw one batch for `prompts`: x_T ~ N(0, I) from `generator`; with `explore`, DiffExp's
    Eq. 8 weighting (per sample) and Eq. 7 schedule, else plain CFG at w_high. Returns sample()'s dict.
    pipe.scheduler must have had set_timesteps(args.steps)."""
    cond, input_ids = encode_prompts(pipe, prompts)
    c_empty, _ = encode_prompts(pipe, [""])  # [1, ...], Eq. 8's reference
    # The unconditional branch: c_empty, or zeros where the pipeline was trained so (SDXL's
    # force_zeros_for_empty_prompt: zero token and pooled embeddings, the same size ids).
    zeros = getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    uncond = {k: v if k == "time_ids" or not zeros else torch.zeros_like(v) for k, v in c_empty.items()}
    timesteps = pipe.scheduler.timesteps
    if explore:
        tok = pipe.tokenizer
        special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        token_index, alpha = draw_prompt_weights(input_ids, special, args.alpha_min, args.alpha_max, generator)
        # Eq. 8 weights the per-token embeddings (on SDXL both encoders' at once); SDXL's pooled
        # embedding summarises the whole prompt and stays as it is.
        weighted = weight_prompt_embeds(cond["encoder_hidden_states"], c_empty["encoder_hidden_states"], token_index, alpha)
        cond = cond | {"encoder_hidden_states": weighted}
        scales = cfg_scale_schedule(timesteps, args.w_low, args.w_high, args.t_thres)
    else:
        scales = torch.full((len(timesteps),), float(args.w_high))
    size = pipe.unet.config.sample_size
    latents = torch.randn((len(prompts), pipe.unet.config.in_channels, size, size), generator=generator).to(pipe.device)  # x_T
    return sample(pipe, cond, uncond, scales, latents, args.eta, generator, **sample_kwargs)


# ----------------------------------------------------------------------------------------------
# DDPO (Black et al. 2024): per-prompt advantages and the clipped-ratio loss of Eq. (6).


class PerPromptStatTracker:
    """Per-prompt reward buffers (the last `buffer_size` rewards of each prompt, kept across epochs).
    Advantages are (r - mean) / (std + 1e-6) over the prompt's buffer once it holds `min_count`
    rewards, and over the whole batch before that (DDPO's scheme)."""

    def __init__(self, buffer_size, min_count):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers = {}  # prompt -> list of its most recent rewards

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
    """log pi_theta(x_{t-1} | x_t, c) of stored transitions (samples i [b], step indices s [b]),
    recomputed with the SAME guidance scale w_t and weighted prompt embedding c' that sampling used:
    otherwise the ratio would compare two different policies."""
    t = batch["timesteps"][s]  # [b]
    x_t, x_prev = batch["latents"][i, s], batch["latents"][i, s + 1]  # [b, C, h, w] each
    cond = {k: v[i] for k, v in batch["cond"].items()}
    eps = cfg_noise_pred(pipe.unet, x_t, t, cond, batch["uncond"], batch["scales"][i, s])
    return ddim_step_with_logprob(pipe.scheduler, eps, t, x_t, eta, prev_latents=x_prev)[1]


def ddpo_epoch(pipe, reward_fn, prompts, args, explore, generator, optimizer, scaler, tracker, world):
    """One DDPO epoch on this process's share of --batch-size: sample, score, normalise, update."""
    from tqdm.auto import tqdm

    n, mb = args.batch_size // world, args.micro_batch_size
    # 1. Sample trajectories without a graph (DiffExp's Eq. 7 and 8 when `explore`), score them.
    batches = []
    with torch.no_grad():
        for _ in tqdm(range(n // mb), desc="sampling", disable=not is_main()):
            prompt_ids = torch.randint(len(prompts), (mb,), generator=generator)
            batch = sample_batch(pipe, [prompts[k] for k in prompt_ids], args, explore, generator)
            images = batch.pop("images")  # only the first micro-batch's are kept, for the image grid
            batch["rewards"] = reward_fn(images, [prompts[k] for k in prompt_ids]).float()
            batch["prompt_ids"] = prompt_ids.to(batch["rewards"].device)
            if not batches:
                shown = (images, [prompts[k] for k in prompt_ids], batch["rewards"])
            batches.append(batch)
    batch = {k: torch.cat([b[k] for b in batches]) for k in ("latents", "log_probs", "scales", "rewards", "prompt_ids")}
    batch["cond"] = {k: torch.cat([b["cond"][k] for b in batches]) for k in batches[0]["cond"]}
    batch["uncond"], batch["timesteps"] = batches[0]["uncond"], pipe.scheduler.timesteps
    # 2. Advantages from the rewards of every process, normalised per prompt.
    rewards, prompt_ids = all_gather(batch["rewards"], world), all_gather(batch["prompt_ids"], world)
    stats = dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item())
    if not torch.isfinite(rewards).all():  # never let a NaN into the buffers or the weights
        return stats | dict(skipped_updates=1), shown
    advantages = tracker.update([prompts[k] for k in prompt_ids.tolist()], rewards.cpu().numpy())
    rank = torch.distributed.get_rank() if world > 1 else 0
    advantages = torch.as_tensor(advantages, dtype=torch.float32).reshape(world, n)[rank].to(pipe.device)  # this process's share
    # 3. Clipped-ratio updates over shuffled (sample, timestep) pairs, --inner-epochs times.
    T = len(batch["timesteps"])
    T_train = max(1, int(args.timestep_fraction * T))
    per_update = args.train_batch_size // world // mb  # micro-batches per optimizer step
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    log = dict(loss=[], approx_kl=[], clipfrac=[])
    skipped, finite = 0, True
    for _ in range(args.inner_epochs):
        order = torch.randperm(n, generator=generator)
        steps = torch.stack([torch.randperm(T, generator=generator)[:T_train] for _ in range(n)])  # [n, T_train]
        for m in tqdm(range(n // mb), desc="training", disable=not is_main()):
            i = order[m * mb : (m + 1) * mb]  # [mb]
            for j in range(T_train):
                s = steps[i, j]  # [mb]: each sample trains on its own shuffled step
                log_prob = ddpo_log_prob(pipe, batch, i, s, args.eta)
                old_log_prob = batch["log_probs"][i, s]
                loss = ddpo_loss(log_prob, old_log_prob, advantages[i], args.clip_range, args.adv_clip_max)
                scaler.scale(loss / (per_update * T_train)).backward()
                finite &= bool(torch.isfinite(loss))
                log["loss"].append(loss.item())
                log["approx_kl"].append(0.5 * ((log_prob - old_log_prob) ** 2).mean().item())
                log["clipfrac"].append(((log_prob - old_log_prob).exp().sub(1).abs() > args.clip_range).float().mean().item())
            if (m + 1) % per_update == 0:
                skipped += not optimizer_step(lora, optimizer, scaler, args.max_grad_norm, world, finite)
                finite = True
    return stats | {k: float(np.mean(v)) for k, v in log.items()} | dict(skipped_updates=skipped), shown


# ----------------------------------------------------------------------------------------------
# AlignProp (Prabhudesai et al. 2023): truncated backprop of a differentiable reward.


def alignprop_epoch(pipe, reward_fn, prompts, args, explore, generator, optimizer, scaler, world):
    """One AlignProp epoch on this process's share of --batch-size: sample with gradients through the
    last K steps, decode, score, loss = -loss_coeff * mean(reward), backprop into the LoRA."""
    from tqdm.auto import tqdm

    n, mb = args.batch_size // world, args.micro_batch_size
    per_update = args.train_batch_size // world // mb
    K_max = args.backprop_steps or args.steps
    random_K = args.backprop_random or args.backprop_steps is None
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    rewards, losses, skipped, finite = [], [], 0, True
    for m in tqdm(range(n // mb), desc="alignprop", disable=not is_main()):
        prompt_ids = torch.randint(len(prompts), (mb,), generator=generator)
        batch_prompts = [prompts[k] for k in prompt_ids]
        # One truncation depth K per batch, K ~ U{1..K_max} (the paper's AlignProp); AlignProp's public
        # code instead redraws the cut at every denoising step.
        K = int(torch.randint(1, K_max + 1, (1,), generator=generator)) if random_K else K_max
        out = sample_batch(pipe, batch_prompts, args, explore, generator, backprop_steps=K, checkpoint=True)
        reward = reward_fn(out["images"], batch_prompts)
        loss = -args.loss_coeff * reward.mean()
        scaler.scale(loss / per_update).backward()
        finite &= bool(torch.isfinite(loss))
        rewards.append(reward.detach().float())
        losses.append(loss.item())
        if m == 0:
            shown = (out["images"].detach(), batch_prompts, rewards[0])  # for the image grid
        if (m + 1) % per_update == 0:
            skipped += not optimizer_step(lora, optimizer, scaler, args.max_grad_norm, world, finite)
            finite = True
    rewards = all_gather(torch.cat(rewards), world)
    return dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item(), loss=float(np.mean(losses)), skipped_updates=skipped), shown


def optimizer_step(params, optimizer, scaler, max_grad_norm, world, loss_finite):
    """Average the LoRA gradients over processes, clip their norm, step. A non-finite loss or gradient
    on any process (a NaN reward, say) skips the step on every process alike and returns False."""
    bad = torch.tensor([0.0 if loss_finite else 1.0], device=params[0].device)
    if world > 1:
        # One all_reduce of the flattened LoRA gradients (and the flag) instead of a DDP wrapper:
        # AlignProp calls the UNet many times per backward and checkpointing re-runs forward inside
        # backward, which DDP's reducer does not support. Every process steps on the mean gradient.
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
    return ok


# ----------------------------------------------------------------------------------------------
# The run: prompts, evaluation, logs, checkpoints, several processes.


PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt")
EVAL_SEED = 1234  # evaluation always draws the same noise: seed (EVAL_SEED, rank)


def load_prompt_sets():
    """prompts.txt: a `[name]` line opens a set, each following line is one prompt, # starts a comment."""
    sets, name, path = {}, None, PROMPTS_FILE
    with open(path, encoding="utf-8") as f:
        for line in (raw.strip() for raw in f):
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                name = line[1:-1]
                sets[name] = []
            elif name is None:
                raise ValueError(f"{path}: prompt {line!r} comes before any [set] line.")
            else:
                sets[name].append(line)
    return sets


def seeded_generator(*keys):
    """A CPU torch.Generator seeded from a tuple of ints, e.g. (seed, epoch, rank): every epoch's
    randomness follows from the settings alone, so a resumed run draws what the unbroken run drew."""
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
    """Plain sampling (no exploration) with fixed noise on each prompt set, scored by each reward.
    Each set's prompts are cycled to --batch-size images, split over processes. Returns the mean
    rewards {"eval_SET_REWARD": float} and this process's images and prompts per set."""
    rank = torch.distributed.get_rank() if world > 1 else 0
    n, metrics, shown = args.batch_size // world, {}, {}
    for set_name, prompts in prompt_sets.items():
        generator = seeded_generator(args.seed, EVAL_SEED, rank)
        own = [prompts[k % len(prompts)] for k in range(rank * n, (rank + 1) * n)]
        images = torch.cat([sample_batch(pipe, own[k : k + args.micro_batch_size], args, False, generator)["images"] for k in range(0, n, args.micro_batch_size)])
        for reward_name, fn in reward_fns.items():
            scores = torch.cat([fn(images[k : k + args.micro_batch_size], own[k : k + args.micro_batch_size]).float() for k in range(0, n, args.micro_batch_size)])
            metrics[f"eval_{set_name}_{reward_name}"] = all_gather(scores, world).mean().item()
        shown[set_name] = (images, own)
    return metrics, shown


def save_grid(path, images, captions):
    """Images [B, 3, H, W] in [0, 1] as a PNG grid, each with a one-line caption under it."""
    from PIL import Image, ImageDraw

    images = (images[:16].float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
    B, H, W, _ = images.shape
    cols = min(B, 4)
    size = max(W, 128)  # tiny 32x32 images are upscaled so that their caption fits
    grid = Image.new("RGB", (cols * size, -(-B // cols) * (size + 14)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(zip(images, captions)):
        x, y = (k % cols) * size, (k // cols) * (size + 14)
        grid.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (x, y))
        draw.text((x + 2, y + size + 1), caption[: size // 6], fill="black")
    grid.save(path)


def lora_state_dict(unet):
    """The UNet's LoRA weights, keyed as diffusers' load_lora_weights expects."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def load_lora(unet, directory):
    """Load LoRA weights that save_checkpoint wrote (diffusers' format) into the UNet's PEFT adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(directory, "pytorch_lora_weights.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"no LoRA weights at {path}; give a run directory that has a checkpoint.")
    lora = {k.removeprefix("unet."): v for k, v in load_file(path).items()}  # the file prefixes keys "unet."
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(lora))


def save_checkpoint(run_dir, pipe, optimizer, scaler, tracker, epoch):
    """Write run_dir/checkpoint atomically: everything goes to checkpoint.tmp, which then replaces the
    old checkpoint by rename, so a crash or a full disk leaves the last good one intact. Holds the
    LoRA in diffusers' format (StableDiffusion[XL]Pipeline.load_lora_weights(dir) loads it), the
    optimizer and loss-scaler states, the epoch and the DDPO reward buffers. RNG states are not
    needed: every epoch's generator is seeded from (seed, epoch, rank)."""
    import shutil

    final, tmp, old = (os.path.join(run_dir, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(final):  # a leftover .old is stale then (without `final`, it is the last good one)
        shutil.rmtree(old, ignore_errors=True)
    try:
        type(pipe).save_lora_weights(tmp, unet_lora_layers=lora_state_dict(pipe.unet))
        state = dict(epoch=epoch, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), tracker=tracker.buffers if tracker else None)
        torch.save(state, os.path.join(tmp, "state.pt"))
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(final):
            os.replace(old, final)
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise OSError(f"could not write a checkpoint to {run_dir} ({reason}); the last good checkpoint is intact.") from None
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir, pipe, optimizer, scaler, tracker):
    """Restore what save_checkpoint wrote; returns the number of epochs already done."""
    path = os.path.join(run_dir, "checkpoint")
    if not os.path.exists(path):  # a crash between save_checkpoint's two renames leaves checkpoint.old
        path = os.path.join(run_dir, "checkpoint.old")
    if not os.path.exists(os.path.join(path, "state.pt")):
        raise ValueError(f"--resume {run_dir}: no checkpoint in it (expected {run_dir}/checkpoint/state.pt).")
    load_lora(pipe.unet, path)
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if tracker is not None:
        tracker.buffers = state["tracker"]
    return state["epoch"]


def plot_runs(run_dirs, out_path):
    """Mean training reward against cumulative reward queries, one line per run (the paper's Figure 4)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is optional: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for run_dir in run_dirs:
        try:
            with open(os.path.join(run_dir, "log.jsonl")) as log, open(os.path.join(run_dir, "config.json")) as config:
                rows, config = [json.loads(line) for line in log if line.strip()], json.load(config)
        except OSError:
            raise ValueError(f"--plot {run_dir}: not a run directory (no log.jsonl or config.json in it).") from None
        label = f"{config['method']}{'' if config['no_explore'] else ' + DiffExp'} ({os.path.basename(os.path.normpath(run_dir))})"
        rows = [r for r in rows if "reward_mean" in r]  # epoch 0 holds evaluation only
        ax.plot([r["reward_queries"] for r in rows], [r["reward_mean"] for r in rows], label=label)
    ax.set_xlabel("reward queries")
    ax.set_ylabel(f"mean reward ({config['reward']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=150)
    print(f"wrote {out_path}")


# ----------------------------------------------------------------------------------------------
# Command line.


RESUMABLE_CHANGES = {"epochs", "resume", "out", "overwrite", "eval_every", "eval_reward", "save_every", "wandb", "device", "plot", "plot_out", "generate"}


def parse_args(argv=None):
    """Args from the command line: one flag per field; unset settings take the method's (and
    a tiny model's) defaults, or with --resume the run's own; bad input stops here with one line."""
    import rewards

    parser = argparse.ArgumentParser(description="DiffExp reward fine-tuning (DDPO / AlignProp) of Stable Diffusion.")
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")  # one line, without the usage block
    for f in dataclasses.fields(Args):
        flag, doc = "--" + f.name.replace("_", "-"), f.metadata["doc"]
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=doc)
        elif f.type is list:
            parser.add_argument(flag, nargs="+", help=doc)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=doc, choices={"method": list(METHOD_DEFAULTS), "dtype": ["fp32", "fp16", "bf16"]}.get(f.name))
    namespace = parser.parse_args(argv)
    run_dir = namespace.resume or namespace.generate
    if run_dir:  # the run's own settings are the defaults; for --resume, a flag given again must agree
        config_path = os.path.join(run_dir, "config.json")
        if not os.path.exists(config_path):
            parser.error(f"{run_dir}: no config.json there; is it a run directory?")
        with open(config_path) as f:
            saved = {k: v for k, v in json.load(f).items() if k in vars(namespace) and k not in ("resume", "out", "overwrite", "plot", "plot_out", "generate")}
        parser.set_defaults(**saved)
        namespace = parser.parse_args(argv)
        for name, value in vars(namespace).items():
            if namespace.resume and name in saved and name not in RESUMABLE_CHANGES and saved[name] != value:
                parser.error(f"--resume {run_dir}: setting {name} was {saved[name]!r} there and is {value!r} now; resume with the same settings.")
    args = Args(**vars(namespace))
    for defaults in (TINY_DEFAULTS if args.model in TINY_MODELS else {}, METHOD_DEFAULTS[args.method], COMMON_DEFAULTS):
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.plot:
        return args
    try:
        rewards.check_reward(args.reward, need_grad=args.method == "alignprop")
        if args.eval_reward:
            rewards.check_reward(args.eval_reward)
        sets = load_prompt_sets()
    except ValueError as e:
        parser.error(str(e))
    try:
        torch.device(args.device or "cpu")
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device; use e.g. cuda, cuda:1 or cpu.")
    for name in (args.prompts, args.eval_prompts):
        if name not in sets:
            parser.error(f"unknown prompt set {name!r}; prompts.txt has: {', '.join(sets)}.")
        if not sets[name]:
            parser.error(f"prompt set {name!r} in prompts.txt is empty; add prompts under [{name}].")
    for name in ("epochs", "batch_size", "micro_batch_size", "train_batch_size", "steps", "lora_rank", "inner_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= args.t_thres < 1000:
        parser.error(f"--t-thres {args.t_thres} is outside [0, 1000): it is a timestep of SD's 1000-step schedule.")
    if args.alpha_min > args.alpha_max:
        parser.error(f"--alpha-min {args.alpha_min} is above --alpha-max {args.alpha_max}.")
    if args.method == "ddpo" and args.eta <= 0:
        parser.error("DDPO needs --eta > 0: with eta 0 the DDIM step is deterministic and has no log-probability.")
    if not 1 <= (args.backprop_steps or args.steps) <= args.steps:
        parser.error(f"--backprop-steps must be between 1 and --steps ({args.steps}).")
    if not 0 < args.timestep_fraction <= 1:
        parser.error("--timestep-fraction must be in (0, 1].")
    for name in ("batch_size", "train_batch_size"):
        if getattr(args, name) % (world * args.micro_batch_size):
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not a multiple of {world} process(es) x --micro-batch-size {args.micro_batch_size}.")
    if args.batch_size % args.train_batch_size:
        parser.error(f"--batch-size {args.batch_size} is not a multiple of --train-batch-size {args.train_batch_size}.")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        parser.error("--wandb needs the wandb package: pip install wandb")
    if not args.generate:
        args.out = args.resume or args.out or f"runs/{args.method}-{args.reward}-{'baseline' if args.no_explore else 'diffexp'}-s{args.seed}"
        if not args.resume and os.path.exists(args.out) and not args.overwrite:
            parser.error(f"run directory {args.out} exists; pass --resume {args.out} to continue it, --overwrite to replace it, or another --out.")
        if not args.resume and args.overwrite and os.path.exists(args.out) and not os.path.exists(os.path.join(args.out, "config.json")):
            parser.error(f"--overwrite: {args.out} is not a run directory (no config.json); delete it yourself if you mean it.")
    return args


def on_rank0(write, *args):
    """Run `write` (file output) on rank 0 only, then share its outcome with every process, so that a
    failed write stops all of them together instead of leaving the others in their next collective."""
    error = None
    if is_main():
        try:
            write(*args)
        except Exception as e:  # whatever it is, every process must hear of it
            error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if torch.distributed.is_initialized():
        message = [error]
        torch.distributed.broadcast_object_list(message, src=0)
        error = message[0]
    if error:
        raise OSError(error)


def start_run_dir(args, start):
    """Create the run directory (replacing it with --overwrite) and write config.json; on --resume, drop
    the log lines of epochs after the checkpoint, which the resumed run is about to redo."""
    import shutil

    try:
        if os.path.exists(args.out) and not args.resume:  # --overwrite (parse_args checked it is a run directory)
            shutil.rmtree(args.out)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=1)
        log_path = os.path.join(args.out, "log.jsonl")
        if args.resume and os.path.exists(log_path):
            with open(log_path) as f:
                lines = [line for line in f if line.endswith("}\n")]  # a line cut short by a crash lacks its end
            with open(log_path, "w") as f:
                f.writelines(line for line in lines if json.loads(line)["epoch"] <= start)
    except OSError as e:
        raise OSError(f"cannot write to run directory {args.out} ({e.strerror or e}); choose a writable --out.") from None


STOP_SIGNALS = []  # filled by SIGINT / SIGTERM: the run finishes its epoch, saves and exits 0


def main(argv=None):
    import signal

    import rewards

    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:  # set-up: every failure here (no GPU, missing model, download, disk) is one line, not a traceback
        if args.plot:
            return plot_runs(args.plot, args.plot_out)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but no CUDA GPU is visible; use --device cpu.")
        if world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if is_main():
            print(f"device {device}, frozen weights {dtype}, LoRA weights and losses fp32, {world} process(es)")
        torch.manual_seed(args.seed)  # the LoRA's random initialisation
        pipe = load_pipeline(args.model, args.lora_rank, device, dtype)
        pipe.scheduler.set_timesteps(args.steps)
        sets = load_prompt_sets()
        if args.generate:
            return generate(pipe, args, sets[args.eval_prompts])
        tiny = args.model in TINY_MODELS
        reward_fn = rewards.load_reward(args.reward, device, dtype, tiny=tiny)
        eval_fns = {args.reward: reward_fn} | ({args.eval_reward: rewards.load_reward(args.eval_reward, device, dtype, tiny=tiny)} if args.eval_reward else {})
        lora = [p for p in pipe.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 gradients need loss scaling
        tracker = PerPromptStatTracker(buffer_size=32, min_count=16) if args.method == "ddpo" else None
        start = load_checkpoint(args.out, pipe, optimizer, scaler, tracker) if args.resume else 0
        on_rank0(start_run_dir, args, start)  # only now, so that a failed set-up leaves no directory behind
        if args.wandb:
            import wandb

            on_rank0(lambda: wandb.init(project="diffexp", name=os.path.basename(args.out), config=dataclasses.asdict(args)))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: STOP_SIGNALS.append(signum))
        train(pipe, reward_fn, eval_fns, sets, args, optimizer, scaler, tracker, start, world, rank)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        sys.exit(f"error: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(pipe, reward_fn, eval_fns, sets, args, optimizer, scaler, tracker, start, world, rank):
    """The epochs: DiffExp sampling for the first 3/4 of them, a DDPO or AlignProp update, evaluation,
    one log line, checkpoints. Every process runs every collective; rank 0 alone writes files."""
    prompts, eval_sets = sets[args.prompts], {"seen": sets[args.prompts], "unseen": sets[args.eval_prompts]}

    def write_epoch(row, grids, save):  # rank 0's files for one epoch
        for name, (images, captions) in grids.items():
            save_grid(os.path.join(args.out, f"{name}_{row['epoch']:04d}.png"), images, captions)
        print(json.dumps(row))
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if args.wandb:
            import wandb

            wandb.log(row, step=row["reward_queries"])
        if save:
            save_checkpoint(args.out, pipe, optimizer, scaler, tracker, row["epoch"])

    def evaluate_into(row, grids):
        metrics, shown = evaluate(pipe, eval_fns, eval_sets, args, world)
        grids |= {f"eval_{set_name}": images_and_prompts for set_name, images_and_prompts in shown.items()}
        return row | metrics

    if start == 0 and args.eval_every:  # the starting model, so that curves begin at 0 reward queries
        grids = {}
        on_rank0(write_epoch, evaluate_into(dict(epoch=0, reward_queries=0), grids), grids, False)
    for epoch in range(start + 1, args.epochs + 1):
        # Rounded up: a run of 2 (or 3) epochs resumed to 4 explores as an unbroken 4-epoch run does.
        # Changing --epochs on resume moves the cut-off in general.
        explore = not args.no_explore and epoch <= math.ceil(EXPLORE_FRACTION * args.epochs)
        generator = seeded_generator(args.seed, epoch, rank)
        if args.method == "ddpo":
            row, (images, captions, rewards) = ddpo_epoch(pipe, reward_fn, prompts, args, explore, generator, optimizer, scaler, tracker, world)
        else:
            row, (images, captions, rewards) = alignprop_epoch(pipe, reward_fn, prompts, args, explore, generator, optimizer, scaler, world)
        row = dict(epoch=epoch, reward_queries=epoch * args.batch_size, explore=explore) | row
        grids = {"train": (images, [f"{c} {r:.3g}" for c, r in zip(captions, rewards.tolist())])}
        if args.eval_every and (epoch % args.eval_every == 0 or epoch == args.epochs):
            row = evaluate_into(row, grids)
        stopping = torch.tensor([float(bool(STOP_SIGNALS))], device=pipe.device)
        if world > 1:  # stop together: one process's signal stops all of them after the same epoch
            torch.distributed.all_reduce(stopping, op=torch.distributed.ReduceOp.MAX)
        save = epoch == args.epochs or bool(stopping.item()) or (args.save_every > 0 and epoch % args.save_every == 0)
        on_rank0(write_epoch, row, grids, save)
        if stopping.item():
            if is_main():
                print(f"stopped by signal after epoch {epoch}; continue with --resume {args.out}")
            break


@torch.no_grad()
def generate(pipe, args, prompts):
    """Images of `prompts` (fixed noise, plain sampling) with the LoRA of run directory args.generate
    and without it, side by side as generate_with_lora.png and generate_without_lora.png there."""
    load_lora(pipe.unet, os.path.join(args.generate, "checkpoint"))
    prompts = prompts[: args.batch_size]
    with_lora = sample_batch(pipe, prompts, args, False, seeded_generator(args.seed, EVAL_SEED))["images"]
    pipe.unet.disable_adapters()
    without_lora = sample_batch(pipe, prompts, args, False, seeded_generator(args.seed, EVAL_SEED))["images"]
    save_grid(os.path.join(args.generate, "generate_with_lora.png"), with_lora, prompts)
    save_grid(os.path.join(args.generate, "generate_without_lora.png"), without_lora, prompts)
    print(f"wrote {args.generate}/generate_with_lora.png and generate_without_lora.png")


if __name__ == "__main__":
    main()
