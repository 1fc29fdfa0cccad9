"""The paper's headline on a CPU: DiffExp against its baseline in the shapes world, over several seeds.

    python replicate.py --premise                                          # set the exploration: the premise sweep
    python replicate.py --method alignprop --reward bold --seeds 12        # DiffExp vs AlignProp on the style reward
    python replicate.py --method alignprop --ablation sd15 --seeds 12      # ... at our SD 1.5 exploration instead
    python replicate.py --method ddpo --reward bold --seeds 3              # DiffExp vs DDPO, at its shapes defaults
    python replicate.py --method ddpo --seeds 8 --seeds-from F.json        # ... on 8 seeds, F's seeds not run again
    python replicate.py --method alignprop --ablation eq7 --seeds 3        # Eq. 7 alone (alpha = 1); eq8: Eq. 8 alone
    python replicate.py --method ddpo --peer trl --seeds 3                 # our DDPO beside TRL's DDPOTrainer
    python replicate.py --method alignprop --reward fidelity --seeds 5     # the harder task (its published settings)
    python replicate.py --redraw figures/headline_alignprop-bold.json      # a results file's statistics and figures
    python replicate.py --plot runs/RUN_A runs/RUN_B                       # reward curves of any diffexp.py runs

Each arm and seed is a `python diffexp.py --model shapes` run (one thread each, two at a time), with identical
settings and seeds for DiffExp and its baseline (`--no-explore`): same LoRA initialisation, prompts and noise where
the samplers allow, so that the per-seed comparison is the quantity to report. Writes results.json (every curve per
seed, the settings, the statistics, the diversity numbers), curves.png and diversity.png into --out. The statistics
drop no seed: an arm that never reaches a level is counted at the budget, and said so; ratios live on a log scale.
Stopped part-way (Ctrl-C, a crash), the same command continues: finished runs are reused, stopped ones resume from
their last checkpoint (every 10 epochs and at a stop signal's epoch) and end as the unbroken runs would.
"""

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import diffexp
import rewards
import runs
import shapes

HERE = os.path.dirname(os.path.abspath(__file__))


SD15_EXPLORATION = dict(w_low=1.0, t_thres=900, alpha_min=1.0, alpha_max=2.0)  # our SD 1.5 values


def exploration_flags(**changes):
    """Our SD 1.5 exploration with `changes` (w_low, t_thres, alpha_min, alpha_max) as diffexp.py's flags."""
    setting = SD15_EXPLORATION | changes
    return ["--w-low", f"{setting['w_low']:g}", "--t-thres", str(setting["t_thres"]), "--alpha-min",
            f"{setting['alpha_min']:g}", "--alpha-max", f"{setting['alpha_max']:g}"]


# Per method and reward, the runs' settings (ours), given to both arms on top of the shapes model's defaults. Other
# rewards (fidelity, colour) take the method's: the settings of their published runs, on the whole grammar's prompts,
# with the exploration they ran with (our SD 1.5 values, the shapes model's defaults before the premise sweep).
GRAMMAR = ["--prompts", "shapes", "--eval-prompts", "unseen_shapes", "--epochs", "16", "--eval-every", "2",
           *exploration_flags()]
SETTINGS = {
    ("alignprop", "bold"): ["--epochs", "12", "--batch-size", "32", "--eval-every", "1"],
    ("ddpo", "bold"): [],  # the shapes model's DDPO defaults: its quick start's runs
    "alignprop": [*GRAMMAR, "--batch-size", "32", "--steps", "20", "--train-batch-size", "16"],
    "ddpo": [*GRAMMAR, "--batch-size", "64", "--samples-per-prompt", "16", "--steps", "10", "--train-batch-size", "32",
             "--lr", "0.0003"],
}
PEERS = {"trl": "TRL's DDPOTrainer"}  # replicate.py --peer trl: a peer implementation in place of the DiffExp arm
# Other exploration settings for DiffExp's arm alone, all from our SD 1.5 values: those values (sd15), Eq. 7 only
# (alpha = 1), Eq. 8 only (no t > 999), Eq. 7 on more steps (t > 800: 4 of 20, t > 600: 8 of 20; t > 900 touches 2)
ABLATIONS = {"sd15": exploration_flags(), "eq7": exploration_flags(alpha_max=1), "eq8": exploration_flags(t_thres=999),
             "t800": exploration_flags(t_thres=800), "t600": exploration_flags(t_thres=600)}
# The paper's Fig. 9(b), the dose: the premise rule's exploration (the shapes model's default, which the bold
# replications use) with fewer steps at w_low, t_thres 900, 800 and 700 (the rule's 600 runs without --ablation)
DOSE = (900, 800, 700)
ABLATIONS |= {f"rule-t{t_thres}": ["--t-thres", str(t_thres)] for t_thres in DOSE}
# Added to both arms' runs of a DiffExp replication, not to its settings: an evaluation that changes no other number
# (the unseen prompts also under DiffExp's sampler), so that a published baseline of the same settings stays one
EVALUATION = ["--eval-explored"]
LEVELS = (0.5, 0.75, 0.9)  # fractions of the baseline's final gain
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}  # Student's t, 97.5% quantile by degrees of freedom
DIVERSITY_PROMPTS = 6  # the first prompts of --eval-prompts (the plain "a COLOUR SHAPE" ones); 16 samples each


def run_in_parallel(commands, parallel):
    """Run {name: (script, argv, run_dir)} as `python SCRIPT ARGV --out RUN_DIR` subprocesses with one thread each,
    `parallel` at a time, printing each run's epochs as its log grows. A run that finished here before with the same
    script and arguments and settings (finished()) is not run again, and one that stopped before its end (stopped())
    continues from its checkpoint: a replication continues after a crash, and replications whose baseline arms are
    the same runs (an ablation's and its replication's) share them."""
    pending, running, shown = [], {}, {}  # shown: {name: the last epoch printed}
    for name, (script, argv, run_dir) in commands.items():
        if finished(script, argv, run_dir):
            print(f"[{name}] ran before with these arguments: {run_dir}", flush=True)
        else:
            pending.append(name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name = pending.pop(0)
                script, argv, run_dir = commands[name]
                if stopped(script, argv, run_dir):  # resumed, it draws what the unbroken run would have drawn
                    print(f"[{name}] stopped before its end: continues from its checkpoint in {run_dir}", flush=True)
                    shown[name] = max((row["epoch"] for row in read_log(run_dir)), default=-1)
                    where, mode = ["--resume", run_dir], "a"
                else:
                    if os.path.exists(run_dir + ".done"):  # a previous run with other arguments: no longer done
                        os.remove(run_dir + ".done")
                    shutil.rmtree(run_dir, ignore_errors=True)  # another run's: its log must not be reported
                    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
                    shown[name] = -1
                    where, mode = ["--out", run_dir], "w"
                with open(run_dir + ".out", mode) as out:
                    command = [sys.executable, os.path.join(HERE, script), *argv, *where]
                    running[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env), run_dir
            time.sleep(2)
            for name, (proc, run_dir) in list(running.items()):
                ended = proc.poll() is not None  # before reading the log, so that its last rows are printed
                rows = read_log(run_dir)
                for row in rows:
                    if row["epoch"] > shown[name]:
                        scores = ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                           if k == "reward_mean" or "unseen" in k)
                        print(f"[{name}] epoch {row['epoch']}: {scores}", flush=True)
                        shown[name] = row["epoch"]
                if ended:
                    script, argv = commands[name][:2]
                    if proc.returncode:
                        raise RuntimeError(f"run {name} failed; its output is in {run_dir}.out")
                    last = max((row["epoch"] for row in rows), default=-1)
                    if script == "diffexp.py" and last < shapes_args(argv).epochs:  # a stop signal: saved, exit 0
                        raise RuntimeError(f"run {name} stopped after epoch {last} (a stop signal: it saved); the "
                                           "same command continues it")
                    with open(run_dir + ".done", "w") as f:
                        json.dump([script, argv], f)
                    del running[name]
    except KeyboardInterrupt:  # Ctrl-C reached the runs too (one process group): each ends its epoch and saves
        print("stopping: the runs end their epochs and save (Ctrl-C again: at once, unsaved)", flush=True)
        for proc, _ in running.values():
            proc.wait()
        raise
    finally:  # a run failed: stop the others and wait for them (they save), so that none outlives this process
        alive = [proc for proc, _ in running.values() if proc.poll() is None]
        if alive:
            print(f"stopping {len(alive)} run(s): each ends its epoch and saves", flush=True)
        for proc in alive:
            proc.terminate()
        for proc in alive:
            proc.wait()


def finished(script, argv, run_dir):
    """Whether run_dir holds a finished run of `python SCRIPT ARGV` (its RUN_DIR.done, written when it ended, says
    so) whose settings are what ARGV gives today (same_settings())."""
    try:
        with open(run_dir + ".done") as f:
            if json.load(f) != [script, argv]:
                return False
    except (OSError, ValueError):
        return False
    return script != "diffexp.py" or same_settings(argv, run_dir)  # a peer's run writes no config.json


