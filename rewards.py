"""Reward functions for DiffExp, modeled on DDPO's rewards.py.

    fn = load_reward(name, device, dtype, tiny=False)
    scores = fn(images, prompts)   # images [B, 3, H, W] float in [0, 1], prompts list[str] -> float32 [B]

Names:
  aesthetic             LAION improved aesthetic predictor v2 on OpenAI CLIP ViT-L/14 (differentiable)
  pickscore             PickScore v1 (differentiable)
  hps                   HPS v2.1 (differentiable)
  jpeg                  DDPO's JPEG incompressibility: JPEG size in kB (not differentiable)
  jpeg_compressibility  minus the JPEG size in kB, so that smaller files score higher (not differentiable)
  imagereward           ImageReward v1.0, for evaluation only (not differentiable, needs `pip install image-reward`)
  fidelity              the shapes world's PickScore: how well the image shows everything its caption names, the
                        product of a small learned CNN's probabilities of the named colour, shape, count and
                        background (if named), in [0, 1] (differentiable, prompt-dependent)
  bold                  the shapes world's aesthetic score, a style the caption does not ask for: one shape of the
                        named colour drawn large (as large as the grammar's "large"), on a clean background of the
                        colour the caption names (grey if none), in [0, 1] (differentiable; captions of one shape)
  colour                the shapes world's: the fraction of the image that shows the colour the prompt names
                        (soft nearest-palette colour per pixel; differentiable; hacked by fields of colour)
  shapes_judge          the shapes world's: the fraction of the prompt's attributes (colour, shape, count, and the
                        background if named) that shapes.judge reads back (not differentiable, like DDPO's VQA reward)
  a+b+c                 ensemble of aesthetic, pickscore and hps: each member divided by its TYPICAL_SCALE,
                        then averaged, so that no member dominates through its units (differentiable)

Every reward network is frozen and in eval mode: gradients reach only the images. Each returned fn
carries `fn.differentiable` (bool) and `fn.networks` (the frozen modules it runs). To validate a name
WITHOUT loading any model (e.g. refuse `jpeg` for AlignProp while parsing arguments), call
`check_reward(name, need_grad=True)`; load_reward runs the same check first. Each function imports what it
needs, torch included, so that importing this module loads nothing heavy: a command line's reward name is
checked in milliseconds.

The aesthetic head is downloaded from the hub; to use a local copy of sac+logos+ava1-l14-linearMSE.pth
instead, set the environment variable DIFFEXP_AESTHETIC_HEAD=/path/to/sac+logos+ava1-l14-linearMSE.pth.

tiny=True builds the same architectures from tiny configs with fixed random weights, fully offline,
and scores through the same code (used by the tests and the CPU smoke runs).
"""

import io
import math
import os
from collections import OrderedDict

# Typical magnitude of each reward on SD 1.5 samples: ours, rough round values, not tuned (the paper
# does not state how it combines rewards). Only these rewards may join an ensemble.
TYPICAL_SCALE = {"aesthetic": 5.5, "pickscore": 21.0, "hps": 0.28}
SHAPES_WORLD = ("bold", "fidelity", "colour", "shapes_judge")  # they read captions of shapes.py; the judge reads all
DIFFERENTIABLE = tuple(TYPICAL_SCALE) + ("bold", "fidelity", "colour")
REWARDS = DIFFERENTIABLE + ("jpeg", "jpeg_compressibility", "imagereward", "shapes_judge")
COLOUR_TEMPERATURE = 0.02  # of the per-pixel softmax over palette colours; their squared distances are >= 0.2
# bold (ours): a shape stops gaining once it is as large as the smallest shape the grammar calls "large" (radius 7);
# a pixel is clean within BOLD_TOLERANCE (RGB distance) of the colour it should have, the drawings' colour jitter,
# and its cleanliness then falls as 1 / (1 + (excess / BOLD_SCALE)^2), a heavy tail so that gradients reach far-off
# pixels too.
BOLD_RADIUS, BOLD_TOLERANCE, BOLD_SCALE = 7.0, 0.08, 0.05

# Public hub copy of the LAION file (github.com/christophschuhmann/improved-aesthetic-predictor).
AESTHETIC_HEAD_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_INPUTS = 768  # the width of OpenAI CLIP ViT-L/14's image embedding
TINY_SEED = 0
# Tiny mode only: with default random weights the tiny rewards are nearly flat in their input, so nothing could
# be learned from them in smoke runs. The image tower's query/key projections are drawn TINY_QK_GAIN times larger,
# so that the class token attends selectively to patches (as in trained CLIP) instead of averaging them, which
# washes out spatial patterns; see _tiny_aesthetic_head and the PickScore logit scale for the other two changes.
TINY_QK_GAIN = 3.0
TINY_AESTHETIC_GAIN = 10.0


