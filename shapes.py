"""The shapes world: captioned 32x32 shapes, their judge, and a small text-to-image model pretrained on them.

    python shapes.py pretrain --out shapes_model     # about 15 minutes on a 2-core CPU
"""

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# The data: a caption grammar and its drawings.

COLOURS = {  # name -> RGB in [0, 1]; every pair is at least 0.45 apart, so the judge can tell them
    "red": (0.85, 0.05, 0.05), "green": (0.1, 0.65, 0.1), "blue": (0.1, 0.2, 0.9), "yellow": (1.0, 0.95, 0.1),
    "purple": (0.55, 0.05, 0.7), "orange": (1.0, 0.5, 0.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}
PALETTE_RGB = COLOURS | {"grey": (0.5, 0.5, 0.5)}  # grey: the background when the caption names none
PALETTE = torch.tensor(list(PALETTE_RGB.values()))  # [9, 3]
SHAPES = ("circle", "square", "triangle")
# The radius r in pixels by size word, for one shape and for two (two large shapes must fit side by side).
SIZES = {1: {"small": (3.5, 5.0), "": (3.5, 9.0), "large": (7.0, 9.5)},
         2: {"small": (3.5, 4.5), "": (3.5, 5.5), "large": (5.0, 6.0)}}
RESOLUTION = 32
SUPERSAMPLE = 4  # anti-aliasing: each pixel's coverage is the mean over 4 x 4 sub-pixel points


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def caption_of(colour, shape, count=1, size="", background=None):
    """The caption of some attributes, e.g. "two small red triangles on a white background"."""
    words = " ".join(w for w in (size, colour) if w)
    text = f"two {words} {shape}s" if count == 2 else f"{article(words)} {words} {shape}"
    return text + (f" on {article(background)} {background} background" if background else "")


def parse_caption(caption):
    """Attributes named by a caption of the grammar: colour, shape, count (1 or 2), background (or None).
    Raises ValueError for a caption that names no colour or no shape."""
    words = caption.lower().replace(",", " ").split()
    on = words.index("on") if "on" in words else len(words)
    colours = [w for w in words[:on] if w in COLOURS]
    shapes = [w.removesuffix("s") for w in words[:on] if w.removesuffix("s") in SHAPES]
    if not colours or not shapes:
        raise ValueError(f"prompt {caption!r} names no colour or no shape; the shapes rewards read prompts like "
                         "'a red circle'.")
    background = next((w for w in words[on:] if w in COLOURS), None)
    return dict(colour=colours[0], shape=shapes[0], count=2 if "two" in words[:on] else 1, background=background)


def random_attributes(rng):
    """A random caption's attributes: count a/two, size small/large/unsaid, one of 8 colours, one of 3
    shapes, and half the time "on a COLOUR background" (without it the background is grey)."""
    colour = rng.choice(list(COLOURS))
    return dict(
        colour=colour, shape=rng.choice(SHAPES), count=1 if rng.random() < 0.7 else 2,
        size=rng.choice(["small", "", "large"], p=[0.25, 0.5, 0.25]),
        background=rng.choice([c for c in COLOURS if c != colour]) if rng.random() < 0.5 else None,
    )


def coverage(shape, cx, cy, r, size=RESOLUTION, supersample=SUPERSAMPLE):
    """The fraction of each pixel [size, size] covered by a shape centred at (cx, cy) in pixel units:
    a circle of radius r, a square of half-side 0.9 r, or an upward equilateral triangle of circumradius
    1.3 r (so the three look about equally big). The centre is also the triangle's centroid."""
    s = (np.arange(size * supersample) + 0.5) / supersample  # sub-pixel centres
    x, y = s[None, :] - cx, s[:, None] - cy
    if shape == "circle":
        inside = x**2 + y**2 <= r**2
    elif shape == "square":
        inside = (np.abs(x) <= 0.9 * r) & (np.abs(y) <= 0.9 * r)
    else:  # the three edges of a triangle with its apex up: y grows downwards in images
        R = 1.3 * r
        inside = (y <= R / 2) & (np.sqrt(3) * x - y <= R) & (-np.sqrt(3) * x - y <= R)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def draw(attributes, rng):
    """An anti-aliased RGB image [3, 32, 32] in [0, 1] of the attributes, with random positions, radii
    and slight colour jitter; two shapes never overlap and every shape keeps a pixel off the border."""
    lo, hi = SIZES[attributes["count"]][attributes["size"]]
    jitter = lambda name: np.clip(np.array(PALETTE_RGB[name]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    background = attributes["background"] or "grey"
    image = np.broadcast_to(jitter(background)[:, None, None], (3, RESOLUTION, RESOLUTION)).copy()
    colour, n = jitter(attributes["colour"]), attributes["count"]
    while True:  # rejection sampling of all the shapes at once, until none overlaps another
        r = rng.uniform(lo, hi, size=n)
        margin = 1.3 * r + 1  # the triangle reaches 1.3 r from its centre
        cx, cy = rng.uniform(margin, RESOLUTION - margin), rng.uniform(margin, RESOLUTION - margin)
        if n == 1 or math.hypot(cx[0] - cx[1], cy[0] - cy[1]) > 1.3 * (r[0] + r[1]) + 1:
            break
    for cx, cy, r in zip(cx, cy, r):
        a = coverage(attributes["shape"], cx, cy, r)
        image = image * (1 - a) + colour[:, None, None] * a
    return image.astype(np.float32)


def draw_batch(n, rng):
    """n random captions and their drawings [n, 3, 32, 32]."""
    attributes = [random_attributes(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([draw(a, rng) for a in attributes]))
    return [caption_of(**a) for a in attributes], images


# ----------------------------------------------------------------------------------------------
# The judge: reads colour, shape, count and background back from an image.

def nearest_colour(rgb):
    """The palette name nearest to each RGB row [N, 3]."""
    return [list(PALETTE_RGB)[k] for k in torch.cdist(rgb.float(), PALETTE).argmin(dim=1).tolist()]


def label_components(mask):
    """4-connected components of boolean masks [B, H, W]: labels [B, H, W] (0 = background), each
    component carrying the largest flat pixel index in it (label propagation by max pooling)."""
    B, H, W = mask.shape
    labels = torch.where(mask, torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W), 0.0)
    cross = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]])
    while True:
        # max over the 4-neighbourhood: unfold the 3x3 windows and mask them with the cross
        windows = F.unfold(labels[:, None], 3, padding=1).view(B, 9, H, W) * cross.view(1, 9, 1, 1)
        grown = torch.where(mask, windows.amax(dim=1), 0.0)
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def judge(images):
    """Read each image [B, 3, H, W] in [0, 1] (resized to 32 x 32 if it is not): a list of dicts with
    the background colour (the median of the border pixels), the count of shapes (4-connected pixel
    groups of at least 3 pixels that differ from the background), their colour (nearest palette colour
    to their most saturated half) and their shape (of the largest group: the circle, square or
    triangle of the same area and centroid that matches its coverage best)."""
    images = images.detach().float().cpu()
    if images.shape[-2:] != (RESOLUTION, RESOLUTION):
        images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="area")
    readings = []
    for image in images:
        border = torch.cat([image[:, 0], image[:, -1], image[:, 1:-1, 0], image[:, 1:-1, -1]], dim=1).T  # [124, 3]
        bg = border.median(dim=0).values  # [3]
        dist = (image - bg[:, None, None]).norm(dim=0)  # [H, W]
        rough = dist > 0.2
        if rough.sum() < 3:
            readings.append(dict(background=nearest_colour(bg[None])[0], count=0, colour=None, shape=None))
            continue
        strong = dist >= dist[rough].median()  # the shapes' cores, away from their anti-aliased edges
        fg = image[:, strong].median(dim=1).values  # [3]
        direction = fg - bg
        alpha = (((image - bg[:, None, None]) * direction[:, None, None]).sum(0)
                 / direction.pow(2).sum().clamp(min=1e-6)).clamp(0, 1)
        labels = label_components((alpha > 0.5)[None])[0]
        ids, sizes = labels[labels > 0].unique(return_counts=True)
        ids = ids[sizes >= 3]
        shape = None
        if len(ids):
            largest = ids[sizes[sizes >= 3].argmax()]
            region = F.max_pool2d((labels == largest).float()[None], 3, 1, 1)[0] > 0  # grown by a pixel: its soft edge
            shape = best_template(alpha * region)
        readings.append(dict(background=nearest_colour(bg[None])[0], count=len(ids),
                             colour=nearest_colour(fg[None])[0], shape=shape))
    return readings