def stopped(script, argv, run_dir):
    """Whether run_dir holds a run of `python diffexp.py ARGV` that stopped before its end (a checkpoint, no
    RUN_DIR.done) with the settings ARGV gives today: `--resume RUN_DIR` continues it. A peer's run starts again."""
    saved = any(os.path.exists(os.path.join(run_dir, d, "state.pt")) for d in ("checkpoint", "checkpoint.tmp"))
    return script == "diffexp.py" and not os.path.exists(run_dir + ".done") and saved and same_settings(argv, run_dir)


def same_settings(argv, run_dir):
    """Whether run_dir's config.json holds the settings that `python diffexp.py ARGV` gives today: a changed default
    makes a run stale."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    try:
        with tempfile.TemporaryDirectory() as unused:  # parse_args checks that a run directory could be written
            now = vars(runs.parse_args([*argv, "--out", f"{unused}/run"]))
    except SystemExit:  # arguments that the code refuses today: the run cannot be what they give
        return False
    return all(saved.get(name) == value for name, value in now.items() if name not in runs.RUN_DIRECTORY)


def read_log(run_dir):
    """A run's log.jsonl rows so far (a line still being written is left for later)."""
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("}\n")]
    except OSError:
        return []


def logged_rows(results, arm, seed):
    """One seed's log rows of an arm, rebuilt from a results file's curves: what summarise() reads of them. The curves
    under DiffExp's sampler hold the explored seeds only, in their order."""
    rows, explored = {}, explored_seeds(results)
    for key, curve in results["curves"].items():
        name, metric = key.split("/")
        held = explored if metric in explored_metrics(results["reward"]) else list(range(results["seeds"]))
        if name == arm and seed in held:
            for queries, value in zip(curve["queries"], curve["per_seed"][held.index(seed)]):
                rows.setdefault(queries, dict(reward_queries=queries))[metric] = value
    return [rows[queries] for queries in sorted(rows)]


def first_reach(queries, values, level):
    """The reward queries after which a curve first reaches `level`, or None (never). Its first point does not count:
    it is the starting model's (the evaluation at 0 queries; the first batch of training samples, drawn before DDPO's
    first update, and by AlignProp half before its first at the published settings), so a level met there says
    nothing of learning, only of the draw."""
    return next((q for q, v in zip(queries[1:], values[1:]) if v >= level), None)


def paired(differences):
    """Mean of per-seed differences with a 95% Student-t interval over seeds (from 3 seeds on; below that no interval,
    the values are in per_seed): dict(mean, low, high, n, per_seed)."""
    d = np.array(differences, dtype=float)
    if len(d) < 3:
        return dict(mean=float(d.mean()), low=None, high=None, n=len(d), per_seed=d.tolist())
    half = T_975[len(d) - 1] * d.std(ddof=1) / np.sqrt(len(d))
    return dict(mean=float(d.mean()), low=float(d.mean() - half), high=float(d.mean() + half), n=len(d),
                per_seed=d.tolist())


def log_ratio(ratios):
    """Per-seed ratios (positive) summarised on the log scale: the geometric mean with the 95% Student-t interval of
    the mean log ratio, taken back (from 3 seeds on, as paired())."""
    summary = paired(np.log(ratios))
    for key in ("mean", "low", "high"):
        summary[key] = None if summary[key] is None else float(np.exp(summary[key]))
    return summary | dict(per_seed=np.asarray(ratios, dtype=float).tolist())


def censored_ratio(compared, baseline, budget):
    """Per seed, the queries to a level of the compared arm over the baseline's, a seed whose arm never reaches the
    level counted at the budget (censored: the true ratio is larger where the compared arm never got there, smaller
    where the baseline never did), on the log scale (log_ratio), with the number of censored seeds per arm."""
    queries = np.array([[budget if q is None else q for q in arm] for arm in (compared, baseline)], dtype=float)
    censored = dict(compared=sum(q is None for q in compared), baseline=sum(q is None for q in baseline))
    return log_ratio(queries[0] / queries[1]) | dict(censored=censored)


def gain_area(queries, values, start):
    """The area under a curve's gain over `start` (the baseline's first value of the same seed, so that both arms are
    measured from one level), by the trapezoid rule, divided by the budget: the mean gain over the run, in reward
    units."""
    gain = np.asarray(values, dtype=float) - start
    return float(np.sum((gain[1:] + gain[:-1]) / 2 * np.diff(queries)) / queries[-1])


def area_ratio(results, metric):
    """The area under the gain curve (gain_area) per seed, compared arm over baseline, on the log scale, or, where an
    area is not positive (no gain to compare), the per-seed areas alone: dict(..., areas={arm: [per seed]})."""
    starts = [values[0] for values in results["curves"][f"baseline/{metric}"]["per_seed"]]
    areas = {}
    for name in results["arms"]:
        curve = results["curves"][f"{name}/{metric}"]
        areas[name] = [gain_area(curve["queries"], values, start) for values, start in zip(curve["per_seed"], starts)]
    compared, baseline = np.array(areas[results["arms"][0]]), np.array(areas["baseline"])
    if (compared <= 0).any() or (baseline <= 0).any():
        return dict(mean=None, low=None, high=None, n=len(baseline), per_seed=None, areas=areas)
    return log_ratio(compared / baseline) | dict(areas=areas)


def explored_metrics(reward):
    """The held-out prompts sampled with DiffExp's sampler (diffexp.py --eval-explored): the reward and the judge."""
    return [f"eval_unseen_explored_{reward}", "eval_unseen_explored_shapes_judge"]


def summarise(logs, method, reward, settings, explored_seeds=()):
    """results.json's content from the runs' logs {arm: [rows of seed 0, rows of seed 1, ...]}, the compared arm first
    ("diffexp", or a peer), then "baseline": the curves (training reward, and the evaluation on unseen prompts of the
    reward and of the judge; on the `explored_seeds`, also their evaluation with DiffExp's sampler, whose curves hold
    those seeds only) per seed with their mean and std, and what derive() computes from them."""
    seeds = len(logs["baseline"])
    judge = ["eval_unseen_shapes_judge"] if reward != "shapes_judge" else []
    plain = ["reward_mean", f"eval_unseen_{reward}", *judge]
    metrics = [*plain, *(explored_metrics(reward) if explored_seeds else [])]
    results = dict(method=method, reward=reward, seeds=seeds, settings=settings, arms=list(logs),
                   explored_seeds=list(explored_seeds), curves={})
    for arm, arm_logs in logs.items():
        for metric in metrics:
            read = arm_logs if metric in plain else [arm_logs[seed] for seed in explored_seeds]
            queries = [r["reward_queries"] for r in read[0] if metric in r]
            for log in read[1:]:  # published seeds and new runs alike
                if [r["reward_queries"] for r in log if metric in r] != queries:
                    raise ValueError(f"{arm}'s {metric} was read at other reward queries in one seed than in "
                                     "another: their runs' settings differ.")
            values = np.array([[r[metric] for r in log if metric in r] for log in read])  # [seeds, points]
            results["curves"][f"{arm}/{metric}"] = dict(queries=queries, per_seed=values.tolist(),
                                                        mean=values.mean(0).tolist(), std=values.std(0).tolist())
    return derive(results)


def derive(results):
    """The statistics of a results file, from its curves alone, for both readings of the reward, the training samples
    ("reward_mean") and the unseen prompts sampled plainly ("eval_unseen_REWARD"): for 50/75/90% of the baseline's gain
    (its mean curve, start to end), the queries after which each arm's seeds first reach it (None: never) and the
    per-seed ratio compared / baseline, censored at the budget (censored_ratio; counted whatever the gain: markdown()
    says "no gain" where it is within the seeds' spread), and the area under the gain curve, compared / baseline
    (area_ratio). Then the final values (mean and std over seeds), and their per-seed paired differences, compared arm
    minus baseline, with 95% intervals; with the unseen prompts also sampled with DiffExp's sampler, the paired
    differences between the samplers (sampler_differences)."""
    arm, reward = results["arms"][0], results["reward"]
    readings = ("reward_mean", f"eval_unseen_{reward}")
    metrics = [key.split("/")[1] for key in results["curves"] if key.startswith("baseline/")]
    results |= dict(table={}, area={}, final={}, paired={}, samplers=None)
    for key, curve in results["curves"].items():
        last = np.array(curve["per_seed"])[:, -1]
        results["final"][key] = dict(mean=float(last.mean()), std=float(last.std()))
    for metric in readings:
        base, rows = results["curves"][f"baseline/{metric}"], []
        for fraction in LEVELS:
            level = base["mean"][0] + fraction * (base["mean"][-1] - base["mean"][0])
            queries = {}
            for name in results["arms"]:
                curve = results["curves"][f"{name}/{metric}"]
                queries[name] = [first_reach(curve["queries"], values, level) for values in curve["per_seed"]]
            ratio = censored_ratio(queries[arm], queries["baseline"], base["queries"][-1])
            rows.append(dict(fraction=fraction, level=level, queries=queries, ratio=ratio))
        results["table"][metric] = rows
        results["area"][metric] = area_ratio(results, metric)
    for metric in metrics[1:]:
        results["paired"][f"final {metric}"] = paired(final_difference(results, (arm, metric), ("baseline", metric)))
    if f"baseline/{explored_metrics(reward)[0]}" in results["curves"]:
        results["samplers"] = sampler_differences(results)
    return results


