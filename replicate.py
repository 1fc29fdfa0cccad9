"""The paper's headline on a CPU: DiffExp against its baseline in the shapes world, over several seeds.

    python replicate.py --method alignprop --seeds 5                 # DiffExp vs AlignProp on the fidelity reward
    python replicate.py --method ddpo --seeds 5                      # DiffExp vs DDPO
    python replicate.py --method alignprop --ablation eq7 --seeds 5  # Eq. 7 alone (alpha = 1); eq8: Eq. 8 alone
    python replicate.py --method alignprop --reward colour --seeds 3 # a reward that is hacked: watch the judge fall
    python replicate.py --redraw figures/headline_alignprop.json     # the figures and README tables of a results file
    python replicate.py --plot runs/RUN_A runs/RUN_B                 # reward curves of any diffexp.py runs (Fig. 4)

Each arm and seed is a `python diffexp.py --model shapes` run (one thread each, two at a time), with identical
settings and seeds for DiffExp and its baseline (`--no-explore`): same LoRA initialisation, prompts and noise where
the samplers allow, so that the per-seed difference is the quantity to report. Writes results.json (every curve per
seed, the settings, the tables, the diversity numbers), curves.png and diversity.png into --out. Any other flag goes
to diffexp.py for both arms (e.g. --epochs 30).
"""

import argparse
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
import shapes

HERE = os.path.dirname(os.path.abspath(__file__))
# Per method, the runs' size (ours): chosen so that 5 seeds of both arms fit about 45 minutes on 2 cores.
SETTINGS = {
    "ddpo": ["--epochs", "16", "--eval-every", "2"],
    "alignprop": ["--epochs", "16", "--eval-every", "2"],
}
ABLATIONS = {"eq7": ["--alpha-max", "1"], "eq8": ["--t-thres", "999"]}  # DiffExp in part: alpha = 1, or no t > 999
LEVELS = (0.5, 0.75, 0.9)  # fractions of the baseline's final gain
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student's t
DIVERSITY_PROMPTS = 6  # the plain "a COLOUR SHAPE" prompts of [unseen_shapes]; 16 samples each


def run_in_parallel(commands, parallel):
    """Run {name: (argv, run_dir)} as `python diffexp.py` subprocesses with one thread each, `parallel` at a time,
    printing each run's epochs as its log grows."""
    pending, running, shown = list(commands.items()), {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, (argv, run_dir) = pending.pop(0)
                shutil.rmtree(run_dir, ignore_errors=True)  # a previous replicate's run: its log must not be reported
                os.makedirs(os.path.dirname(run_dir), exist_ok=True)
                with open(run_dir + ".out", "w") as out:
                    command = [sys.executable, os.path.join(HERE, "diffexp.py"), *argv, "--out", run_dir]
                    running[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env), run_dir
            time.sleep(2)
            for name, (proc, run_dir) in list(running.items()):
                rows = read_log(run_dir)
                for row in rows[shown.get(name, 0):]:
                    scores = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k == "reward_mean" or "unseen" in k)
                    print(f"[{name}] epoch {row['epoch']}: {scores}", flush=True)
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


def paired(differences):
    """Mean of per-seed differences with a 95% Student-t interval over seeds: dict(mean, low, high, n)."""
    d = np.array([x for x in differences if x is not None], dtype=float)
    if len(d) < 2:
        return dict(mean=float(d.mean()) if len(d) else None, low=None, high=None, n=len(d))
    half = T_975[len(d) - 1] * d.std(ddof=1) / np.sqrt(len(d))
    return dict(mean=float(d.mean()), low=float(d.mean() - half), high=float(d.mean() + half), n=len(d))


