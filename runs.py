"""A run's settings, its command line and its directory: the part of diffexp.py that needs no torch.

    args = parse_args(argv)   # Args, every unset setting filled in; a bad flag ends the process in one line, exit 2

Everything here uses the standard library alone, so that `python diffexp.py` refuses a bad command line in a
fraction of a second, before torch and diffusers load (about 5 s). What is here, top to bottom:
  1. Args, one field and one line of doc per setting, and DEFAULTS, the values that depend on the method (the
     paper's) or on an offline model (ours); --help shows both.
  2. parse_args: the command line, the settings of a run being resumed, every check that needs no model, the run
     directory's name.
  3. The run directory: prompt files, config.json and log.jsonl, the stop signal.
"""

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field, fields

import rewards

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS_FILE = os.path.join(HERE, "prompts.txt")


# ---- 1. Settings.
def arg(default, doc):
    return field(default=default, metadata={"doc": doc})


@dataclass
class Args:
    method: str = arg("alignprop", "ddpo (policy gradient) or alignprop (reward backprop)")
    reward: str = arg("aesthetic", "a reward of rewards.py, e.g. aesthetic, pickscore, hps, jpeg, bold, or a+b+c")
    model: str = arg("stable-diffusion-v1-5/stable-diffusion-v1-5", "hub id or directory (SD 1.x, SDXL); offline: "
                     "shapes, tiny, tiny-sdxl")
    prompts: str = arg("animals", "training prompts: a [set] of prompts.txt, or a file with one prompt per line")
    eval_prompts: str = arg("unseen_animals", "evaluation prompts, unseen in training (a set or a file)")
    seed: int = arg(0, "random seed")
    steps: int = arg(50, "DDIM denoising steps (paper)")
    eta: float = arg(None, "DDIM eta (DDPO needs eta > 0 for its log-probabilities)")
    w_high: float = arg(None, "Eq. 7: the ordinary CFG scale, for t <= t_thres (paper's values)")
    w_low: float = arg(1.0, "Eq. 7: the CFG scale for t > t_thres, the early steps (ours)")
    t_thres: int = arg(900, "Eq. 7: the timestep where the scale switches from w_low to w_high (ours)")
    alpha_min: float = arg(1.0, "Eq. 8: lower bound of the prompt weight alpha (ours)")
    alpha_max: float = arg(2.0, "Eq. 8: upper bound of the prompt weight alpha (ours)")
    explore_epochs: int = arg(None, "DiffExp samples epochs 1 ... N, then plainly (unset: the paper's first 3/4 of "
                              "--epochs, rounded up); fixed when the run starts, kept by --resume")
    no_explore: bool = arg(False, "plain sampling throughout: the DDPO or AlignProp baseline without DiffExp")
    epochs: int = arg(200, "training epochs; each samples --batch-size images (ours)")
    batch_size: int = arg(64, "images sampled per epoch, over all processes (paper)")
    samples_per_prompt: int = arg(1, "k: an epoch draws batch_size / k prompts, k samples of each (paper: 1)")
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
    backprop_random: bool = arg(False, "draw K ~ U{1..--backprop-steps} per micro-batch instead of a fixed K")
    loss_coeff: float = arg(0.01, "loss = -loss_coeff * mean(reward) (AlignProp's configs)")
    out: str = arg(None, "run directory (unset: runs/METHOD-REWARD-MODEL-ARM[-CHANGED SETTINGS]-sSEED)")
    resume: str = arg(None, "continue the run in this directory from its last checkpoint, with its settings")
    overwrite: bool = arg(False, "replace an existing run directory")
    device: str = arg(None, "torch device (unset: cuda if available, else cpu)")
    dtype: str = arg(None, "frozen-weight dtype: fp32, fp16 or bf16 (unset: bf16 on cuda, fp32 on cpu)")
    eval_every: int = arg(10, "evaluate (plain sampling, fixed noise) every N epochs, first and last; 0: never")
    eval_reward: str = arg(None, "an extra reward scored at evaluation only, e.g. imagereward")
    eval_explored: bool = arg(False, "evaluation also samples the unseen prompts with DiffExp's sampler (this run's "
                              "Eq. 7 and 8, with --no-explore too), from the same noise")
    save_every: int = arg(10, "checkpoint every N epochs and at the end; 0: at the end only")
    wandb: bool = arg(False, "also log to Weights & Biases (pip install wandb)")
    generate: str = arg(None, "images of --eval-prompts with and without this run's LoRA, then exit")