def best_template(alpha):
    """The shape whose coverage, at the same area and centroid as `alpha` [H, W], is nearest in L1."""
    area = alpha.sum().item()
    ys, xs = torch.meshgrid(torch.arange(RESOLUTION) + 0.5, torch.arange(RESOLUTION) + 0.5, indexing="ij")
    cx, cy = (alpha * xs).sum().item() / area, (alpha * ys).sum().item() / area
    # r for each shape from its area: circle pi r^2, square (1.8 r)^2, triangle (3 sqrt(3) / 4) (1.3 r)^2
    radius = dict(circle=math.sqrt(area / math.pi), square=math.sqrt(area) / 1.8,
                  triangle=math.sqrt(area / (3 * math.sqrt(3) / 4)) / 1.3)
    # compared at half resolution, so that a 2 x 2-blocky image (a pixel VAE's decoding) reads as well as a sharp one
    pooled = lambda a: F.avg_pool2d(a[None], 2)[0]
    errors = {s: (pooled(alpha) - pooled(torch.from_numpy(coverage(s, cx, cy, r)).float())).abs().sum().item()
              for s, r in radius.items()}
    return min(errors, key=errors.get)


# ----------------------------------------------------------------------------------------------
# The models: SD's real CLIP tokenizer built offline, a constructed VAE, the pipelines.