def summarise(logs, method, reward, settings):
    """results.json's content from the runs' logs {arm: [rows of seed 0, rows of seed 1, ...]}: the curves (training
    reward, and the evaluation on unseen prompts of the reward and of the judge) per seed with their mean and std; for
    50/75/90% of the baseline's final gain (mean curve), the queries each arm first reaches it, averaged over the seeds
    that do (counted whatever the gain: markdown() says "no gain" where it is within the seeds' spread); final values;
    and the per-seed paired differences, DiffExp minus baseline, with 95% intervals."""
    seeds = len(logs["baseline"])
    judge = ["eval_unseen_shapes_judge"] if reward != "shapes_judge" else []
    metrics = ["reward_mean", f"eval_unseen_{reward}", *judge]
    results = dict(method=method, reward=reward, seeds=seeds, settings=settings, arms=list(logs), curves={}, table={},
                   final={}, paired={})
    for arm, arm_logs in logs.items():
        for metric in metrics:
            queries = [r["reward_queries"] for r in arm_logs[0] if metric in r]
            values = np.array([[r[metric] for r in log if metric in r] for log in arm_logs])  # [seeds, points]
            results["curves"][f"{arm}/{metric}"] = dict(queries=queries, per_seed=values.tolist(),
                                                        mean=values.mean(0).tolist(), std=values.std(0).tolist())
            results["final"][f"{arm}/{metric}"] = dict(mean=float(values[:, -1].mean()), std=float(values[:, -1].std()))
    reached = {}  # (metric, fraction, arm) -> queries per seed (None: never)
    for metric in metrics[:2]:
        base = results["curves"][f"baseline/{metric}"]
        start, end = base["mean"][0], base["mean"][-1]
        rows = []
        for fraction in LEVELS:
            level, row = start + fraction * (end - start), {}
            for arm in logs:
                curve = results["curves"][f"{arm}/{metric}"]
                firsts = [first_reach(curve["queries"], values, level) for values in curve["per_seed"]]
                reached[metric, fraction, arm] = firsts
                hits = [q for q in firsts if q is not None]
                row[arm] = dict(queries=float(np.mean(hits)) if hits else None, reached=f"{len(hits)}/{seeds}")
            ratio = (row["diffexp"]["queries"] / row["baseline"]["queries"]
                     if row["diffexp"]["queries"] and row["baseline"]["queries"] else None)
            rows.append(dict(fraction=fraction, level=level, **row, ratio=ratio))
        results["table"][metric] = rows
    evaluation = f"eval_unseen_{reward}"
    for metric in metrics[1:]:
        per_seed = [np.array(results["curves"][f"{arm}/{metric}"]["per_seed"])[:, -1]
                    for arm in ("diffexp", "baseline")]
        results["paired"][f"final {metric}"] = paired((per_seed[0] - per_seed[1]).tolist())
    results["paired"][f"queries to 75% {evaluation}"] = paired(
        [a - b if a is not None and b is not None else None
         for a, b in zip(reached[evaluation, 0.75, "diffexp"], reached[evaluation, 0.75, "baseline"])])
    return results


@torch.no_grad()
def diversity(settings, explore_settings):
    """16 samples of each of the first unseen prompts from the starting model (no LoRA training), plainly and with
    DiffExp's exploration, from the same noise: the distinct judge readings per prompt and the mean pairwise L2
    distance between a prompt's images. Returns (numbers, images {False: plain, True: DiffExp} [P, 16, 3, 32, 32])."""
    with tempfile.TemporaryDirectory() as unused:  # parse_args checks that a run directory could be written
        args = diffexp.parse_args(["--model", "shapes", *settings, *explore_settings, "--out", f"{unused}/run"])
    prompts = diffexp.load_prompts(args.eval_prompts)[:DIVERSITY_PROMPTS]
    torch.manual_seed(args.seed)
    pipe = diffexp.load_pipeline("shapes", args.lora_rank, "cpu", torch.float32)
    pipe.scheduler.set_timesteps(args.steps)
    images, numbers = {}, {}
    for explore, name in ((False, "plain"), (True, "diffexp")):
        images[explore] = torch.stack([diffexp.sample_batch(pipe, [p] * 16, torch.Generator().manual_seed(k),
                                                            explore=explore, **diffexp.sampling(args))["images"]
                                       for k, p in enumerate(prompts)])
        readings = [[tuple(r.values()) for r in shapes.judge(per_prompt)] for per_prompt in images[explore]]
        distances = [torch.pdist(per_prompt.flatten(1)).mean().item() for per_prompt in images[explore]]
        numbers[name] = dict(distinct_readings=float(np.mean([len(set(r)) for r in readings])),
                             pairwise_distance=float(np.mean(distances)))
    return numbers, images, prompts