def final_difference(results, first, second):
    """Per seed, the final value of one curve minus another's: first, second = (arm, metric)."""
    a, b = (np.array(results["curves"][f"{name}/{metric}"]["per_seed"])[:, -1] for name, metric in (first, second))
    return (a - b).tolist()


SAMPLER_DIFFERENCES = {  # name: (the difference, in words)
    "diffexp": "DiffExp's LoRA: exploring sampler - plain",
    "baseline": "the baseline's LoRA: exploring sampler - plain",
    "interaction": "DiffExp's LoRA's gain from the exploring sampler - the baseline's",
    "user": "DiffExp's LoRA with the exploring sampler - the baseline's LoRA plainly",
}


def sampler_differences(results):
    """The held-out prompts' final values under both samplers, paired per seed, for the reward and the judge: how much
    each arm's LoRA gains from being sampled with DiffExp's sampler, how much more DiffExp's gains than the
    baseline's (the LoRA learned the sampler it trained with), and what a user would get sampling DiffExp's LoRA
    with DiffExp's sampler rather than the baseline's LoRA plainly, on the seeds read both ways (explored_seeds).
    {metric: {SAMPLER_DIFFERENCES name: paired}}."""
    arm, out = results["arms"][0], {}
    seeds = explored_seeds(results)

    def final(name, metric):  # [seeds read both ways]
        values = np.array(results["curves"][f"{name}/{metric}"]["per_seed"])[:, -1]
        return values if metric in explored_metrics(results["reward"]) else values[seeds]

    for plain, explored in zip([f"eval_unseen_{results['reward']}", "eval_unseen_shapes_judge"],
                               explored_metrics(results["reward"])):
        gains = {name: final(name, explored) - final(name, plain) for name in (arm, "baseline")}
        out[plain] = dict(diffexp=paired(gains[arm].tolist()), baseline=paired(gains["baseline"].tolist()),
                          interaction=paired((gains[arm] - gains["baseline"]).tolist()),
                          user=paired((final(arm, explored) - final("baseline", plain)).tolist()))
    return out


def explored_seeds(results):
    """The seeds whose unseen prompts were also read under DiffExp's sampler (files before this key: every seed)."""
    return results.get("explored_seeds", list(range(results["seeds"])))


def explored_seeds_text(results):
    """"" when every seed was read under both samplers, else which were, in words."""
    seeds = explored_seeds(results)
    if len(seeds) == results["seeds"]:
        return ""
    return f" ({seed_list(seeds)} of 0-{results['seeds'] - 1}: the others' runs predate this reading)"


def seed_list(seeds):
    """[3] -> "seed 3", [3, 4] -> "seeds 3, 4"."""
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def exploration_of(argv):
    """DiffExp's exploration in `python diffexp.py --model shapes ARGV`: {w_low, t_thres, alpha_min, alpha_max}."""
    args = shapes_args(argv)
    return {k: getattr(args, k) for k in ("w_low", "t_thres", "alpha_min", "alpha_max")}


def shapes_args(argv):
    """The settings of `python diffexp.py --model shapes ARGV`."""
    with tempfile.TemporaryDirectory() as unused:  # parse_args checks that a run directory could be written
        return runs.parse_args(["--model", "shapes", *argv, "--out", f"{unused}/run"])


@torch.no_grad()
def diversity(settings, explore_settings):
    """16 samples of each of the first unseen prompts from the starting model (no LoRA training), plainly and with
    DiffExp's exploration, from the same noise: the distinct judge readings per prompt and the mean pairwise L2
    distance between a prompt's images. Returns (numbers, images {False: plain, True: DiffExp} [P, 16, 3, 32, 32])."""
    args = shapes_args([*settings, *explore_settings])
    prompts = runs.load_prompts(args.eval_prompts)[:DIVERSITY_PROMPTS]
    torch.manual_seed(args.seed)
    pipe = diffexp.load_pipeline("shapes", args.lora_rank, "cpu", torch.float32)
    pipe.scheduler.set_timesteps(args.steps)
    images, numbers = {}, {}
    for explore, name in ((False, "plain"), (True, "diffexp")):
        batches = [diffexp.sample_batch(pipe, [p] * 16, torch.Generator().manual_seed(k), explore=explore,
                                        **diffexp.sampling_settings(args))["images"] for k, p in enumerate(prompts)]
        images[explore] = torch.stack(batches)  # [P, 16, 3, 32, 32]
        readings = [[tuple(r.values()) for r in shapes.judge(per_prompt)] for per_prompt in images[explore]]
        distances = [torch.pdist(per_prompt.flatten(1)).mean().item() for per_prompt in images[explore]]
        numbers[name] = dict(distinct_readings=float(np.mean([len(set(r)) for r in readings])),
                             pairwise_distance=float(np.mean(distances)))
    return numbers, images, prompts


# ---- The premise sweep: DiffExp's open settings measured at the starting model, before any training run.
# The paper's premise: more diverse online samples without sacrificing their quality. Its values of w_low, t_thres and
# the alpha range are lost (the text kept no formulas or inline numbers), so each is measured here, for each method's
# own sampler, on the same noise as plain sampling.
PREMISE_EQ7 = [(w_low, t_thres) for w_low in (0.0, 1.0, 3.0, 5.0) for t_thres in (900, 800, 600, 400)]  # alpha 1
PREMISE_EQ8 = (1.1, 1.25, 1.5, 2.0)  # alpha_max, with alpha_min 1 and no step at w_low (t_thres 999)
PREMISE_COMBINED = 2  # the best settings of Eq. 7 alone and of Eq. 8 alone, combined pairwise
PREMISE_BOUND = 0.03  # the rule (premise_choice): the judge's and bold's means may fall by at most this
PREMISE_SAMPLES = 16  # per prompt, from the same noise in every setting
PREMISE_METRICS = {"distance": "mean pairwise distance", "distinct": "distinct judge readings",
                   "judge": "judge", "bold": "bold", "share": "share of bold >= 0.9"}


@torch.no_grad()
def premise_measure(pipe, prompts, sampling, setting, scorers):
    """PREMISE_SAMPLES samples of each prompt, plainly (setting None) or with the exploration `setting` (w_low,
    t_thres, alpha_min, alpha_max), from the noise seeded by the prompt's index. Returns {metric: [one per prompt]}:
    the mean pairwise L2 distance between the prompt's images, its distinct judge readings, and the judge's, bold's
    and bold >= 0.9's means."""
    per_prompt = {metric: [] for metric in PREMISE_METRICS}
    for k, prompt in enumerate(prompts):
        batch = [prompt] * PREMISE_SAMPLES
        generator = torch.Generator().manual_seed(k)
        images = diffexp.sample_batch(pipe, batch, generator, explore=setting is not None,
                                      **sampling | (setting or {}))["images"]  # [16, 3, 32, 32]
        bold = scorers["bold"](images, batch)  # [16]
        per_prompt["distance"].append(torch.pdist(images.flatten(1)).mean().item())
        per_prompt["distinct"].append(len({tuple(r.values()) for r in shapes.judge(images)}))
        per_prompt["judge"].append(scorers["shapes_judge"](images, batch).mean().item())
        per_prompt["bold"].append(bold.mean().item())
        per_prompt["share"].append((bold >= 0.9).float().mean().item())
    return per_prompt


def bootstrap(differences, resamples=2000, seed=0):
    """Mean of per-prompt differences with a 95% percentile bootstrap interval over prompts: dict(mean, low, high)."""
    d = np.asarray(differences, dtype=float)
    means = d[np.random.default_rng(seed).integers(len(d), size=(resamples, len(d)))].mean(axis=1)
    return dict(mean=float(d.mean()), low=float(np.percentile(means, 2.5)), high=float(np.percentile(means, 97.5)))


def keeps_premise(setting):
    """The rule's quality bound: neither the judge's mean nor bold's falls by more than PREMISE_BOUND from plain's."""
    return quality_loss(setting) <= PREMISE_BOUND


def quality_loss(setting):
    """The larger of the two drops from plain sampling, judge and bold (negative: both rose)."""
    return -min(setting["difference"]["judge"]["mean"], setting["difference"]["bold"]["mean"])


def premise_choice(settings):
    """The rule, written down before any training run (README, "The exploration, set by the paper's premise"):
    among the settings that keep the premise (keeps_premise) and are more diverse than plain sampling (the 95%
    interval of their pairwise distance's difference lies above zero), the one with the largest mean pairwise
    distance. If there is none, that is the finding, and the choice is the setting closest to the rule: the more
    diverse one with the smallest quality loss. Returns (setting, "keeps the premise" or "closest to the premise")."""
    diverse = [s for s in settings if s["difference"]["distance"]["low"] > 0]
    if not diverse:
        raise ValueError("no setting is more diverse than plain sampling: the rule has nothing to choose.")
    kept = [s for s in diverse if keeps_premise(s)]
    if kept:
        return max(kept, key=lambda s: s["difference"]["distance"]["mean"]), "keeps the premise"
    return min(diverse, key=quality_loss), "closest to the premise"


def best_of_kind(settings, kind, n):
    """The n settings of one kind that the rule ranks first: those that keep the premise by their pairwise distance,
    then the others by their quality loss."""
    of_kind = [s for s in settings if s["kind"] == kind]
    kept = sorted(filter(keeps_premise, of_kind), key=lambda s: -s["difference"]["distance"]["mean"])
    others = sorted(itertools.filterfalse(keeps_premise, of_kind), key=quality_loss)
    return (kept + others)[:n]