def check_reward(name, need_grad=False):
    """Raise ValueError if `name` is not a reward, or (need_grad) not a differentiable one. Loads nothing."""
    members = name.split("+")
    if len(members) > 1:
        bad = [m for m in members if m not in TYPICAL_SCALE]
        if bad:
            raise ValueError(f"reward ensemble {name!r}: member(s) {bad} cannot be ensembled; "
                             f"ensemble members must be among {', '.join(TYPICAL_SCALE)}")
    elif name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)} "
                         f"or an ensemble such as hps+aesthetic+pickscore")
    head = os.environ.get("DIFFEXP_AESTHETIC_HEAD")
    if "aesthetic" in members and head is not None and not os.path.isfile(head):
        raise ValueError(f"DIFFEXP_AESTHETIC_HEAD={head} is not a file; point it to {AESTHETIC_HEAD_FILE} or unset it")
    if need_grad and not all(m in DIFFERENTIABLE for m in members):
        raise ValueError(f"{name} is not differentiable; AlignProp needs a differentiable reward "
                         f"(aesthetic, pickscore, hps, bold, fidelity, colour or an ensemble of the first three)")


def check_prompt(name, prompt):
    """Raise ValueError if reward `name` cannot score `prompt`: the shapes world's rewards read captions of its grammar,
    and bold only those of one shape whose size is unsaid or large. Returns the caption's attributes (or None)."""
    if name not in SHAPES_WORLD:
        return None
    import shapes
    wanted = shapes.parse_caption(prompt)
    if name == "bold" and (wanted["count"] != 1 or "small" in prompt.lower().replace(",", " ").split()):
        raise ValueError(f"bold rewards one large shape, and prompt {prompt!r} asks for two or a small one; use "
                         "captions like 'a red circle' or 'a red circle on a white background' (prompts.txt's [bold]).")
    if wanted["colour"] == wanted["background"]:
        raise ValueError(f"prompt {prompt!r} asks for a shape in the colour of its background: nothing to see.")
    return wanted


def load_reward(name, device, dtype, tiny=False):
    """Return fn(images [B,3,H,W] in [0,1], prompts) -> float32 scores [B]; networks run in `dtype`."""
    import torch
    check_reward(name)
    members = name.split("+")
    if name == "imagereward":
        dtype = torch.float32  # ImageReward's own score() casts its features to float32 before its head
    if len(members) == 1:
        fn = _LOADERS[name](device, dtype, tiny)
    else:
        parts = [_LOADERS[m](device, dtype, tiny) for m in members]

        def fn(images, prompts):
            return torch.stack([p(images, prompts) / TYPICAL_SCALE[m] for p, m in zip(parts, members)]).mean(0)

        fn.networks = tuple(net for p in parts for net in p.networks)
    fn.differentiable = all(m in DIFFERENTIABLE for m in members)
    return fn


def clip_preprocess(images, size):
    """CLIP's eval preprocessing on tensors, so that gradients pass: short side to `size` (bicubic, antialiased
    like PIL's downsampling), centre crop, normalisation with OpenAI CLIP's mean and std."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import v2

    transform = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(size), v2.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
    return transform(images.float())


def aesthetic_head(state_dict_or_path):
    """The LAION aesthetic MLP, from a state dict or a .pth file with keys layers.0/2/4/6/7.{weight,bias}."""
    import torch
    state = state_dict_or_path
    if not isinstance(state, dict):
        state = torch.load(state, map_location="cpu", weights_only=True)  # the real file holds CUDA tensors
    head = _aesthetic_mlp(state["layers.0.weight"].shape[1] if "layers.0.weight" in state else AESTHETIC_HEAD_INPUTS)
    if set(state) != set(head.state_dict()) or any(v.shape != head.state_dict()[k].shape for k, v in state.items()):
        raise ValueError("not the LAION aesthetic predictor: expected keys layers.0/2/4/6/7.{weight,bias} of a "
                         "768-1024-128-64-16-1 MLP; use sac+logos+ava1-l14-linearMSE.pth")
    head.load_state_dict(state)
    return head


def _aesthetic_mlp(in_dim):
    # Linear layers only: the upstream ReLUs are commented out. Dropout is inactive in eval mode.
    from torch import nn
    return nn.Sequential(OrderedDict(layers=nn.Sequential(
        nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))))


def hub_unreachable():
    """Why the Hugging Face Hub cannot be reached (one request, no retries), or None. Where it cannot, a file missing
    from the cache would cost half a minute: huggingface_hub retries it 5 times, 1 to 8 s apart (23 s here), for every
    file. HF_HUB_OFFLINE=1 skips even this request."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as e:  # no network, no DNS, a proxy that refuses: whatever it is, the hub is out of reach
        return f"{type(e).__name__} from {constants.ENDPOINT}"
    return None


