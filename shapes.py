"""The shapes world: captioned 32x32 shapes, their judge, a learned fidelity scorer, and a small text-to-image model
pretrained on them, so that reward fine-tuning, and DiffExp, can be watched, tested and measured on a CPU. It imports
nothing of the project: diffexp.py and rewards.py build on it.

    python shapes.py pretrain --out shapes_model     # 16 min 49 s on this 2-core machine, alone (seed 0)
    python shapes.py fidelity                        # its scorer: 3 min 3 s, bit for bit the shipped weights

Captions: count (a/an, two), size (small, large, or unsaid), one of 8 colours, one of 3 shapes, and half of the time
"on a COLOUR background" (otherwise grey): "two small blue triangles on a white background". parse_caption reads them.
Drawings: anti-aliased (4 x 4 sub-pixel coverage), a random radius within the size word's range (SIZES), random
non-overlapping positions a pixel off the border, colours jittered by +-0.04, drawn on the fly from a seed.

The judge (judge): background = median of the border pixels; the shapes = pixels that differ from it, as 4-connected
groups of 3 pixels or more (count); their colour = the nearest palette colour of their most saturated half; their
shape = the circle, square or triangle of the same area and centroid whose coverage matches best at 16 x 16, so that a
2 x 2-blocky decoding reads as well as a sharp drawing. It reads every attribute of 1,000 fresh drawings right, and
99.7% after a round trip through the model's VAE (tested on 300: at least 95%).

The fidelity scorer (FidelityNet, shapes_model/fidelity.safetensors, 1 MB, 0.24 M parameters): four classifiers on
one small CNN read the shapes' colour, shape, count and the background; fidelity() is the product of the
probabilities of what the caption names (our design, not a contrastive score: each factor says what is wrong). It
reads images at 16 x 16, the latents' resolution, so that pixel texture carries no signal. Trained with cross-entropy
on 256,000 fresh drawings, each augmented (rotation up to 15 degrees, zoom, blur, colour cast, contrast, pixel noise).
Tested: an image's own caption outranks every caption with the shape or the colour changed for 100% / 100% of fresh
drawings, and 99.7% / 100% of another renderer's at 32 and 64 px; on the model's own samples its mean (0.589) is the
judge's whole-caption accuracy (52.1%) within 0.1.

The model (shapes_model/, 17 MB with the scorer, fp32, a plain diffusers StableDiffusionPipeline that
`StableDiffusionPipeline.from_pretrained("shapes_model")("a red circle")` runs on a CPU):
- VAE: constructed, not trained (pixel_vae): its latent is the 2 x 2-averaged image (16 x 16 x 4, scaling factor 1.25
  for unit variance) and its decoder upsamples it back (26.6 dB PSNR on the drawings); its residual blocks are
  identities and its one nonlinear stage per half is made exactly linear.
- Text encoder: a 2-layer CLIP text model (width 32) trained with the UNet; SD's real CLIP tokenizer, rebuilt offline
  from open_clip's BPE file (clip_tokenizer).
- UNet: a UNet2DConditionModel (widths 32/64/64, cross-attention at 8 x 8 and 4 x 4), 1.7 M parameters, SD's noise
  schedule and epsilon prediction.
- Training (pretrain): the DDPM loss, 10% empty captions (for CFG), AdamW lr 1e-3, 200 warm-up steps and a cosine
  decay, batch 64, 3,200 steps, EMA 0.999, deterministic from the seed. One addition, offset noise (0.5) at t > 800
  only: without it 16 x 16 latents leave a picture's mean colour visible at t = 999, and the model ignored "on a blue
  background" (right 17% of the time); at every t it drowned the shapes (33-42% right); scaled by sqrt(1 - abar_t),
  32%; only at t > 900, 62%.

Its quality (quality(): 96 samples of "a COLOUR SHAPE", every pair 4 times, 20 DDIM steps, eta 0, fixed noise;
tested with thresholds 85%, 60% and 15 points): colour right 100% at every CFG scale; shape 57% / 72% / 70% / 69%,
count 81% / 94% / 98% / 96%, all three 47% / 67% / 68% / 65% at CFG 1 / 3 / 5 / 7.5; backgrounds right in 100% of
samples of the whole grammar. The colour is followed even unguided, so guidance shows in the whole caption (68%
against 47%). Its weak spot is shape: circles and squares are often the same cup-like blob.
"""