FIELDS = {f.name: f for f in fields(Args)}
METHODS = ("ddpo", "alignprop")
# --help's groups, each named at its first setting
GROUPS = {"method": "what to fine-tune", "steps": "sampling", "w_low": "DiffExp (Eq. 7, Eq. 8)", "epochs": "training",
          "inner_epochs": "DDPO", "backprop_steps": "AlignProp", "out": "run"}

# The settings that depend on the method ("*": any model; the paper's values, its appendix B) or on an offline model
# (ours). A setting whose flag is not given takes the first value of DEFAULTS[model, method], DEFAULTS["*", method]
# and Args that has it. The shapes model: runs of minutes on 2 cores, on its style reward bold; the README says how
# DDPO's budget and each method's exploration (replicate.py --premise) were chosen.
TINY_RUN = dict(epochs=6, batch_size=16, steps=20, micro_batch_size=4, train_batch_size=8, lr=1e-2)
SHAPES_RUN = dict(reward="bold", prompts="bold", eval_prompts="unseen_bold", eval_every=1, micro_batch_size=16)
DEFAULTS = {
    ("*", "ddpo"): dict(w_high=5.0, eta=1.0, lr=3e-4, weight_decay=1e-4, max_grad_norm=1.0, micro_batch_size=4,
                        train_batch_size=32),
    ("*", "alignprop"): dict(w_high=7.5, eta=0.0, lr=1e-3, weight_decay=0.1, max_grad_norm=5.0, micro_batch_size=2,
                             train_batch_size=64),
    ("shapes", "ddpo"): SHAPES_RUN | dict(epochs=48, batch_size=128, samples_per_prompt=16, steps=10,
                                          train_batch_size=128, lr=5e-4, eval_every=4,
                                          w_low=0.0, t_thres=600, alpha_min=1.0, alpha_max=1.0),
    ("shapes", "alignprop"): SHAPES_RUN | dict(epochs=2, batch_size=64, steps=20, train_batch_size=16,
                                               w_low=0.0, t_thres=600, alpha_min=1.0, alpha_max=1.1),
    ("tiny", "ddpo"): TINY_RUN,
    ("tiny", "alignprop"): TINY_RUN,
    ("tiny-sdxl", "ddpo"): TINY_RUN,
    ("tiny-sdxl", "alignprop"): TINY_RUN,
}
# The settings that --resume may change; the others define the run.
RESUMABLE = {"epochs", "resume", "out", "overwrite", "eval_every", "eval_reward", "eval_explored", "save_every",
             "wandb", "device", "generate"}


def exploring_epochs(epochs):
    """The paper's horizon: DiffExp explores for the first 3/4 of the training epochs, ceil(3/4 x epochs) of them."""
    return math.ceil(0.75 * epochs)


def default_of(name, method, model):
    """The value a setting takes when its flag is not given (a yes/no flag is never in the tables)."""
    for table in (DEFAULTS.get((model, method), {}), DEFAULTS.get(("*", method), {})):
        if name in table:
            return table[name]
    return FIELDS[name].default