def clip_tokenizer():
    """SD's CLIP tokenizer, rebuilt offline from the BPE vocabulary that open_clip ships: the 256 byte
    symbols, the same with '</w>', the 48,894 merges, then <|startoftext|> and <|endoftext|> (ids
    49406, 49407; padding is <|endoftext|>, as in SD 1.5)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the lines open_clip's SimpleTokenizer reads
    chars = list(bytes_to_unicode().values())
    vocab = (chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
             + ["<|startoftext|>", "<|endoftext|>"])
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({token: i for i, token in enumerate(vocab)}, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), pad_token="<|endoftext|>",
                             model_max_length=77)


def sd_scheduler():
    """SD's noise schedule (scaled-linear betas 0.00085 to 0.012 over 1000 steps) as a DDIM scheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def pixel_vae(scaling_factor, carrier=2000.0):
    """An AutoencoderKL whose latent is the 2 x 2-averaged image (RGB in [-1, 1] in channels 0-2, zero in
    channel 3) and whose decoder upsamples it back (nearest), set by hand instead of trained.

    Every residual block is made the identity (its last conv zero). The one nonlinear stage of each half,
    GroupNorm -> SiLU -> conv, is made linear with two tricks: the signal s travels with its negative -s
    and two constant carriers +M, -M, so the group's mean is exactly 0 and its std M / 2 whatever the
    image (to 1e-6), and the next conv reads silu(s) - silu(-s) = s exactly."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=1, latent_channels=4, sample_size=RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        mid_block_add_attention=False, scaling_factor=scaling_factor,
    )
    M, eye = carrier, torch.eye(8)[:, :, None, None]
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for half, n_in in ((vae.encoder, 3), (vae.decoder, 4)):
            half.conv_in.weight[:3, :3, 1, 1] = torch.eye(3)  # channels 0-2: s; 3-5: -s; 6, 7: +M, -M
            half.conv_in.weight[3:6, :3, 1, 1] = -torch.eye(3)
            half.conv_in.bias[6:] = torch.tensor([M, -M])
            half.conv_norm_out.weight.fill_(M / 2)  # undo the division by the group's std
            half.conv_out.weight[:3, :3, 1, 1] = torch.eye(3)  # silu(s) - silu(-s) = s
            half.conv_out.weight[:3, 3:6, 1, 1] = -torch.eye(3)
        vae.encoder.down_blocks[0].downsamplers[0].conv.weight[:, :, :2, :2] = eye[:, :, :1, :1] / 4  # 2 x 2 mean
        vae.encoder.conv_out.bias[4:] = -30.0  # log-variance: the latent distribution is a point
        vae.quant_conv.weight.copy_(eye)
        vae.decoder.up_blocks[0].upsamplers[0].conv.weight[:, :, 1, 1] = torch.eye(8)  # after nearest upsampling
        vae.post_quant_conv.weight.copy_(torch.eye(4)[:, :, None, None])
    return vae


def tiny_pipeline(seed=0, sdxl=False):
    """A random Stable Diffusion pipeline small enough for a CPU (32x32 images, 16x16 latents), built with no
    download, for fast tests of mechanics (its images are noise); with sdxl=True a StableDiffusionXLPipeline
    of the same size, with SDXL's two text encoders, pooled embedding and size conditioning. Its tokenizer
    is SD's real CLIP tokenizer. Saved with save_pretrained, it loads back as any diffusers pipeline."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
    )
    # SDXL's UNet adds the pooled text embedding (32) and six size ids (8 each) to its time embedding
    sdxl_unet = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    with torch.random.fork_rng():  # random weights from `seed`, without touching the global RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64 if sdxl else 32,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **(sdxl_unet if sdxl else {}),
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64), latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config) if sdxl else None
    if sdxl:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=sd_scheduler())
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def shapes_pipeline(seed=0, scaling_factor=1.25):
    """The untrained shapes model: a StableDiffusionPipeline with a small UNet2DConditionModel on 16 x 16
    x 4 latents, a small CLIP text encoder (trained together with the UNet), SD's real CLIP tokenizer,
    SD's noise schedule with epsilon prediction, and the hand-set pixel VAE."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407,
        ))
        # Cross-attention at 8 x 8 and 4 x 4 only: self-attention over 16 x 16 positions would double the
        # cost on a CPU, and colours, shapes and counts are coarse.
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 2, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
    return StableDiffusionPipeline(
        vae=pixel_vae(scaling_factor), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ----------------------------------------------------------------------------------------------
# Pretraining and the quality check.


def pretrain(out, seed=0, steps=3200, batch_size=64, lr=1e-3, empty_fraction=0.1, ema_decay=0.999, noise_offset=0.5,
             offset_above=800):
    """Train the shapes model's UNet and text encoder jointly with the DDPM loss (epsilon prediction)
    on freshly drawn captioned shapes, a fraction of them with the empty caption so that CFG works,
    and save the EMA weights as a diffusers directory in fp16."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pipe = shapes_pipeline(seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]  # exponential moving average of the weights: what is saved
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * k / steps)),
    )
    bar = tqdm(range(steps), desc="pretrain")
    for step in bar:
        captions, images = draw_batch(batch_size, rng)
        captions = ["" if rng.random() < empty_fraction else c for c in captions]
        with torch.no_grad():
            latents = (pipe.vae.encode(images * 2 - 1).latent_dist.mean
                       * pipe.vae.config.scaling_factor)  # [B, 4, 16, 16]
        # Offset noise (diffusers' --noise_offset, a random shift of each channel), at t > 800 only. Without it the
        # noise hides too little of a 16 x 16 image's mean colour even at t = 999: the model learns to read the
        # background from x_t instead of from the caption, and at sampling time paints whatever mean colour x_T
        # happens to have. At lower t, where the shapes are drawn, it would drown their signal in unknowable noise.
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        offset = noise_offset * (t > offset_above).view(-1, 1, 1, 1) * torch.randn(batch_size, latents.shape[1], 1, 1)
        noise = torch.randn_like(latents) + offset
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        eps = pipe.unet(noise_scheduler.add_noise(latents, noise, t), t,
                        encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        loss = F.mse_loss(eps, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        # the decay ramps up (1/10, 2/11, ...) so that the average forgets the random initial weights
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1 - min(ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    pipe.to(torch.float16).save_pretrained(out)
    print(f"wrote {out}")


@torch.no_grad()
def quality(pipe, guidance_scale, n=96, seed=0, steps=20):
    """The judge's accuracy on n samples of "a COLOUR SHAPE" (every colour-shape pair in turn) drawn by the pipeline's
    own sampler (DDIM, eta 0) from fixed noise: the fraction of samples with the right colour, shape, count (one),
    and all three; and the images."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    wanted = [pairs[k % len(pairs)] for k in range(n)]
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([
        pipe([caption_of(c, s) for c, s in wanted[k : k + 32]], num_inference_steps=steps,
             guidance_scale=guidance_scale, eta=0.0, generator=generator, output_type="pt").images.float()
        for k in range(0, n, 32)
    ])
    right = np.array([(r["colour"] == c, r["shape"] == s, r["count"] == 1)
                      for r, (c, s) in zip(judge(images), wanted)])  # [n, 3]
    return dict(colour=right[:, 0].mean(), shape=right[:, 1].mean(), count=right[:, 2].mean(),
                all=right.all(1).mean()), images


# ----------------------------------------------------------------------------------------------
# The paper's headline on a CPU: DiffExp against its baseline in the shapes world, several seeds.

HERE = os.path.dirname(os.path.abspath(__file__))
# Per method: the reward (DDPO's a non-differentiable one, AlignProp's a differentiable one) and the runs' size,
# ours, chosen so that both arms over 3 seeds fit about 45 minutes on 2 cores with one thread per run.
REPLICATE = {
    "ddpo": ["--reward", "jpeg", "--epochs", "16", "--steps", "10", "--batch-size", "32", "--train-batch-size", "32",
             "--eval-every", "2"],
    "alignprop": ["--reward", "colour", "--epochs", "16", "--batch-size", "32", "--train-batch-size", "16",
                  "--eval-every", "2"],
}
# DiffExp with one part: alpha = 1, or no t > 999
ABLATIONS = {"eq7": ["--alpha-max", "1"], "eq8": ["--t-thres", "999"]}
LEVELS = (0.5, 0.75, 0.9)  # fractions of the baseline's final gain
DIVERSITY_PROMPTS = 6  # the plain "a COLOUR SHAPE" prompts of [unseen_shapes]; 16 samples each
SAMPLE_SCRIPT = """
import json, sys, torch, diffexp
out, prompts = sys.argv[1], json.loads(sys.argv[2])
args = diffexp.parse_args(["--model", "shapes", *sys.argv[3:], "--out", out + ".unused"])
pipe = diffexp.load_pipeline("shapes", args.lora_rank, "cpu", torch.float32)
pipe.scheduler.set_timesteps(args.steps)
images = {}
for explore in (False, True):  # 16 samples per prompt, the same noise for both samplers
    with torch.no_grad():
        images[explore] = torch.stack([diffexp.sample_batch(pipe, [p] * 16, torch.Generator().manual_seed(k),
                                                            explore=explore, **diffexp.sampling(args))["images"]
                                       for k, p in enumerate(prompts)])
torch.save(images, out)
"""


def run_in_parallel(commands, parallel, env):
    """Run {name: argv} as subprocesses, `parallel` at a time, printing each run's epochs as its log grows."""
    pending, running, shown = list(commands.items()), {}, {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, (argv, run_dir) = pending.pop(0)
                shutil.rmtree(run_dir, ignore_errors=True)  # a previous replicate's run: its log must not be reported
                os.makedirs(os.path.dirname(run_dir), exist_ok=True)
                with open(run_dir + ".out", "w") as out:
                    running[name] = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
                                                     env={**os.environ, **env}), run_dir
            time.sleep(2)
            for name, (proc, run_dir) in list(running.items()):
                rows = read_log(run_dir)
                for row in rows[shown.get(name, 0):]:
                    rewards = ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                        if k == "reward_mean" or k.startswith("eval_unseen"))
                    print(f"[{name}] epoch {row['epoch']}: {rewards}", flush=True)
                shown[name] = len(rows)
                if proc.poll() is not None:
                    if proc.returncode:
                        raise RuntimeError(f"run {name} failed; its output is in {run_dir}.out")
                    del running[name]
    finally:  # one run failed, or Ctrl-C: stop the others
        for proc, _ in running.values():
            proc.terminate()


def read_log(run_dir):
    """A run's log.jsonl rows so far (a line still being written is left for later)."""
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("}\n")]
    except OSError:
        return []


def first_reach(queries, values, level):
    """The reward queries at which a curve first reaches `level`, or None."""
    return next((q for q, v in zip(queries, values) if v >= level), None)


def replicate(method, seeds, out, ablation=None, parallel=2, extra=()):
    """DiffExp and its baseline (--no-explore) with identical settings and seeds on --model shapes, run in parallel
    processes of one thread each; then the curves (mean +- std over seeds) against reward queries, the queries each
    arm needs to reach 50/75/90% of the baseline's final gain, and the diversity of the two samplers. Writes
    results.json, curves.png and diversity.png into `out`; returns the results."""
    if seeds < 1 or parallel < 1:
        raise ValueError("replicate needs at least 1 seed and 1 run at a time.")
    settings = ["--method", method, *REPLICATE[method], *extra]
    reward = settings[len(settings) - settings[::-1].index("--reward")]  # the last --reward given, as argparse takes it
    diffexp_args = ABLATIONS.get(ablation, [])
    commands = {}
    for seed in range(seeds):
        for arm in ("diffexp", "baseline"):
            run_dir = os.path.join(out, "runs", f"{arm}-s{seed}")
            argv = [os.path.join(HERE, "diffexp.py"), "--model", "shapes", "--seed", str(seed), *settings,
                    "--out", run_dir, *(diffexp_args if arm == "diffexp" else ["--no-explore"])]
            commands[f"{arm} s{seed}"] = (argv, run_dir)
    run_in_parallel(commands, parallel, env=dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    # 1. The curves: the training samples' reward (the paper's Fig. 4) and the evaluation reward on unseen prompts.
    results = dict(method=method, reward=reward, seeds=seeds, ablation=ablation, settings=settings + diffexp_args,
                   curves={}, table={})
    for arm in ("diffexp", "baseline"):
        logs = [read_log(os.path.join(out, "runs", f"{arm}-s{seed}")) for seed in range(seeds)]
        for metric in ("reward_mean", f"eval_unseen_{reward}"):
            queries = [r["reward_queries"] for r in logs[0] if metric in r]
            values = np.array([[r[metric] for r in log if metric in r] for log in logs])  # [seeds, points]
            results["curves"][f"{arm}/{metric}"] = dict(queries=queries, per_seed=values.tolist(),
                                                        mean=values.mean(0).tolist(), std=values.std(0).tolist())
    # 2. The table: for levels at 50/75/90% of the baseline's final gain (mean curve), the queries each arm first
    # reaches them, averaged over the seeds that do (a seed that never does is counted in "reached").
    for metric in ("reward_mean", f"eval_unseen_{reward}"):
        base = results["curves"][f"baseline/{metric}"]
        start, end = base["mean"][0], base["mean"][-1]
        rows = []
        for fraction in LEVELS:
            level, row = start + fraction * (end - start), {}
            for arm in ("diffexp", "baseline"):
                curve = results["curves"][f"{arm}/{metric}"]
                reached = [first_reach(curve["queries"], seed_values, level) for seed_values in curve["per_seed"]]
                hits = [q for q in reached if q is not None]
                row[arm] = dict(queries=float(np.mean(hits)) if hits else None, reached=f"{len(hits)}/{seeds}")
            ratio = (row["diffexp"]["queries"] / row["baseline"]["queries"]
                     if row["diffexp"]["queries"] and row["baseline"]["queries"] else None)
            rows.append(dict(fraction=fraction, level=level, **row, ratio=ratio))
        results["table"][metric] = rows
    # 3. Diversity of the two samplers from the same starting model: 16 samples per unseen prompt, plain and DiffExp.
    with open(os.path.join(HERE, "prompts.txt")) as f:
        unseen = [line.strip() for line in f.read().split("[unseen_shapes]")[1].split("[")[0].splitlines()
                  if line.strip() and not line.startswith("#")][:DIVERSITY_PROMPTS]
    samples = os.path.abspath(os.path.join(out, "diversity_samples.pt"))
    subprocess.run([sys.executable, "-c", SAMPLE_SCRIPT, samples, json.dumps(unseen), *settings, *diffexp_args],
                   check=True, cwd=HERE)
    images = torch.load(samples)  # {explore: [prompts, 16, 3, 32, 32]}
    results["diversity"] = {}
    for explore, name in ((False, "plain"), (True, "diffexp")):
        readings = [[tuple(r.values()) for r in judge(per_prompt)] for per_prompt in images[explore]]
        distances = [torch.pdist(per_prompt.flatten(1)).mean().item()
                     for per_prompt in images[explore]]  # mean pairwise L2
        results["diversity"][name] = dict(distinct_readings=float(np.mean([len(set(r)) for r in readings])),
                                          pairwise_distance=float(np.mean(distances)))
    plot_results(results, images, unseen, out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def plot_results(results, images, prompts, out):
    """curves.png: reward against reward queries, mean +- std over seeds, both arms (the paper's Fig. 4); and
    diversity.png: 8 plain and 8 DiffExp samples per prompt from the same starting model (its Fig. 2/5)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("replicate draws its figures with matplotlib: pip install matplotlib") from None
    reward = results["reward"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, title in zip(axes, ("reward_mean", f"eval_unseen_{reward}"),
                                 ("training samples", "evaluation, unseen prompts")):
        for arm, colour in (("diffexp", "tab:blue"), ("baseline", "tab:gray")):
            curve = results["curves"][f"{arm}/{metric}"]
            mean, std = np.array(curve["mean"]), np.array(curve["std"])
            label = f"{results['method']} + DiffExp" if arm == "diffexp" else results["method"]
            ax.plot(curve["queries"], mean, color=colour, label=label)
            ax.fill_between(curve["queries"], mean - std, mean + std, color=colour, alpha=0.2)
        ax.set(title=title, xlabel="reward queries", ylabel=f"mean {reward}")
    axes[0].legend()
    fig.suptitle(f"{results['method']}, {reward} reward, shapes world, {results['seeds']} seeds (mean +- std)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    rows = [torch.cat([images[False][k, :8], images[True][k, :8]])
            for k in range(len(prompts))]  # [16, 3, 32, 32] per prompt
    fig, axes = plt.subplots(len(prompts), 1, figsize=(8, 0.62 * len(prompts) + 0.4))
    for ax, row, prompt in zip(axes, rows, prompts):
        ax.imshow(torch.cat(list(row), dim=2).permute(1, 2, 0).numpy())  # 16 x [3, 32, 32] -> [32, 512, 3]
        ax.set_axis_off()
        ax.set_title(f"{prompt}: 8 plain | 8 DiffExp", fontsize=7, pad=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "diversity.png"), dpi=80)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The shapes world: pretrain the shapes model.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain",
                            help="train the shapes model from scratch and save it (about 15 minutes on 2 CPU cores)")
    p.add_argument("--out", default="shapes_model", help="output directory (diffusers layout)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the data, the initial weights and the noise")
    p.add_argument("--steps", type=int, default=3200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay after 200 warm-up steps)")
    r = commands.add_parser("replicate", help="DiffExp against its baseline on the shapes model, several seeds; any "
                            "other flag goes to diffexp.py for both arms (e.g. --epochs 30 --t-thres 800)")
    r.add_argument("--method", choices=REPLICATE, required=True, help="ddpo (jpeg reward) or alignprop (colour reward)")
    r.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    r.add_argument("--out", help="output directory (default: runs/replicate-METHOD)")
    r.add_argument("--ablation", choices=ABLATIONS,
                   help="DiffExp with Eq. 7 only (alpha = 1) or Eq. 8 only (w_low = w_high)")
    r.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    args, extra = parser.parse_known_args(argv)
    if args.command == "pretrain":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        pretrain(args.out, args.seed, args.steps, args.batch_size, args.lr)
    else:
        out = args.out or os.path.join("runs",
                                       f"replicate-{args.method}" + (f"-{args.ablation}" if args.ablation else ""))
        results = replicate(args.method, args.seeds, out, args.ablation, args.parallel, extra)
        for metric, rows in results["table"].items():
            print(f"{metric}: " + "; ".join(f"{r['fraction']:.0%} of the gain: DiffExp {r['diffexp']['queries']}, "
                                            f"baseline {r['baseline']['queries']} queries (ratio {r['ratio']})"
                                            for r in rows))
        print(f"diversity {results['diversity']}; figures and results.json in {out}")


if __name__ == "__main__":
    main()