import argparse
import gzip
import json
import math
import os
import tempfile

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


def draw(attributes, rng, supersample=SUPERSAMPLE):
    """An anti-aliased RGB image [3, 32, 32] in [0, 1] of the attributes, with random positions, radii
    and slight colour jitter; two shapes never overlap and every shape keeps a pixel off the border.
    supersample=1 draws hard edges (no anti-aliasing)."""
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
        a = coverage(attributes["shape"], cx, cy, r, supersample=supersample)
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
# The fidelity scorer: a small CNN that reads what a caption can name, learned from fresh drawings.

ATTRIBUTES = {"colour": list(COLOURS), "shape": list(SHAPES), "count": [1, 2], "background": list(PALETTE_RGB)}
FIDELITY_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_model", "fidelity.safetensors")


class FidelityNet(torch.nn.Module):
    """Four classifiers sharing one small CNN: the shapes' colour (8 classes), their shape (3), their count (1 or 2)
    and the background (8 colours or grey) of images [B, 3, H, W] in [0, 1]. It reads them at 16 x 16 (an average
    over pixel blocks), the resolution of the shapes model's latents, so that whatever pixel texture a sampler adds
    on top carries no signal. Returns {attribute: log-probabilities [B, classes]}."""

    def __init__(self, width=32):
        super().__init__()
        w, layers = width, []
        for c_in, c_out, stride in ((3, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)):
            conv = torch.nn.Conv2d(c_in, c_out, 3, stride, padding=1)
            layers += [conv, torch.nn.GroupNorm(8, c_out), torch.nn.SiLU()]
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # [B, 4w]
        self.heads = torch.nn.Linear(4 * w, sum(map(len, ATTRIBUTES.values())))

    def forward(self, images):
        x = F.adaptive_avg_pool2d(images, RESOLUTION // 2) * 2 - 1  # [B, 3, 16, 16] in [-1, 1]; 16 -> 8 -> 4 inside
        split = self.heads(self.features(x)).split([len(v) for v in ATTRIBUTES.values()], dim=1)  # [B, 8 + 3 + 2 + 9]
        return {name: part.log_softmax(dim=1) for name, part in zip(ATTRIBUTES, split)}


def fidelity(net, images, prompts):
    """How well each image [B, 3, H, W] shows everything its caption names: the product, over the attributes the
    caption names (colour, shape, count, and the background if it names one), of the net's probability that the
    image shows the named value. [B] in [0, 1], differentiable in the images."""
    wanted = [parse_caption(p) for p in prompts]
    log_p, rows = net(images), torch.arange(len(prompts), device=images.device)
    total = torch.zeros(len(prompts), device=images.device)
    for name, values in ATTRIBUTES.items():  # only the background can be unsaid: it then adds nothing
        named = torch.tensor([w[name] is not None for w in wanted], device=images.device)  # [B]
        index = torch.tensor([values.index(w[name] or values[0]) for w in wanted], device=images.device)  # [B]
        total = total + named * log_p[name][rows, index]
    return total.exp()


def augment(images, g):
    """Other ways of drawing the same captions, as a scorer should tolerate them: a small rotation and zoom, a blur,
    a colour cast and contrast change, and pixel noise (the shapes model's samples are noisy). images [B, 3, 32, 32]."""
    B = len(images)
    u = lambda *shape: torch.rand(*shape, generator=g)
    angle, zoom = (u(B) - 0.5) * math.radians(30), 0.95 + 0.25 * u(B)  # +-15 degrees; zoom > 1: smaller shapes
    cos, sin, zero = zoom * torch.cos(angle), zoom * torch.sin(angle), torch.zeros(B)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # [B, 2, 3]
    images = F.grid_sample(images, F.affine_grid(theta, images.shape, align_corners=False), padding_mode="border",
                           align_corners=False)  # the border is background, so padding with it adds background
    soft = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # a 3 x 3 box blur
    images = torch.where((u(B) < 0.3).view(B, 1, 1, 1), soft, images)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = mean + (0.85 + 0.3 * u(B, 1, 1, 1)) * (images - mean) + 0.12 * (u(B, 3, 1, 1) - 0.5)  # contrast, cast
    return (images + 0.15 * u(B, 1, 1, 1) * torch.randn(images.shape, generator=g)).clamp(0, 1)


def train_fidelity(out=FIDELITY_WEIGHTS, seed=0, steps=2000, batch_size=128, lr=3e-3):
    """Train FidelityNet with cross-entropy on each attribute of fresh drawings (hard or anti-aliased edges, then
    augment()), deterministic from `seed`, and save its weights (fp32 safetensors)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    net = FidelityNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="fidelity scorer")
    for step in bar:
        attributes = [random_attributes(rng) for _ in range(batch_size)]
        drawn = [draw(a, rng, supersample=int(rng.choice([1, 2, 4]))) for a in attributes]
        log_p = net(augment(torch.from_numpy(np.stack(drawn)), g))
        loss = sum(F.nll_loss(log_p[name], torch.tensor([values.index(a[name] or "grey") for a in attributes]))
                   for name, values in ATTRIBUTES.items())  # four cross-entropies; a background left unsaid is grey
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    save_file(net.state_dict(), out)
    print(f"wrote {out}")


def load_fidelity_net(path=FIDELITY_WEIGHTS):
    """The shipped fidelity scorer (made by `python shapes.py fidelity`), frozen, in eval mode."""
    from safetensors.torch import load_file

    net = FidelityNet()
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)


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


def tiny_pipeline(seed=0, sdxl=False, dtype=torch.float32):
    """A random Stable Diffusion pipeline small enough for a CPU (32x32 images, 16x16 latents), built with no
    download, for fast tests of mechanics (its images are noise); with sdxl=True a StableDiffusionXLPipeline
    of the same size, with SDXL's two text encoders, pooled embedding and size conditioning. Its tokenizer
    is SD's real CLIP tokenizer. Its weights are made in `dtype` (diffusers warns about casting a model after).
    Saved with save_pretrained, it loads back as any diffusers pipeline."""
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
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng():  # random weights from `seed`, without touching the global RNG
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
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
        finally:
            torch.set_default_dtype(default_dtype)
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
    and save the EMA weights as a diffusers directory (fp32: loaded plainly, every component is fp32 on a CPU)."""
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
    pipe.save_pretrained(out)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="The shapes world: pretrain its model, train its fidelity scorer.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain",
                            help="train the shapes model from scratch and save it (about 17 minutes on 2 CPU cores)")
    p.add_argument("--out", default="shapes_model", help="output directory (diffusers layout)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the data, the initial weights and the noise")
    p.add_argument("--steps", type=int, default=3200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay after 200 warm-up steps)")
    f = commands.add_parser("fidelity", help="train the fidelity reward's scorer and save it (minutes on 2 CPU cores)")
    f.add_argument("--out", default=FIDELITY_WEIGHTS, help="output file (safetensors)")
    f.add_argument("--seed", type=int, default=0, help="random seed: the data, the initial weights, the augmentations")
    args = parser.parse_args(argv)
    if args.command == "pretrain":
        pretrain(args.out, args.seed, args.steps, args.batch_size, args.lr)
    else:
        train_fidelity(args.out, args.seed)


if __name__ == "__main__":
    main()