def premise_sweep(method, out):
    """The sweep for one method's sampler at the shapes model's settings, on its training prompts (which exploration
    samples): plain sampling, Eq. 7 alone (PREMISE_EQ7), Eq. 8 alone (PREMISE_EQ8), the best of each combined, and our
    SD 1.5 defaults. Each setting's differences from plain, per prompt, with bootstrap intervals; writes
    out/premise.json and returns it."""
    args = shapes_args(["--method", method])
    prompts = runs.load_prompts(args.prompts)
    torch.manual_seed(args.seed)
    pipe = diffexp.load_pipeline("shapes", args.lora_rank, "cpu", torch.float32)  # the starting model: LoRA B = 0
    pipe.scheduler.set_timesteps(args.steps)
    scorers = {name: rewards.load_reward(name, "cpu", torch.float32) for name in ("bold", "shapes_judge")}
    sampling = diffexp.sampling_settings(args)
    plain = premise_measure(pipe, prompts, sampling, None, scorers)
    settings = []

    def measure(kind, **setting):
        if any(s["setting"] == setting for s in settings):
            return
        per_prompt = premise_measure(pipe, prompts, sampling, setting, scorers)
        settings.append(dict(kind=kind, setting=setting,
                             mean={m: float(np.mean(v)) for m, v in per_prompt.items()},
                             difference={m: bootstrap(np.subtract(per_prompt[m], plain[m])) for m in per_prompt},
                             per_prompt=per_prompt))
        changes = ", ".join(f"{m} {d['mean']:+.3f}" for m, d in settings[-1]["difference"].items())
        print(f"[premise {method}] {kind} {setting}: {changes}", flush=True)

    # first: a combination below may repeat it
    measure("SD 1.5 default", **SD15_EXPLORATION)
    for w_low, t_thres in PREMISE_EQ7:
        measure("Eq. 7", w_low=w_low, t_thres=t_thres, alpha_min=1.0, alpha_max=1.0)
    for alpha_max in PREMISE_EQ8:
        measure("Eq. 8", w_low=1.0, t_thres=999, alpha_min=1.0, alpha_max=alpha_max)
    for eq7, eq8 in itertools.product(best_of_kind(settings, "Eq. 7", PREMISE_COMBINED),
                                      best_of_kind(settings, "Eq. 8", PREMISE_COMBINED)):
        measure("both", **eq7["setting"] | dict(alpha_max=eq8["setting"]["alpha_max"]))
    choice, verdict = premise_choice(settings)
    sweep = dict(method=method, sampler=dict(eta=args.eta, w_high=args.w_high, steps=args.steps),
                 prompts=args.prompts, samples=PREMISE_SAMPLES, bound=PREMISE_BOUND,
                 plain=dict(mean={m: float(np.mean(v)) for m, v in plain.items()}, per_prompt=plain),
                 settings=settings, choice=dict(setting=choice["setting"], verdict=verdict))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "premise.json"), "w") as f:
        json.dump(sweep, f, indent=1)
    return sweep


def premise(out, parallel=2):
    """Both samplers' sweeps (premise_sweep), one process each, one thread each; writes out/premise.json (the two
    sweeps) and out/premise.png, and returns the results."""
    commands = {method: ("replicate.py", ["--premise-of", method], os.path.join(out, method))
                for method in runs.METHODS}
    run_in_parallel(commands, parallel)
    samplers = {}
    for method, (_, _, sweep_dir) in commands.items():
        with open(os.path.join(sweep_dir, "premise.json")) as f:
            samplers[method] = json.load(f)
    results = dict(kind="premise", samplers=samplers)
    with open(os.path.join(out, "premise.json"), "w") as f:
        json.dump(results, f, indent=1)
    draw_premise(results, os.path.join(out, "premise.png"))
    return results


def draw_premise(results, path):
    """Diversity (mean pairwise distance) against quality (bold's mean, the judge's mean), a point per setting, per
    sampler; plain sampling is the star, the rule's quality bound the dashed line, its choice circled."""
    plt = pyplot()
    colours = {"Eq. 7": "tab:blue", "Eq. 8": "tab:orange", "both": "tab:green", "SD 1.5 default": "tab:red"}
    samplers = results["samplers"]
    fig, axes = plt.subplots(len(samplers), 2, figsize=(9.5, 3.8 * len(samplers)), squeeze=False)
    for row, (method, sweep) in zip(axes, samplers.items()):
        chosen = next(s for s in sweep["settings"] if s["setting"] == sweep["choice"]["setting"])
        for ax, quality in zip(row, ("bold", "judge")):
            for kind, colour in colours.items():
                points = [s["mean"] for s in sweep["settings"] if s["kind"] == kind]
                ax.scatter([p[quality] for p in points], [p["distance"] for p in points], s=18, color=colour,
                           label=kind)
            plain = sweep["plain"]["mean"]
            ax.scatter(plain[quality], plain["distance"], marker="*", s=160, color="black", label="plain")
            ax.scatter(chosen["mean"][quality], chosen["mean"]["distance"], s=200, facecolors="none",
                       edgecolors="black", label="the rule's choice")
            ax.axvline(plain[quality] - sweep["bound"], color="gray", linestyle="--", linewidth=1)
            sampler = sweep["sampler"]
            ax.set(xlabel=f"{quality} mean (quality)", ylabel="mean pairwise distance (diversity)",
                   title=f"{method}'s sampler (eta {sampler['eta']:g}, CFG {sampler['w_high']:g}, "
                         f"{sampler['steps']} steps)")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close("all")


def premise_markdown(results):
    """The sweeps' tables (figures/README.md shows them): plain sampling's values, then each setting's differences from
    them with 95% bootstrap intervals over prompts, whether it keeps the premise, and the rule's choice."""
    def cell(d):
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    lines = []
    for method, sweep in results["samplers"].items():
        sampler, plain = sweep["sampler"], sweep["plain"]["mean"]
        n = len(sweep["plain"]["per_prompt"]["distance"])
        lines += [f"**{method}'s sampler** (eta {sampler['eta']:g}, CFG {sampler['w_high']:g}, {sampler['steps']} "
                  f"steps): {n} `[{sweep['prompts']}]` prompts x {sweep['samples']} samples from the same noise;",
                  "plain sampling's values, then each setting's difference from them.",
                  "", "| setting | w_low | t_thres | alpha | " + " | ".join(PREMISE_METRICS.values())
                  + " | keeps the premise |", "|---" * (5 + len(PREMISE_METRICS)) + "|",
                  "| plain | | | | " + " | ".join(f"{v:.3f}" for v in plain.values()) + " | |"]
        for s in sweep["settings"]:
            kind = f"**{s['kind']}, the rule's choice**" if s["setting"] == sweep["choice"]["setting"] else s["kind"]
            setting = s["setting"]
            lines.append(f"| {kind} | {setting['w_low']:g} | {setting['t_thres']} | U({setting['alpha_min']:g}, "
                         f"{setting['alpha_max']:g}) | " + " | ".join(cell(d) for d in s["difference"].values())
                         + f" | {'yes' if keeps_premise(s) else 'no'} |")
        lines += ["", f"The rule's choice for {method} ({sweep['choice']['verdict']}): "
                  f"`{' '.join(exploration_flags(**sweep['choice']['setting']))}`.", ""]
    return "\n".join(lines).rstrip()