def defaults_text(name):
    """A setting's defaults as --help shows them: "10; shapes ddpo 4, alignprop 1"."""
    def per_method(model):
        ddpo, alignprop = (default_of(name, method, model) for method in METHODS)
        if ddpo == alignprop:
            return f"{ddpo}"
        return f"ddpo {ddpo}, alignprop {alignprop}"

    text = per_method("*")
    offline_models = dict.fromkeys(model for model, _ in DEFAULTS if model != "*")
    for model in offline_models:
        if any(name in DEFAULTS[model, method] for method in METHODS):
            text += f"; {model} {per_method(model)}"
    return text


def build_parser():
    """One flag per Args field, in GROUPS, each help line ending with its default(s). An unset flag parses as None,
    and parse_args fills it in from default_of."""
    parser = argparse.ArgumentParser(description="DiffExp reward fine-tuning (DDPO / AlignProp) of Stable Diffusion.")
    choices = {"method": METHODS, "dtype": ("fp32", "fp16", "bf16")}
    for name, f in FIELDS.items():
        if name in GROUPS:
            group = parser.add_argument_group(GROUPS[name])
        flag = "--" + name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, action="store_true", help=f.metadata["doc"])
        else:
            doc = f"{f.metadata['doc']} (default: {defaults_text(name)})"
            group.add_argument(flag, type=f.type, default=None, help=doc, choices=choices.get(name))
    return parser


# ---- 2. The command line.
def is_rank0():
    """Whether this process is the first (or only) one; torchrun sets RANK."""
    return int(os.environ.get("RANK", 0)) == 0


def refuse(message):
    """End the process with `message` in one line and exit status 2, as argparse does for a bad flag. Only the first
    process prints; the others exit 0 quietly, or torchrun might stop the first before it prints."""
    if is_rank0():
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    raise SystemExit(0)


def parse_args(argv=None):
    """Args from the command line, each unset setting from default_of (with --resume or --generate, from the run's
    own config.json). All that can be checked before loading anything is: a bad setting stops with one line."""
    parser = build_parser()
    parser.error = refuse
    namespace = parser.parse_args(argv)
    run_dir = namespace.resume or namespace.generate
    saved = {}
    if run_dir:
        saved = saved_settings(run_dir)
        parser.set_defaults(**saved)
        namespace = parser.parse_args(argv)
        if namespace.resume:
            for name, value in vars(namespace).items():
                if name in saved and name not in RESUMABLE and saved[name] != value:
                    refuse(f"--resume {run_dir}: setting {name} was {saved[name]!r} there and is {value!r} now.")
    method = namespace.method or FIELDS["method"].default  # the defaults' table is per (model, method)
    model = namespace.model or FIELDS["model"].default
    settings = {}
    for name, value in vars(namespace).items():
        if value is None:
            value = default_of(name, method, model)
        settings[name] = value
    if settings["explore_epochs"] is None:  # fixed at the start: a run directory older than the setting has its own
        settings["explore_epochs"] = exploring_epochs(saved.get("epochs", settings["epochs"]))
    args = Args(**settings)
    world = int(os.environ.get("WORLD_SIZE", 1))
    for message in setting_errors(args, world):
        refuse(message)
    if not args.generate:
        args.out = args.resume or args.out or os.path.join("runs", run_name(args))
        # Rank 0 alone checks the run directory: the others could see its write test's directory appear.
        message = run_directory_error(args) if is_rank0() else None
        if message:
            refuse(message)
    for message in prompt_errors(args):  # last: a shapes-world reward imports shapes.py, and with it torch
        refuse(message)
    return args


RUN_DIRECTORY = ("out", "resume", "overwrite", "generate")  # where a run is, not what it is