def _fetch(reward, what, load):
    """load(), or one clear line: which reward needs which download, and the ways around it. Where the hub cannot be
    reached, load() runs in huggingface_hub's offline mode: a cached file loads, a missing one fails at once."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    unreachable = hub_unreachable()
    try:
        constants.HF_HUB_OFFLINE = bool(unreachable)  # no retries for a file that cannot be downloaded
        return load()
    except Exception as e:  # no network, offline mode, a moved repository: the libraries' own messages are long
        hint = ""
        if reward == "aesthetic":
            hint = f", or set DIFFEXP_AESTHETIC_HEAD to a local copy of {AESTHETIC_HEAD_FILE}"
        reason = unreachable or type(e).__name__
        raise RuntimeError(f"reward {reward}: cannot download {what} ({reason}); check the network and "
                           f"HF_HUB_OFFLINE{hint}, or run offline with --model shapes --reward bold") from None
    finally:
        constants.HF_HUB_OFFLINE = offline


def _aesthetic_head_file():
    path = os.environ.get("DIFFEXP_AESTHETIC_HEAD")
    if path is None:
        from huggingface_hub import hf_hub_download
        path = _fetch("aesthetic", f"{AESTHETIC_HEAD_FILE} from {AESTHETIC_HEAD_REPO}",
                      lambda: hf_hub_download(AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE))
    return path


def _frozen(module, device, dtype):
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _seeded(build):
    # Fixed weights for tiny models without disturbing the caller's global RNG.
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build()


def _tiny_open_clip():
    import torch
    import open_clip
    vision = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=dict(width=32, heads=2, layers=2))
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:  # in_proj_weight stacks the q, k, v projections
            block.attn.in_proj_weight[:2 * vision["width"]] *= TINY_QK_GAIN
    return model


def _tiny_aesthetic_head(in_dim):
    # Default Linear init shrinks the signal at each of the five layers, leaving a constant score. Instead:
    # weights N(0, 1/fan_in), zero biases, and the last layer TINY_AESTHETIC_GAIN times larger, so that the
    # score moves by a fraction of a point across a tiny model's images, as the real predictor does on SD samples.
    import torch
    from torch import nn
    head = _aesthetic_mlp(in_dim)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer in linears:
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            nn.init.zeros_(layer.bias)
        linears[-1].weight *= TINY_AESTHETIC_GAIN
    return head


def _check_inputs(images, prompts):
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rewards expect images of shape [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")


def _cos(a, b):
    import torch.nn.functional as F
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


def _aesthetic(device, dtype, tiny):
    import open_clip
    import torch.nn.functional as F
    if tiny:
        clip, head = _seeded(_tiny_open_clip), _seeded(lambda: _tiny_aesthetic_head(32))
    else:
        head = aesthetic_head(_aesthetic_head_file())  # first, so a wrong file fails before the CLIP download
        if head.layers[0].in_features != AESTHETIC_HEAD_INPUTS:
            raise ValueError(f"the aesthetic head takes {head.layers[0].in_features} inputs, "
                             f"not the {AESTHETIC_HEAD_INPUTS} of CLIP ViT-L/14; use {AESTHETIC_HEAD_FILE}")
        # OpenAI's CLIP was trained with QuickGELU; open_clip 3 builds nn.GELU unless told otherwise.
        clip = _fetch("aesthetic", "OpenAI's CLIP ViT-L/14", lambda: open_clip.create_model(
            "ViT-L-14", pretrained="openai", force_quick_gelu=True))
    clip, head = _frozen(clip, device, dtype), _frozen(head, device, dtype)
    size = clip.visual.image_size[0]

    def fn(images, prompts):
        _check_inputs(images, prompts)
        embed = F.normalize(clip.encode_image(clip_preprocess(images, size).to(dtype)), dim=-1)
        return head(embed).squeeze(-1).float()

    fn.networks = (clip, head)
    return fn


def _pickscore(device, dtype, tiny):
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel
    if tiny:
        import open_clip
        cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        # logit scale 100, the value trained CLIP models (PickScore included) end with, not the init value 1/0.07
        config = CLIPConfig(text_config=cfg, vision_config=dict(cfg, image_size=32, patch_size=8), projection_dim=32,
                            logit_scale_init_value=math.log(100.0))
        model = _seeded(lambda: CLIPModel(config))
        with torch.no_grad():
            for layer in model.vision_model.encoder.layers:
                layer.self_attn.q_proj.weight *= TINY_QK_GAIN
                layer.self_attn.k_proj.weight *= TINY_QK_GAIN
        # Same BPE vocabulary and special tokens as the laion tokenizer, shipped with open_clip (offline).
        # Padding ids differ, but the text tower pools at the first EOS under a causal mask.
        tokenize = open_clip.get_tokenizer("ViT-H-14")
    else:
        model = _fetch("pickscore", "yuvalkirstain/PickScore_v1",
                       lambda: CLIPModel.from_pretrained("yuvalkirstain/PickScore_v1"))
        tokenizer = _fetch("pickscore", "the laion/CLIP-ViT-H-14-laion2B-s32B-b79K tokenizer",
                           lambda: AutoTokenizer.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K"))

        def tokenize(prompts):
            return tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                             return_tensors="pt").input_ids

    model = _frozen(model, device, dtype)
    size = model.config.vision_config.image_size

    def fn(images, prompts):
        _check_inputs(images, prompts)
        image = model.get_image_features(pixel_values=clip_preprocess(images, size).to(dtype)).pooler_output
        text = model.get_text_features(input_ids=tokenize(prompts).to(device)).pooler_output
        return (model.logit_scale.exp() * _cos(image, text)).float()

    fn.networks = (model,)
    return fn


def _hps(device, dtype, tiny):
    import torch
    import open_clip
    if tiny:
        model = _seeded(_tiny_open_clip)
    else:
        from huggingface_hub import hf_hub_download
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        path = _fetch("hps", "HPS_v2.1_compressed.pt from xswu/HPSv2",
                      lambda: hf_hub_download("xswu/HPSv2", "HPS_v2.1_compressed.pt"))
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
    model = _frozen(model, device, dtype)
    tokenize = open_clip.get_tokenizer("ViT-H-14")
    size = model.visual.image_size[0]

    def fn(images, prompts):
        _check_inputs(images, prompts)
        image = model.encode_image(clip_preprocess(images, size).to(dtype))
        text = model.encode_text(tokenize(prompts).to(device))
        return _cos(image, text).float()  # HPS v2 scores with the plain cosine, no logit scale

    fn.networks = (model,)
    return fn


def _to_pil(images):
    import torch
    from PIL import Image
    images = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).cpu().numpy()]  # NCHW -> NHWC


def _jpeg(device, dtype, tiny):
    import torch
    def fn(images, prompts):
        _check_inputs(images, prompts)
        sizes = []
        for image in _to_pil(images):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            sizes.append(buffer.tell() / 1000)  # kB, as DDPO
        return torch.tensor(sizes, dtype=torch.float32, device=images.device)

    fn.networks = ()
    return fn


def _jpeg_compressibility(device, dtype, tiny):
    size = _jpeg(device, dtype, tiny)

    def fn(images, prompts):
        return -size(images, prompts)

    fn.networks = ()
    return fn


def _imagereward(device, dtype, tiny):
    import torch
    if tiny:
        raise ValueError("imagereward has no tiny version; use it only with tiny=False (evaluation)")
    try:
        import ImageReward
    except ImportError as e:
        raise RuntimeError("the imagereward reward needs the image-reward package: pip install image-reward") from e
    model = ImageReward.load("ImageReward-v1.0", device=device).eval().requires_grad_(False)

    @torch.no_grad()
    def fn(images, prompts):
        _check_inputs(images, prompts)
        # ImageReward.score(prompt, PIL image) -> float; it runs its own PIL preprocessing
        scores = [model.score(p, image) for p, image in zip(prompts, _to_pil(images))]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    fn.networks = (model,)
    return fn


def _colour(device, dtype, tiny):
    import torch
    import shapes
    names = list(shapes.COLOURS)

    def fn(images, prompts):
        _check_inputs(images, prompts)
        named = torch.tensor([names.index(shapes.parse_caption(p)["colour"]) for p in prompts], device=images.device)
        palette = shapes.PALETTE.to(images.device)  # [9, 3]: the 8 colours and grey
        distance2 = (images.float()[:, None] - palette[None, :, :, None, None]).pow(2).sum(dim=2)  # [B, 8, H, W]
        p = torch.softmax(-distance2 / COLOUR_TEMPERATURE, dim=1)  # each pixel's soft palette colour
        return p[torch.arange(len(images)), named].mean(dim=(1, 2))  # [B]

    fn.networks = ()
    return fn


def _fidelity(device, dtype, tiny):
    import shapes
    net = _frozen(shapes.load_fidelity_net(), device, dtype)  # a 1 MB file in shapes_model/: no tiny version needed

    def fn(images, prompts):
        _check_inputs(images, prompts)
        return shapes.fidelity(net, images.to(dtype), prompts).float()

    fn.networks = (net,)
    return fn


def _bold(device, dtype, tiny):
    import torch
    import torch.nn.functional as F
    import shapes
    names = list(shapes.PALETTE_RGB)

    def solid(coverage):  # [B, H, W]: ~1 where a 3 x 3 box blur of the coverage exceeds 1/2: isolated specks vanish
        blurred = F.avg_pool2d(F.pad(coverage[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0]
        return torch.sigmoid((blurred - 0.5) / 0.05)

    def clean(distance):  # 1 within the tolerance, then a heavy tail
        return 1 / (1 + (F.relu(distance - BOLD_TOLERANCE) / BOLD_SCALE) ** 2)

    # each shape's solid area at the radius where bold stops rising, as a fraction of the image
    full = {s: solid(torch.from_numpy(shapes.coverage(s, 16, 16, BOLD_RADIUS)).float()[None]).mean().item()
            for s in shapes.SHAPES}
    ring = torch.ones(shapes.RESOLUTION, shapes.RESOLUTION, dtype=torch.bool, device=device)
    ring[1:-1, 1:-1] = False  # the outermost pixels, which every drawing leaves to the background

    def fn(images, prompts):
        _check_inputs(images, prompts)
        wanted = [check_prompt("bold", p) for p in prompts]
        x = images.float()
        if x.shape[-2:] != ring.shape:  # read at the shapes' own 32 x 32, as the judge does
            x = F.interpolate(x, size=ring.shape, mode="area")
        palette = shapes.PALETTE.to(images.device)
        colour = palette[[names.index(w["colour"]) for w in wanted]][:, :, None, None]  # [B, 3, 1, 1]
        background = palette[[names.index(w["background"] or "grey") for w in wanted]][:, :, None, None]
        # 1. Coverage: each pixel as a mix (1 - a) background + a colour (an anti-aliased edge is a partial mix),
        #    counted only as far as it lies on that mix: another colour is no coverage.
        d = colour - background
        a = (((x - background) * d).sum(1) / d.pow(2).sum(1)).clamp(0, 1)  # [B, H, W]
        coverage = a * clean((x - background - a[:, None] * d).norm(dim=1))
        # 2. Size: the solid part's area, up to the area of the named shape at BOLD_RADIUS.
        shape = solid(coverage)  # [B, H, W]
        size = (shape.mean(dim=(1, 2)) / torch.tensor([full[w["shape"]] for w in wanted], device=x.device)).clamp(max=1)
        # 3. A clean background: the pixels beyond a pixel of the shape are the background colour (no tint, no specks
        #    of any colour), and so is the outermost ring (no frame, no image filled with the colour).
        near_background = clean((x - background).norm(dim=1))  # [B, H, W]
        away = 1 - F.max_pool2d(shape[:, None], 3, stride=1, padding=1)[:, 0]
        tidy = (away * near_background).sum(dim=(1, 2)) / away.sum(dim=(1, 2)).clamp(min=1e-6)
        return size * tidy * near_background[:, ring].mean(dim=1)

    fn.networks = ()
    return fn


def _shapes_judge(device, dtype, tiny):
    import torch
    import shapes

    def fn(images, prompts):
        _check_inputs(images, prompts)
        scores = []
        for prompt, reading in zip(prompts, shapes.judge(images)):
            # background only if named
            wanted = {k: v for k, v in shapes.parse_caption(prompt).items() if v is not None}
            scores.append(sum(reading[k] == v for k, v in wanted.items()) / len(wanted))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    fn.networks = ()
    return fn


_LOADERS = {"aesthetic": _aesthetic, "pickscore": _pickscore, "hps": _hps, "jpeg": _jpeg,
            "jpeg_compressibility": _jpeg_compressibility, "imagereward": _imagereward, "fidelity": _fidelity,
            "bold": _bold, "colour": _colour, "shapes_judge": _shapes_judge}