def replicate(method, seeds, out, reward="bold", ablation=None, parallel=2, extra=(), peer=None, runs_dir=None,
              baseline_from=None, seeds_from=None):
    """Run both arms over `seeds` seeds, summarise, measure diversity, draw; writes out/results.json. The runs live
    in `runs_dir` (default out/runs) as ARM-sSEED, ARM "baseline", "diffexp", the ablation's or the peer's name:
    replications given one `runs_dir` share the runs whose arguments are equal (run_in_parallel), such as a baseline
    arm. Published results files take the place of runs, seed by seed, searched in this order: `seeds_from`, an
    earlier results file of this replication (the same settings, arms, DiffExp flags and exploration), for both arms;
    `baseline_from`, one of the same settings, for the baseline arm; the seeds beyond theirs run. With a `peer`, its
    implementation of the baseline (`run_peer`) takes the DiffExp arm's place, and there is no diversity to show.
    Without one, both arms' runs also read the unseen prompts under DiffExp's sampler (EVALUATION), kept in
    results.json for the seeds whose runs of both arms read it at one setting (explored_seeds)."""
    if not 2 <= seeds <= len(T_975) + 1 or parallel < 1:
        raise ValueError(f"replicate needs 2 to {len(T_975) + 1} seeds (for the intervals) and 1 run at a time.")
    if peer and (method != "ddpo" or ablation):
        raise ValueError(f"--peer {peer} compares DDPO without exploration: give --method ddpo and no --ablation.")
    if (ablation or "").startswith("rule-") and (method, reward) not in SETTINGS:
        raise ValueError(f"--ablation {ablation} varies the shapes model's default exploration, which only the bold "
                         "replications use: give --reward bold.")
    settings = ["--method", method, "--reward", reward, *SETTINGS.get((method, reward), SETTINGS[method]), *extra]
    compared = peer or "diffexp"  # the compared arm's name in results.json
    # {arm: (script, its flags, its runs' name)}
    arms = {"diffexp": ("diffexp.py", ABLATIONS.get(ablation, []), ablation or "diffexp"),
            "baseline": ("diffexp.py", ["--no-explore"], "baseline")}
    if peer:
        cpu = ["--no-explore", "--device", "cpu"]  # TRL runs here on the CPU, in fp32: so does our arm beside it
        arms = {peer: ("replicate.py", ["--run-peer", peer, *cpu], peer), "baseline": ("diffexp.py", cpu, "baseline")}
    evaluation = [] if peer else EVALUATION  # a peer's arm evaluates as a baseline does
    sources = []  # [(a published results file, the arms taken from it)], searched in order
    if seeds_from:
        with open(seeds_from) as f:
            earlier = json.load(f)
        # the exploration the DiffExp arm's flags give today: a changed default makes the earlier runs another arm's
        exploration = None if peer else exploration_of([*settings, *arms[compared][1]])
        if ([earlier[k] for k in ("settings", "arms", "diffexp_flags")] != [settings, list(arms), arms[compared][1]]
                or earlier["exploration"] != exploration):
            raise ValueError(f"--seeds-from {seeds_from}: its arms {earlier['arms']} ran with {earlier['settings']}, "
                             f"the first also with {earlier['diffexp_flags']} (exploration {earlier['exploration']}); "
                             f"this replication runs {list(arms)} with {settings}, the first also with "
                             f"{arms[compared][1]} (exploration {exploration}).")
        sources.append((earlier, list(arms)))
    if baseline_from:
        with open(baseline_from) as f:
            earlier = json.load(f)
        if earlier["settings"] != settings:
            raise ValueError(f"--baseline-from {baseline_from}: its baseline ran with {earlier['settings']}; this "
                             f"replication needs {settings}.")
        sources.append((earlier, ["baseline"]))

    published = {}  # {(arm, seed): its log rows, from the first published file that holds them}
    for earlier, taken in sources:
        for arm in taken:
            for seed in range(min(earlier["seeds"], seeds)):
                published.setdefault((arm, seed), logged_rows(earlier, arm, seed))
    runs_dir = runs_dir or os.path.join(out, "runs")
    commands = {f"{name} s{seed}": (script, ["--model", "shapes", "--seed", str(seed), *settings, *evaluation, *flags],
                                    os.path.join(runs_dir, f"{name}-s{seed}"))
                for seed in range(seeds) for arm, (script, flags, name) in arms.items()
                if (arm, seed) not in published}
    run_in_parallel(commands, parallel)
    logs = {}
    for arm, (_, _, name) in arms.items():
        logs[arm] = [published[arm, seed] if (arm, seed) in published
                     else read_log(os.path.join(runs_dir, f"{name}-s{seed}")) for seed in range(seeds)]
    flags = arms[compared][1]
    # Both arms' unseen prompts under DiffExp's sampler, where both sampled it at one setting (an ablation's baseline
    # arm is the replication's: its exploring sampler is the shapes model's default, not the ablation's), on the seeds
    # whose runs of both arms read them (a published seed's may predate the reading)
    exploration = None if peer else {name: exploration_of([*settings, *arms[name][1]]) for name in arms}
    explored = []
    if exploration and len({str(e) for e in exploration.values()}) == 1:
        explored = [seed for seed in range(seeds)
                    if all(explored_metrics(reward)[0] in logs[arm][seed][-1] for arm in logs)]
    results = summarise(logs, method, reward, settings, explored) | dict(ablation=ablation, diffexp_flags=flags,
                                                                         evaluation=evaluation,
                                                                         baseline_from=baseline_from,
                                                                         seeds_from=seeds_from)
    results |= dict(exploration=None, diversity=None)
    images, prompts = None, None
    if not peer:
        results["exploration"] = exploration["diffexp"]
        results["diversity"], images, prompts = diversity(settings, flags)
    os.makedirs(out, exist_ok=True)  # its runs may live elsewhere
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    draw(results, images, prompts, os.path.join(out, ""))
    return results


def run_peer(peer, argv):
    """A peer implementation trained at the settings of `python diffexp.py ARGV` (DDPO, --no-explore) and logged as
    diffexp.py logs it (ARGV's --out/log.jsonl: the same evaluation, by diffexp.evaluate, on the same fixed noise), so
    that summarise() compares the two. The one peer is TRL's DDPOTrainer: trl 0.23.1, its last release with DDPO,
    installed apart from this project (see the README) and imported only here."""
    import contextlib
    import random
    import warnings

    args = runs.parse_args(argv)
    if (peer != "trl" or args.method != "ddpo" or not args.no_explore or args.lora_rank != 4 or args.inner_epochs != 1
            or args.device != "cpu" or args.eval_explored):
        raise ValueError("--peer trl compares DDPO without exploration (--no-explore), LoRA rank 4, 1 inner epoch, on "
                         "the CPU (--device cpu), evaluated plainly: what TRL's DDPOTrainer implements, as run here.")
    try:
        from accelerate import PartialState
        from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    except ImportError:
        raise RuntimeError("--peer trl needs trl 0.23.1 on PYTHONPATH: pip install --no-deps --target DIR trl==0.23.1 "
                           "pandas==3.1.1, then PYTHONPATH=DIR (see the README).") from None
    prompts, reward_fns = runs.load_prompts(args.prompts), {}
    for name in (args.reward, "shapes_judge"):
        reward_fns[name] = rewards.load_reward(name, "cpu", torch.float32)
    scores = []  # the epoch's training rewards, as TRL's reward_fn returns them

    def reward_fn(images, batch_prompts, metadata):  # TRL's: images [B, 3, H, W] in [0, 1]
        with torch.no_grad():
            scores.append(reward_fns[args.reward](images.float(), list(batch_prompts)).float())
        return scores[-1], {}

    rng, group = np.random.default_rng(args.seed), []

    def prompt_fn():  # TRL's, called once per sample: groups of --samples-per-prompt, as draw_prompt_ids draws them
        if not group:
            group.extend([prompts[int(rng.integers(len(prompts)))]] * args.samples_per_prompt)
        return group.pop(), {}

    mb = args.micro_batch_size  # TRL's sample and train batches: one forward pass; its accumulation: our updates
    config = DDPOConfig(
        seed=args.seed, log_with=None, mixed_precision="no", save_freq=10**9, accelerator_kwargs=dict(cpu=True),
        sample_num_steps=args.steps, sample_eta=args.eta, sample_guidance_scale=args.w_high, sample_batch_size=mb,
        sample_num_batches_per_epoch=args.batch_size // mb, train_batch_size=mb,
        train_gradient_accumulation_steps=args.train_batch_size // mb, train_learning_rate=args.lr,
        train_adam_weight_decay=args.weight_decay, train_max_grad_norm=args.max_grad_norm,
        train_clip_range=args.clip_range, train_adv_clip_max=args.adv_clip_max,
        train_timestep_fraction=args.timestep_fraction, per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=32, per_prompt_stat_tracking_min_count=16, negative_prompts="")
    PartialState(cpu=True)  # accelerate's logger must exist before TRL's pipeline warns through it
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's deprecation of DDPO, diffusers' of _encode_prompt
        sd = DefaultDDPOStableDiffusionPipeline(diffexp.SHAPES_MODEL if args.model == "shapes" else args.model,
                                                use_lora=True)
        trainer = DDPOTrainer(config, reward_fn, prompt_fn, sd)
    sd.set_progress_bar_config(disable=True)
    updates = []  # TRL logs loss, approx_kl and clipfrac through accelerator.log, once per optimizer step
    trainer.accelerator.log = lambda values, step=None, log_kwargs=None: updates.append(values)

    @contextlib.contextmanager
    def rng_kept():  # TRL samples and shuffles from the global RNGs: evaluating must not move them
        state = torch.get_rng_state(), np.random.get_state(), random.getstate()
        yield
        torch.set_rng_state(state[0]), np.random.set_state(state[1]), random.setstate(state[2])

    def evaluated(row):
        with rng_kept(), torch.no_grad():
            sd.sd_pipeline.unet.eval()
            sd.sd_pipeline.scheduler.set_timesteps(args.steps)
            return row | diffexp.evaluate(sd.sd_pipeline, reward_fns, {"unseen": runs.load_prompts(
                args.eval_prompts)}, args, 1)[0]

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.jsonl"), "w") as log:
        def write(row):
            log.write(json.dumps(row) + "\n")
            log.flush()

        if args.eval_every:
            write(evaluated(dict(epoch=0, reward_queries=0)))
        for epoch in range(1, args.epochs + 1):
            trainer.step(epoch - 1, 0)  # TRL counts epochs from 0
            trained, done = torch.cat(scores), [u for u in updates if "loss" in u]
            row = dict(epoch=epoch, reward_queries=epoch * args.batch_size, explore=False,
                       reward_mean=trained.mean().item(), reward_std=trained.std().item(),
                       **{k: float(np.mean([torch.as_tensor(u[k]).detach().item() for u in done]))
                          for k in ("loss", "approx_kl", "clipfrac")})
            write(evaluated(row) if args.eval_every and (epoch % args.eval_every == 0 or epoch == args.epochs) else row)
            scores.clear(), updates.clear()


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (matplotlib is optional for the rest of the project)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("drawing figures needs matplotlib, which is optional: pip install matplotlib") from None
    return plt