def saved_settings(run_dir):
    """The settings in run_dir/config.json, but for the run-directory ones."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):  # missing, or cut short
        refuse(f"{run_dir}: no config.json there, or not valid JSON; is it a run directory?")
    return {name: value for name, value in saved.items() if name not in ("resume", "overwrite", "generate")}


def setting_errors(args, world):
    """Every setting that cannot work, one message each, found without loading anything."""
    for name in ("epochs", "batch_size", "samples_per_prompt", "micro_batch_size", "train_batch_size", "steps",
                 "lora_rank", "inner_epochs"):
        if getattr(args, name) < 1:
            yield f"--{name.replace('_', '-')} must be at least 1."
    for name in ("lr", "max_grad_norm", "clip_range", "adv_clip_max", "loss_coeff"):
        if not getattr(args, name) > 0:
            yield f"--{name.replace('_', '-')} {getattr(args, name)} must be positive."
    for name in ("seed", "weight_decay", "eta", "w_high", "w_low", "alpha_min", "explore_epochs", "eval_every",
                 "save_every"):
        if getattr(args, name) < 0:
            yield f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 0."
    try:
        rewards.check_reward(args.reward, need_grad=args.method == "alignprop")
        rewards.check_reward(args.eval_reward or args.reward)
    except ValueError as e:
        yield str(e)
    if not 0 <= args.t_thres < 1000:
        yield f"--t-thres {args.t_thres} is outside [0, 1000), SD's timesteps."
    if args.alpha_min > args.alpha_max:
        yield f"--alpha-min {args.alpha_min} is above --alpha-max {args.alpha_max}."
    if args.method == "ddpo" and args.eta == 0:
        yield "DDPO needs --eta > 0: a DDIM step with eta 0 has no log-prob."
    if args.backprop_steps is not None and not 1 <= args.backprop_steps <= args.steps:
        yield f"--backprop-steps must be between 1 and --steps ({args.steps})."
    if not 0 < args.timestep_fraction <= 1:
        yield "--timestep-fraction must be in (0, 1]."
    micro_batch = args.micro_batch_size
    if args.train_batch_size % (world * micro_batch):
        yield (f"--train-batch-size {args.train_batch_size} is not a multiple of {world} process(es) x "
               f"--micro-batch-size {micro_batch}.")
    if args.batch_size % args.train_batch_size:
        yield f"--batch-size {args.batch_size} is not a multiple of --train-batch-size {args.train_batch_size}."
    if args.batch_size // world % args.samples_per_prompt:
        yield (f"--batch-size {args.batch_size} over {world} process(es) is not a multiple of --samples-per-prompt "
               f"{args.samples_per_prompt}.")
    if args.device and args.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
        yield f"--device {args.device!r} is not a torch device; use e.g. cuda, cuda:1 or cpu."
    if args.wandb and not importlib.util.find_spec("wandb"):
        yield "--wandb needs the wandb package: pip install wandb."
    if os.path.isdir(args.model) and not os.path.exists(os.path.join(args.model, "model_index.json")):
        yield f"--model {args.model}: no model_index.json in it; give a diffusers pipeline directory."
    for name in (args.prompts, args.eval_prompts):
        try:
            load_prompts(name)
        except ValueError as e:
            yield str(e)


def prompt_errors(args):
    """Every prompt that a shapes-world reward cannot read (they read captions of shapes.py's grammar)."""
    for prompt in load_prompts(args.prompts) + load_prompts(args.eval_prompts):
        for name in filter(None, (args.reward, args.eval_reward)):
            try:
                rewards.check_prompt(name, prompt)
            except ValueError as e:
                yield str(e)


def run_name(args):
    """The default run directory's name: METHOD-REWARD-MODEL-ARM[-SETTINGS]-sSEED, SETTINGS being every setting that
    differs from its default (a long list becomes a short hash of it), but for the run's tooling."""
    named = RESUMABLE | {"method", "reward", "model", "no_explore", "seed"}
    defaults = {name: default_of(name, args.method, args.model) for name in FIELDS} | dict(
        explore_epochs=exploring_epochs(args.epochs))
    changed = [f"{name}={value}" for name, value in vars(args).items() if name not in named and value != defaults[name]]
    settings = "-".join(changed)
    if len(settings) > 80:
        settings = "custom" + hashlib.sha1(settings.encode()).hexdigest()[:8]
    arm = "baseline" if args.no_explore else "diffexp"
    parts = [args.method, args.reward, os.path.basename(args.model.rstrip("/")), arm, settings.replace("/", "_"),
             f"s{args.seed}"]
    return "-".join(filter(None, parts))


def run_directory_error(args):
    """Why args.out cannot be this run's directory, or None: a new one, or --overwrite of an old run, in a writable
    place."""
    is_run = os.path.exists(os.path.join(args.out, "config.json"))
    if not args.resume and os.path.exists(args.out):
        if not args.overwrite:
            return f"{args.out} exists; pass --resume {args.out}, --overwrite or another --out."
        if not is_run:
            return (f"--overwrite: {args.out} is not a run directory (no config.json); delete it yourself if you "
                    "mean it.")
    error = try_writing(args.out)
    if error:
        return f"cannot write the run directory {args.out} ({error}); choose another --out."
    return None


def try_writing(run_dir):
    """Do what a run will do, make run_dir and write a file in it, then undo both (os.access can be fooled, e.g. as
    root under /proc). Returns None, or why it failed."""
    missing = []  # the directories to make, deepest first
    path = os.path.abspath(run_dir)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(run_dir, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)
    finally:
        for path in filter(os.path.isdir, missing):
            os.rmdir(path)
    return None


# ---- 3. The run directory.
def load_prompts(name):
    """The prompts of a text file, one per line, or else the [name] set of prompts.txt, where a `[name]` line
    opens a set and each later line is one of its prompts. Lines starting with # are comments."""
    own_file = os.path.isfile(name)
    with open(name if own_file else PROMPTS_FILE, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if own_file:
        sets = {name: lines}
    else:
        starts = [k for k, line in enumerate(lines) if line.startswith("[") and line.endswith("]")]
        if lines and (not starts or starts[0] > 0):
            raise ValueError(f"prompts.txt: the prompt {lines[0]!r} comes before any [set] line.")
        ends = starts[1:] + [len(lines)]
        sets = {lines[start][1:-1]: lines[start + 1 : end] for start, end in zip(starts, ends)}
    if not sets.get(name):
        raise ValueError(f"prompts {name!r}: no such file, nor a set of prompts.txt with prompts ({', '.join(sets)}).")
    return sets[name]


def start_run_dir(args, start):
    """Create the run directory (replacing it with --overwrite), write config.json, start W&B; on --resume, drop
    the log lines of epochs after the checkpoint (the resumed run redoes them) and a line cut short."""
    if os.path.exists(args.out) and not args.resume:  # --overwrite (parse_args checked it is a run directory)
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    with open(os.path.join(args.out, "log.jsonl"), "a+") as f:
        f.seek(0)
        kept = [line for line in f if line.endswith("}\n") and json.loads(line)["epoch"] <= start]
        f.truncate(0)
        f.writelines(kept)
    if args.wandb:  # an optional package: parse_args checked that it is installed
        importlib.import_module("wandb").init(project="diffexp", name=os.path.basename(args.out), config=vars(args))


def append_log(run_dir, row):
    """One epoch's line of run_dir/log.jsonl."""
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# SIGINT or SIGTERM sets it: the run finishes its epoch, saves and exits 0. A second signal stops it at once.
STOP_REQUESTED = threading.Event()


def on_stop_signal(signum, frame):
    if STOP_REQUESTED.is_set():
        raise KeyboardInterrupt
    STOP_REQUESTED.set()
    if is_rank0():
        print(f"\nsignal {signum}: finishing this epoch, then saving and stopping (again: now, unsaved)", flush=True)


def catch_stop_signals():
    """Route SIGINT and SIGTERM to on_stop_signal; returns the handlers they had, for restore_signals."""
    STOP_REQUESTED.clear()
    return {sig: signal.signal(sig, on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(handlers):
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