def replicate(method, seeds, out, reward="fidelity", ablation=None, parallel=2, extra=()):
    """Run both arms over `seeds` seeds, summarise, measure diversity, draw; writes out/results.json."""
    if seeds < 2 or parallel < 1:
        raise ValueError("replicate needs at least 2 seeds (for the intervals) and 1 run at a time.")
    settings = ["--method", method, "--reward", reward, *SETTINGS[method], *extra]
    arms = {"diffexp": ABLATIONS.get(ablation, []), "baseline": ["--no-explore"]}
    commands = {f"{arm} s{seed}": (["--model", "shapes", "--seed", str(seed), *settings, *flags],
                                   os.path.join(out, "runs", f"{arm}-s{seed}"))
                for seed in range(seeds) for arm, flags in arms.items()}
    run_in_parallel(commands, parallel)
    logs = {arm: [read_log(os.path.join(out, "runs", f"{arm}-s{seed}")) for seed in range(seeds)] for arm in arms}
    results = summarise(logs, method, reward, settings) | dict(ablation=ablation, diffexp_flags=arms["diffexp"])
    results["diversity"], images, prompts = diversity(settings, arms["diffexp"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    draw(results, images, prompts, os.path.join(out, ""))
    return results


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
    arm_name = f"{method} + DiffExp" + (f" ({results['ablation']} only)" if results.get("ablation") else "")
    for ax, metric in zip(axes, panels):
        for arm, colour, label in (("diffexp", "tab:blue", arm_name), ("baseline", "tab:gray", method)):
            curve = results["curves"][f"{arm}/{metric}"]
            mean, std = np.array(curve["mean"]), np.array(curve["std"])
            ax.plot(curve["queries"], mean, color=colour, label=label)
            ax.fill_between(curve["queries"], mean - std, mean + std, color=colour, alpha=0.2)
        ax.set(title=titles[metric], xlabel="reward queries")
    axes[0].legend()
    fig.suptitle(f"{method}, {reward} reward, shapes world, {results['seeds']} seeds (mean +- std)")
    fig.tight_layout()
    fig.savefig(f"{prefix}curves.png", dpi=80)
    rows = [torch.cat([images[False][k, :8], images[True][k, :8]]) for k in range(len(prompts))]  # [16, 3, 32, 32]
    fig, axes = plt.subplots(len(prompts), 1, figsize=(8, 0.62 * len(prompts) + 0.4))
    for ax, row, prompt in zip(axes, rows, prompts):
        ax.imshow(torch.cat(list(row), dim=2).permute(1, 2, 0).numpy())  # 16 x [3, 32, 32] -> [32, 512, 3]
        ax.set_axis_off()
        ax.set_title(f"{prompt}: 8 plain | 8 DiffExp", fontsize=7, pad=2)
    fig.tight_layout()
    fig.savefig(f"{prefix}diversity.png", dpi=80)
    plt.close("all")


def markdown(results):
    """The README's tables of a results file: queries to reach fractions of the baseline's gain, final values, the
    paired differences with their intervals, and diversity."""
    def queries(cell):
        return "never" if cell["queries"] is None else f"{cell['queries']:.0f}" + (
            "" if cell["reached"].split("/")[0] == cell["reached"].split("/")[1] else f" ({cell['reached']} seeds)")

    def interval(p):
        if p["mean"] is None:
            return "no seed reached it in both arms"
        ci = f" [{p['low']:+.3g}, {p['high']:+.3g}]" if p["low"] is not None else ""
        return f"{p['mean']:+.3g}{ci} ({p['n']} seeds)"

    def gain(metric):  # the baseline's mean gain, start to end (the levels are fractions of it), and its noise
        mean = results["curves"][f"baseline/{metric}"]["mean"]
        return mean[-1] - mean[0], results["final"][f"baseline/{metric}"]["std"]

    def no_gain(metric):  # a gain within the seeds' spread: "reaching" a fraction of it measures noise
        g, std = gain(metric)
        return f"no gain: the baseline's mean moved by {g:+.3f} (seeds' std at the end {std:.3f})" if g <= std else None

    reward, lines = results["reward"], []
    evaluation = f"eval_unseen_{reward}"
    lines += ["| reward queries to reach a fraction of the baseline's gain, DiffExp vs baseline (ratio) "
              "| 50% | 75% | 90% |",
              "|---|---|---|---|"]
    for metric, name in (("reward_mean", "training samples"), (evaluation, "evaluation, unseen prompts")):
        cells = [f"{queries(r['diffexp'])} vs {queries(r['baseline'])}" + (f" ({r['ratio']:.2f})" if r["ratio"] else "")
                 for r in results["table"][metric]]
        if no_gain(metric):
            cells = [no_gain(metric), "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| final value (mean +- std over seeds) | DiffExp | baseline |", "|---|---|---|"]
    for key in results["final"]:
        arm, metric = key.split("/")
        if arm == "diffexp":
            d, b = results["final"][key], results["final"][f"baseline/{metric}"]
            start = results["curves"][f"baseline/{metric}"]["mean"][0]
            lines.append(f"| {metric} (from {start:.3f}) | {d['mean']:.3f} +- {d['std']:.3f} | "
                         f"{b['mean']:.3f} +- {b['std']:.3f} |")
    lines += ["", "| paired difference, DiffExp - baseline (same seed) | mean [95% t interval] |", "|---|---|"]
    lines += [f"| {name} | {'no gain to reach' if 'queries' in name and no_gain(evaluation) else interval(p)} |"
              for name, p in results["paired"].items()]
    lines += ["", "| sampler (starting model) | distinct judge readings per prompt | mean pairwise distance |",
              "|---|---|---|"]
    lines += [f"| {name} | {v['distinct_readings']:.2f} | {v['pairwise_distance']:.2f} |"
              for name, v in results["diversity"].items()]
    return "\n".join(lines)


def plot_runs(run_dirs, out_path):
    """Reward against reward queries, a line per run: training samples (the paper's Fig. 4), unseen prompts (Fig. 6)."""
    plt = pyplot()
    runs = {}
    for run_dir in run_dirs:
        try:
            with open(os.path.join(run_dir, "log.jsonl")) as log, open(os.path.join(run_dir, "config.json")) as config:
                runs[run_dir] = json.load(config), [json.loads(line) for line in log if line.strip()]
        except OSError:
            raise ValueError(f"--plot {run_dir}: not a run directory (no log.jsonl or config.json in it).") from None
    reward, *others = sorted({config["reward"] for config, _ in runs.values()})
    if others:
        raise ValueError(f"--plot: the runs use different rewards ({', '.join([reward, *others])}); plot them apart.")
    panels = {"reward_mean": ("training samples", reward),
              f"eval_unseen_{reward}": ("unseen prompts, fixed noise", reward),
              "eval_unseen_shapes_judge": ("unseen prompts: the judge, never trained on", "shapes_judge")}
    logged = {k for _, rows in runs.values() for r in rows for k in r}
    panels = {k: v for k, v in panels.items() if k == "reward_mean" or k in logged}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for run_dir, (config, rows) in runs.items():
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
                                     "any other flag goes to diffexp.py for both arms (e.g. --epochs 30).")
    parser.add_argument("--method", choices=SETTINGS, help="ddpo or alignprop")
    parser.add_argument("--reward", default="fidelity", help="a shapes-world reward: fidelity, colour or shapes_judge")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (at least 2)")
    parser.add_argument("--ablation", choices=ABLATIONS, help="DiffExp with Eq. 7 only (alpha = 1) or Eq. 8 only "
                        "(t_thres 999: no step runs at w_low)")
    parser.add_argument("--out", help="output directory (default: runs/replicate-METHOD[-REWARD][-ABLATION])")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="draw the reward curves of these run "
                        "directories of diffexp.py (any model) into --plot-out, against reward queries, and exit")
    parser.add_argument("--plot-out", default="reward_curves.png", help="where --plot writes its figure")
    parser.add_argument("--redraw", metavar="NAME.json", help="redraw a results file's figures beside it "
                        "(NAME_curves.png, NAME_diversity.png: its samples drawn again) and print its README tables")
    args, extra = parser.parse_known_args(argv)
    if args.plot:
        try:
            return plot_runs(args.plot, args.plot_out)
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
    if args.redraw:
        with open(args.redraw) as f:
            results = json.load(f)
        _, images, prompts = diversity(results["settings"], results["diffexp_flags"])
        draw(results, images, prompts, args.redraw.removesuffix(".json") + "_")
        return print(markdown(results))
    if not args.method:
        parser.error("give --method ddpo or alignprop (or --redraw a results file).")
    suffix = "".join(f"-{x}" for x in (args.reward if args.reward != "fidelity" else None, args.ablation) if x)
    out = args.out or os.path.join("runs", f"replicate-{args.method}{suffix}")
    try:
        results = replicate(args.method, args.seeds, out, args.reward, args.ablation, args.parallel, extra)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(markdown(results))
    print(f"figures and results.json in {out}")


if __name__ == "__main__":
    main()