def draw(results, images, prompts, prefix):
    """PREFIXcurves.png: the training reward, the unseen prompts' reward and the judge's reading of them against reward
    queries, mean +- std over seeds, both arms (the paper's Fig. 4 and 6; a falling judge is hacking); and
    PREFIXdiversity.png: 8 plain and 8 DiffExp samples per prompt from the starting model (its Fig. 2 and 5)."""
    plt = pyplot()
    reward, method = results["reward"], results["method"]
    panels = [m for m in ("reward_mean", f"eval_unseen_{reward}", "eval_unseen_shapes_judge")
              if f"baseline/{m}" in results["curves"]]
    titles = {"reward_mean": f"training samples: {reward}", f"eval_unseen_{reward}": f"unseen prompts: {reward}",
              "eval_unseen_shapes_judge": "unseen prompts: the judge (never trained on)"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    (compared, compared_name), (_, base_name) = labels(results).items()
    for ax, metric in zip(axes, panels):
        for arm, colour, label in ((compared, "tab:blue", compared_name), ("baseline", "tab:gray", base_name)):
            curve = results["curves"][f"{arm}/{metric}"]
            mean, std = np.array(curve["mean"]), np.array(curve["std"])
            ax.plot(curve["queries"], mean, color=colour, label=label)
            ax.fill_between(curve["queries"], mean - std, mean + std, color=colour, alpha=0.2)
        ax.set(title=titles[metric], xlabel="reward queries")
    axes[0].legend()
    fig.suptitle(f"{method}, {reward} reward, shapes world, {results['seeds']} seeds (mean +- std)")
    fig.tight_layout()
    fig.savefig(f"{prefix}curves.png", dpi=80)
    if results.get("samplers"):
        draw_samplers(results, f"{prefix}samplers.png")
    if images is None:  # a peer's comparison: both arms sample plainly
        return plt.close("all")
    rows = [torch.cat([images[False][k, :8], images[True][k, :8]]) for k in range(len(prompts))]  # [16, 3, 32, 32]
    fig, axes = plt.subplots(len(prompts), 1, figsize=(8, 0.62 * len(prompts) + 0.4))
    for ax, row, prompt in zip(axes, rows, prompts):
        ax.imshow(torch.cat(list(row), dim=2).permute(1, 2, 0).numpy())  # 16 x [3, 32, 32] -> [32, 512, 3]
        ax.set_axis_off()
        ax.set_title(f"{prompt}: 8 plain | 8 DiffExp", fontsize=7, pad=2)
    fig.tight_layout()
    fig.savefig(f"{prefix}diversity.png", dpi=80)
    plt.close("all")


def draw_samplers(results, path):
    """The unseen prompts' reward and judge against reward queries, each arm's LoRA sampled plainly (solid) and with
    DiffExp's sampler (dashed), mean over the seeds read both ways: whether a LoRA learned the sampler it trained
    with."""
    plt = pyplot()
    reward = results["reward"]
    seeds = explored_seeds(results)  # the plain curves hold every seed, the explored ones these seeds alone
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    (compared, compared_name), (_, base_name) = labels(results).items()
    for ax, (plain, explored) in zip(axes, zip([f"eval_unseen_{reward}", "eval_unseen_shapes_judge"],
                                               explored_metrics(reward))):
        for arm, colour, label in ((compared, "tab:blue", "DiffExp's LoRA"),
                                   ("baseline", "tab:gray", f"the baseline's LoRA ({base_name})")):
            curve = results["curves"][f"{arm}/{plain}"]
            mean = np.array(curve["per_seed"])[seeds].mean(axis=0)  # [seeds, points] -> [points]
            ax.plot(curve["queries"], mean, "-", color=colour, label=f"{label}, plain sampler")
            curve = results["curves"][f"{arm}/{explored}"]
            ax.plot(curve["queries"], curve["mean"], "--", color=colour, label=f"{label}, exploring sampler")
        ax.set(title=f"unseen prompts: {plain.removeprefix('eval_unseen_')}", xlabel="reward queries")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{compared_name}: the held-out prompts under both samplers, {seed_list(seeds)} "
                 "(mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close("all")


def steps_at_w_low(results):
    """How many of the run's denoising steps DiffExp's Eq. 7 samples at w_low (t > t_thres); 0 for the baseline."""
    args = shapes_args(results["settings"])
    scheduler = diffexp.DDIMScheduler.from_pretrained(diffexp.SHAPES_MODEL, subfolder="scheduler")
    scheduler.set_timesteps(args.steps)
    return int((scheduler.timesteps > results["exploration"]["t_thres"]).sum())


def dose_points(files):
    """The dose (the paper's Fig. 9b) of results files that differ in t_thres alone: per panel ("queries": the
    queries ratio at 75% of the baseline's gain; "area": the area ratio) and reading ("reward_mean", or the unseen
    prompts' reward), [(steps at w_low, the ratio's dict from the file)], fewest steps first."""
    results = []
    for f in files:
        try:
            with open(f) as file:
                results.append(json.load(file))
        except (OSError, ValueError):
            raise ValueError(f"--dose: cannot read {f} as a results file.") from None
    others = [{k: v for k, v in r["exploration"].items() if k != "t_thres"} for r in results]  # all but t_thres
    thresholds = [r["exploration"]["t_thres"] for r in results]
    if (len({str(r["settings"]) for r in results}) > 1 or len({str(o) for o in others}) > 1
            or len(set(thresholds)) < len(results)):
        raise ValueError("--dose: the results files must share their settings and exploration but for t_thres, "
                         "and differ in t_thres.")
    by_steps = sorted((steps_at_w_low(r), k) for k, r in enumerate(results))  # [(steps, index in results)]
    points = {}
    for panel in ("queries", "area"):
        for metric in ("reward_mean", f"eval_unseen_{results[0]['reward']}"):
            ratios = [r["table"][metric][LEVELS.index(0.75)]["ratio"] if panel == "queries" else r["area"][metric]
                      for r in results]
            points[panel, metric] = [(steps, ratios[k]) for steps, k in by_steps]
    return points


def draw_dose(files, directory):
    """dose_points drawn: both panels, both readings, DiffExp / baseline against the number of steps at w_low (0: the
    baseline, 1 by definition), 95% intervals on a log scale; a hollow marker has seeds censored at the budget
    (a bound where one arm's are), and an area <= 0 has no point. Writes DIRECTORY/dose_METHOD-REWARD.png;
    returns (its path, the points)."""
    plt = pyplot()
    first = json.load(open(files[0]))
    points = dose_points(files)
    colours = {"reward_mean": ("tab:orange", "training samples"),
               f"eval_unseen_{first['reward']}": ("tab:blue", "held-out prompts, sampled plainly")}
    titles = {"queries": "queries to 75% of the baseline's gain", "area": "area under the gain curve"}
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for (panel, metric), drawn in points.items():
        ax, (colour, label) = axes[list(titles).index(panel)], colours[metric]
        shift = -0.1 if metric == "reward_mean" else 0.1  # the two readings side by side
        drawn = [(steps + shift, p) for steps, p in drawn if p["mean"] is not None]
        ax.plot([0] + [x for x, _ in drawn], [1] + [p["mean"] for _, p in drawn], color=colour, label=label)
        for x, p in drawn:
            bound = any(p.get("censored", {}).values())
            error = None if p["low"] is None else [[p["mean"] - p["low"]], [p["high"] - p["mean"]]]  # < 3 seeds: none
            ax.errorbar(x, p["mean"], yerr=error, fmt="o", color=colour, mfc="white" if bound else colour, capsize=3)
        ax.axhline(1, color="gray", linewidth=1, linestyle=":")
        ax.set(yscale="log", title=f"{titles[panel]}, DiffExp / baseline",
               xlabel="denoising steps at w_low (0: the baseline)")
        low, high = ax.get_ylim()
        if high / low < 10:  # within a decade a log axis labels 8 x 10^-1 or nothing: ticks at round values instead
            ax.yaxis.set_major_locator(plt.MaxNLocator(8, steps=[1, 2, 5, 10]))
            ax.yaxis.set_minor_locator(plt.NullLocator())
            ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%g"))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{first['method']} + DiffExp on {first['reward']}, w_low {first['exploration']['w_low']:g} for "
                 f"t > t_thres, {first['seeds']} seeds: 95% intervals, hollow: censored seeds", fontsize=9)
    fig.tight_layout()
    path = os.path.join(directory, f"dose_{first['method']}-{first['reward']}.png")
    fig.savefig(path, dpi=80)
    plt.close("all")
    return path, points


def dose_markdown(points):
    """draw_dose's points as a table (figures/README.md shows it): a row per number of steps at w_low."""
    columns = list(points)
    names = {"queries": "queries to 75%", "area": "area"}
    header = [f"{reading_name(metric)}: {names[panel]}" for panel, metric in columns]
    lines = ["| steps at w_low | " + " | ".join(header) + " |", "|---" * (len(columns) + 1) + "|"]
    for k, (steps, _) in enumerate(points[columns[0]]):
        cells = [short_ratio(points[c][k][1]) if points[c][k][1]["mean"] is not None else "an area <= 0"
                 for c in columns]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def labels(results):
    """{arm: its name in tables and figures}, the compared arm first, then the baseline."""
    arm, method = results["arms"][0], results["method"]
    if arm in PEERS:
        return {arm: f"{PEERS[arm]} (--no-explore)", "baseline": f"ours, {method} (--no-explore)"}
    flags = " ".join(results.get("diffexp_flags") or [])
    return {arm: f"{method} + DiffExp" + (f" ({flags})" if flags else ""), "baseline": method}


def interval(p):
    """A paired difference as text: mean [95% interval] (n seeds), or below 3 seeds the per-seed values."""
    if p["low"] is None:
        seeds = "1 seed" if p["n"] == 1 else f"{p['n']} seeds"
        return "per seed " + ", ".join(f"{d:+.4f}" for d in p["per_seed"]) + f" ({seeds}, no interval)"
    return f"{p['mean']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] ({p['n']} seeds)"


def ratio_text(p, short):
    """A ratio as text: geometric mean [95% interval] (n seeds), below 3 seeds the per-seed values. Where seeds were
    censored at the budget it says how many, and the ratio is a bound (>= where only the compared arm, `short`, never
    reached the level; <= where only the baseline did not)."""
    if p["low"] is None:
        return "per seed " + ", ".join(f"{r:.2f}" for r in p["per_seed"]) + f" ({p['n']} seeds, no interval)"
    censored = p.get("censored", dict(compared=0, baseline=0))
    never = []
    if censored["compared"]:
        never.append(f"{short} on {censored['compared']}")
    if censored["baseline"]:
        never.append(f"the baseline on {censored['baseline']}")
    seeds = f"{p['n']} seeds"
    if never:
        seeds += f"; never reached by {' and '.join(never)}, counted at the budget"
    bound = {(True, False): ">= ", (False, True): "<= "}.get((censored["compared"] > 0, censored["baseline"] > 0), "")
    if len(set(p["per_seed"])) == 1:  # queries on a grid of evaluations can tie: the interval would have no width
        return f"{bound}{p['mean']:.2f} on every seed ({seeds})"
    return f"{bound}{p['mean']:.2f} [{p['low']:.2f}, {p['high']:.2f}] ({seeds})"


def area_text(results, metric, short):
    """The area ratio of one reading as text (ratio_text), or the per-seed areas where one is not positive."""
    area = results["area"][metric]
    if area["mean"] is not None:
        return ratio_text(area, short)
    compared, baseline = (", ".join(f"{a:+.3f}" for a in area["areas"][name]) for name in (results["arms"][0],
                                                                                             "baseline"))
    return f"an area is not positive: {short} {compared}; baseline {baseline}"


def queries_text(per_seed, budget):
    """The mean queries over seeds to a level, a seed that never reaches it counted at the budget (then >=)."""
    counted = [budget if q is None else q for q in per_seed]
    never = per_seed.count(None)
    return f"{np.mean(counted):.0f}" if not never else f">= {np.mean(counted):.0f} ({never} never)"


def no_gain(results, metric):
    """Why there is no gain to reach fractions of, or None: a baseline whose mean moved by less than its seeds' std at
    the end has no gain whose fractions could be reached (a seed that starts above a level would "reach" it at once)."""
    mean, std = results["curves"][f"baseline/{metric}"]["mean"], results["final"][f"baseline/{metric}"]["std"]
    gain = mean[-1] - mean[0]
    if gain > std:
        return None
    return f"no gain: the baseline's mean moved by {gain:+.3f} (seeds' std at the end {std:.3f})"


def reading_name(metric):
    """A reading's words in the tables: the training samples' reward, or the unseen prompts' (sampled plainly)."""
    return "training samples" if metric == "reward_mean" else "evaluation, unseen prompts"


def markdown(results):
    """The tables of a results file (figures/README.md shows them), both readings of the reward each time (the training
    samples, the unseen prompts sampled plainly): queries to reach fractions of the baseline's gain with the per-seed
    ratio, the area under the gain curve, final values, the paired differences with their intervals, the unseen
    prompts under both samplers where they were measured, and diversity."""
    reward, lines, arm = results["reward"], [], results["arms"][0]
    short = "DiffExp" if arm == "diffexp" else PEERS[arm]
    readings = ("reward_mean", f"eval_unseen_{reward}")
    lines += [f"| reward queries to reach a fraction of the baseline's gain: {short} vs baseline (a seed that never "
              "does counted at the budget), per-seed ratio, geometric mean [95% interval] | 50% | 75% | 90% |",
              "|---|---|---|---|"]
    for metric in readings:
        budget = results["curves"][f"baseline/{metric}"]["queries"][-1]
        cells = [f"{queries_text(r['queries'][arm], budget)} vs {queries_text(r['queries']['baseline'], budget)}, "
                 f"ratio {ratio_text(r['ratio'], short)}" for r in results["table"][metric]]
        if no_gain(results, metric):
            cells = [no_gain(results, metric), "", ""]
        lines.append(f"| {reading_name(metric)} | " + " | ".join(cells) + " |")
    lines += ["", f"| area under the gain curve of {reward} over the baseline's start, {short} / baseline, per seed "
              "| geometric mean [95% interval] |", "|---|---|"]
    for metric in readings:
        lines.append(f"| {reading_name(metric)} | {no_gain(results, metric) or area_text(results, metric, short)} |")
    lines += ["", f"| final value (mean +- std over seeds) | {short} | baseline |", "|---|---|---|"]
    for key in results["final"]:
        name, metric = key.split("/")
        if name == arm:
            d, b = results["final"][key], results["final"][f"baseline/{metric}"]
            start = results["curves"][f"baseline/{metric}"]["mean"][0]
            partial = metric in explored_metrics(reward) and len(explored_seeds(results)) < results["seeds"]
            seeds = f" ({seed_list(explored_seeds(results))})" if partial else ""
            lines.append(f"| {metric} (from {start:.3f}){seeds} | {d['mean']:.3f} +- {d['std']:.3f} | "
                         f"{b['mean']:.3f} +- {b['std']:.3f} |")
    lines += ["", f"| paired difference, {short} - baseline (same seed) | mean [95% t interval] |", "|---|---|"]
    lines += [f"| {name} | {interval(p)} |" for name, p in results["paired"].items()]
    if results["samplers"]:
        judge = "eval_unseen_shapes_judge"
        lines += ["", "| the unseen prompts at the end, by sampler: paired difference (same seed)"
                  f"{explored_seeds_text(results)} | {reward} | judge |", "|---|---|---|"]
        lines += [f"| {words} | {interval(results['samplers'][f'eval_unseen_{reward}'][name])} | "
                  f"{interval(results['samplers'][judge][name])} |" for name, words in SAMPLER_DIFFERENCES.items()]
    if results["diversity"]:
        lines += ["", "| sampler (starting model) | distinct judge readings per prompt | mean pairwise distance |",
                  "|---|---|---|"]
        lines += [f"| {name} | {v['distinct_readings']:.2f} | {v['pairwise_distance']:.2f} |"
                  for name, v in results["diversity"].items()]
    return "\n".join(lines)


def exploration_text(exploration):
    """DiffExp's setting in a results file, in a few words."""
    if exploration["t_thres"] >= 999:
        eq7 = "no step at w_low"
    else:
        eq7 = f"w_low {exploration['w_low']:g} for t > {exploration['t_thres']}"
    if exploration["alpha_min"] == exploration["alpha_max"]:
        return f"{eq7}, alpha {exploration['alpha_max']:g}"
    return f"{eq7}, alpha U({exploration['alpha_min']:g}, {exploration['alpha_max']:g})"


HEADLINE = ("| replication | seeds | DiffExp's exploration | training samples: queries to 75% | training samples: "
            "area | held-out prompts: queries to 75% | held-out prompts: area | final held-out reward | final judge |\n"
            "|---|---|---|---|---|---|---|---|---|")
HEADLINE_PEER = ("| comparison | seeds | training samples: queries to 75% | training samples: area | held-out prompts: "
                 "queries to 75% | held-out prompts: area | final held-out reward | final judge |\n"
                 "|---|---|---|---|---|---|---|---|")


def short_ratio(p):
    """A ratio in a table cell: its geometric mean [95% interval], a bound (>=, <=) where seeds were censored, then
    "cD/B": D of the compared arm's seeds and B of the baseline's never reached the level (counted at the budget)."""
    if p["low"] is None:
        return "per seed " + ", ".join(f"{r:.2f}" for r in p["per_seed"])
    censored = p.get("censored", dict(compared=0, baseline=0))
    bound = {(True, False): ">= ", (False, True): "<= "}.get((censored["compared"] > 0, censored["baseline"] > 0), "")
    mark = f" c{censored['compared']}/{censored['baseline']}" if censored["compared"] or censored["baseline"] else ""
    if len(set(p["per_seed"])) == 1:
        return f"{bound}{p['mean']:.2f} every seed{mark}"
    return f"{bound}{p['mean']:.2f} [{p['low']:.2f}, {p['high']:.2f}]{mark}"


def short_difference(p):
    """A paired difference in a table cell: mean [95% interval], or below 3 seeds the per-seed values."""
    if p["low"] is None:
        return "per seed " + ", ".join(f"{d:+.3f}" for d in p["per_seed"])
    return f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]"


def headline(name, results):
    """One row of the README's headline table (HEADLINE's columns; HEADLINE_PEER's for a peer) for the results file
    figures/headline_NAME.json: both readings' queries ratio at 75% of the baseline's gain and area ratio, then the
    final paired differences of the held-out reward and the judge."""
    arm, evaluation = results["arms"][0], f"eval_unseen_{results['reward']}"
    cells = []
    for metric in ("reward_mean", evaluation):
        at_75 = results["table"][metric][LEVELS.index(0.75)]
        mean = results["curves"][f"baseline/{metric}"]["mean"]
        if no_gain(results, metric):
            cells += [f"no gain ({mean[-1] - mean[0]:+.3f})", "no gain"]
        else:
            area = results["area"][metric]
            cells += [short_ratio(at_75["ratio"]), short_ratio(area) if area["mean"] is not None else "an area <= 0"]
    for metric in (evaluation, "eval_unseen_shapes_judge"):
        cells.append(short_difference(results["paired"][f"final {metric}"]))
    exploration = [] if arm in PEERS else [exploration_text(results["exploration"])]
    link = f"[{name}](figures/README.md#{name})"
    return "| " + " | ".join([link, str(results["seeds"]), *exploration, *cells]) + " |"


def plot_runs(run_dirs, out_path):
    """Reward against reward queries, a line per run: training samples (the paper's Fig. 4), unseen prompts (Fig. 6)."""
    plt = pyplot()
    logged = {}
    for run_dir in run_dirs:
        try:
            with open(os.path.join(run_dir, "log.jsonl")) as log, open(os.path.join(run_dir, "config.json")) as config:
                logged[run_dir] = json.load(config), [json.loads(line) for line in log if line.strip()]
        except OSError:
            raise ValueError(f"--plot {run_dir}: not a run directory (no log.jsonl or config.json in it).") from None
    reward, *others = sorted({config["reward"] for config, _ in logged.values()})
    if others:
        raise ValueError(f"--plot: the runs use different rewards ({', '.join([reward, *others])}); plot them apart.")
    panels = {"reward_mean": ("training samples", reward),
              f"eval_unseen_{reward}": ("unseen prompts, fixed noise", reward),
              "eval_unseen_shapes_judge": ("unseen prompts: the judge, never trained on", "shapes_judge")}
    metrics = {k for _, rows in logged.values() for r in rows for k in r}
    panels = {k: v for k, v in panels.items() if k == "reward_mean" or k in metrics}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for run_dir, (config, rows) in logged.items():
        arm = "" if config["no_explore"] else " + DiffExp"
        label = f"{config['method']}{arm} ({os.path.basename(run_dir.rstrip('/'))})"
        for ax, key in zip(axes, panels):
            if any(key in r for r in rows):  # a run without evaluations has only the first curve
                ax.plot(*zip(*[(r["reward_queries"], r[key]) for r in rows if key in r]), ".-", label=label)
    for ax, (title, name) in zip(axes, panels.values()):
        ax.set(title=title, xlabel="reward queries", ylabel=f"mean {name}")
    axes[-1].legend()
    fig.tight_layout()
    try:
        fig.savefig(out_path, dpi=120)
    except OSError as e:
        raise ValueError(f"--plot-out {out_path}: cannot write it ({e.strerror or e}).") from None
    print(f"wrote {out_path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="DiffExp against its baseline on the shapes model, several seeds; "
                                     "any other flag goes to diffexp.py for both arms (e.g. --epochs 30).",
                                     allow_abbrev=False)  # --seed is diffexp.py's, not an abbreviation of --seeds
    parser.add_argument("--method", choices=runs.METHODS, help="ddpo or alignprop")
    parser.add_argument("--reward", default="bold",
                        help="a shapes-world reward: bold, fidelity, colour or shapes_judge")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (at least 2)")
    parser.add_argument("--ablation", choices=ABLATIONS, help="DiffExp's arm with Eq. 7 only (eq7: alpha = 1), Eq. 8 "
                        "only (eq8: t_thres 999, no step at w_low) or Eq. 7 on more steps (t800, t600: t_thres)")
    parser.add_argument("--peer", choices=PEERS, help="compare our DDPO baseline with a peer implementation at the "
                        "same settings instead (trl: TRL's DDPOTrainer, installed apart: see the README)")
    parser.add_argument("--run-peer", choices=PEERS, help="(what --peer runs) train the peer at the settings of the "
                        "diffexp.py flags given with it and write its log.jsonl")
    parser.add_argument("--premise", action="store_true", help="the premise sweep: exploration settings against "
                        "plain sampling at the starting model, for both methods' samplers (no training)")
    parser.add_argument("--premise-of", choices=runs.METHODS, help="(what --premise runs) one sampler's "
                        "sweep, written to --out/premise.json")
    parser.add_argument("--dose", nargs="*", metavar="RESULTS.json", help="the t_thres dose (the paper's Fig. 9b): "
                        "run the replication at the premise rule's exploration and with t_thres " +
                        ", ".join(map(str, DOSE)) + " (ablations rule-tN, one baseline arm) and draw both readings' "
                        "ratios against the steps at w_low, runs/dose_METHOD-REWARD.png; given results files, draw "
                        "them beside the first")
    parser.add_argument("--baseline-from", metavar="RESULTS.json", help="take the baseline arm's curves from this "
                        "published results file of the same settings instead of running it again (its seeds; any "
                        "further seeds run)")
    parser.add_argument("--seeds-from", metavar="RESULTS.json", help="take both arms' curves of the seeds that this "
                        "published results file of the same replication holds (the same settings, arms, DiffExp flags "
                        "and exploration; before --baseline-from), and run only the seeds beyond them")
    parser.add_argument("--out", help="output directory (default: runs/replicate-METHOD-REWARD[-ABLATION][-PEER]"
                        "[-FLAGS], or runs/premise)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="draw the reward curves of these run "
                        "directories of diffexp.py (any model) into --plot-out, against reward queries, and exit")
    parser.add_argument("--plot-out", default="reward_curves.png", help="where --plot writes its figure")
    parser.add_argument("--redraw", metavar="NAME.json", help="derive a results file's statistics again from its "
                        "curves (into the file), redraw its figures beside it (NAME_curves.png, NAME_diversity.png: "
                        "its samples drawn again; a premise sweep's NAME.png) and print its README tables")
    args, extra = parser.parse_known_args(argv)
    if args.run_peer:
        try:
            argv = ["--method", args.method, "--reward", args.reward, *extra, "--out", args.out]
            return run_peer(args.run_peer, argv)
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
    if args.plot:
        try:
            return plot_runs(args.plot, args.plot_out)
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
    if args.premise_of:
        return premise_sweep(args.premise_of, args.out)
    if args.premise:
        out = args.out or os.path.join("runs", "premise")
        try:
            results = premise(out, args.parallel)
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        print(premise_markdown(results))
        return print(f"premise.png and premise.json in {out}")
    if args.redraw:
        with open(args.redraw) as f:
            results = json.load(f)
        if results.get("kind") == "premise":
            draw_premise(results, args.redraw.removesuffix(".json") + ".png")
            return print(premise_markdown(results))
        results = derive(results)  # the statistics again, from the curves: the file gets today's
        with open(args.redraw, "w") as f:
            json.dump(results, f, indent=1)
        peer = results["arms"][0] in PEERS
        _, images, prompts = diversity(results["settings"], results["diffexp_flags"]) if not peer else (None,) * 3
        draw(results, images, prompts, args.redraw.removesuffix(".json") + "_")
        return print(markdown(results))
    if args.dose:
        try:
            path, points = draw_dose(args.dose, os.path.dirname(args.dose[0]))
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        print(dose_markdown(points))
        return print(f"wrote {path}")
    if not args.method:
        parser.error("give --method ddpo or alignprop (or --redraw a results file).")
    ablations = [args.ablation]
    if args.dose is not None:
        if args.ablation or args.peer or args.out or args.seeds_from:
            parser.error("--dose runs its own ablations into the default directories: no --ablation, --peer, --out "
                         "or --seeds-from.")
        ablations = [None, *(f"rule-t{t_thres}" for t_thres in DOSE)]
    files = []
    for ablation in ablations:
        suffix = "".join(f"-{x.lstrip('-')}" for x in (args.reward, ablation, args.peer, *extra) if x)
        out = args.out or os.path.join("runs", f"replicate-{args.method}{suffix}")
        # Without --out, a replication and its ablations keep their runs in one place: they share the baseline arm's.
        shared = "".join(f"-{x.lstrip('-')}" for x in (args.reward, *extra))
        runs_dir = None if args.out or args.peer else os.path.join("runs", f"replicate-{args.method}{shared}", "runs")
        try:
            results = replicate(args.method, args.seeds, out, args.reward, ablation, args.parallel, extra, args.peer,
                                runs_dir, args.baseline_from, args.seeds_from)
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        print(markdown(results))
        print(f"figures and results.json in {out}")
        files.append(os.path.join(out, "results.json"))
    if args.dose is not None:
        try:
            path, points = draw_dose(files, "runs")
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        print(dose_markdown(points))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
