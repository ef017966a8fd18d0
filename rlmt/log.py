"""What a researcher reads after a run: metrics.jsonl (one line a step), samples.jsonl (a few prompt /
thought / answer / reward rows a step), a reward-curve PNG, and optionally TensorBoard and Weights & Biases.

Metrics stay detached tensors during the step: `step_mean` turns per-micro-batch means into the step's
token-weighted means over all ranks, and `reduce_metrics` reduces everything over ranks (means, and
maxima for *_max) and turns it into floats once, when logging.
"""

import json
import math
import os

import torch
import torch.distributed as dist

from rlmt.dist import all_reduce_sum


def reduce_metrics(metrics):
    """{name: scalar tensor or float} -> {name: float} over ranks, with two collectives: a metric named
    *_max takes the maximum over ranks, every other one the mean of the ranks' values (every rank must
    call it, with the same names in the same order). A mean of means is the step's mean where each rank
    holds as much (the rollout's rows); `step_mean` has already made token-weighted ones global."""
    names = list(metrics)
    vals = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).detach().cpu().reshape(())
                        for k in names])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        is_max = torch.tensor([k.endswith("_max") for k in names], device=dev)
        mean, peak = vals.to(dev), vals.to(dev).clone()
        dist.all_reduce(mean)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        vals = torch.where(is_max, peak, mean / dist.get_world_size()).cpu()
    return dict(zip(names, vals.tolist()))


def step_mean(stats):
    """The step's value of per-micro-batch metrics over every micro-batch of every rank (a collective:
    every rank calls it with the same names). stats [(metrics {name: 0-d tensor}, weight)], each metric a
    mean over its micro-batch (of its mask tokens, or pairs) and `weight` what it averaged over. The
    weighted mean, Σ w·v / Σ w summed over ranks, is the mean over the whole step whatever the
    micro-batching and however the tokens fall on the ranks; the empty micro-batches of a lighter rank
    (weight 0) count for nothing; a metric named *_max is this rank's maximum (reduce_metrics takes the
    maximum over ranks). -> {name: 0-d tensor}, the same on every rank but for *_max."""
    names = list(stats[0][0])
    v = torch.stack([torch.stack([m[k].float().reshape(()) for k in names]) for m, _ in stats])  # [micro, names]
    w = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=v.device).reshape(()) for _, x in stats])
    v = torch.where(w[:, None] > 0, v, 0.0)  # an empty micro-batch's mean may be 0 / 0
    sums = all_reduce_sum(torch.cat([(v * w[:, None]).sum(0), w.sum()[None]]))
    mean = sums[:-1] / sums[-1].clamp(min=1e-12)
    return {k: v[:, i].max() if k.endswith("_max") else mean[i] for i, k in enumerate(names)}


def _append_jsonl(path, rows):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())  # a crash keeps every step logged so far


def truncate_after(out_dir, step):
    """On resume: drop lines of steps later than `step` (written after the checkpoint by a run that then
    crashed), so metrics.jsonl and samples.jsonl hold each step once."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            keep = [line for line in f if _step_of(line) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def _step_of(line):
    """The step a jsonl line belongs to; a torn line (a machine that died mid-write) counts as after all."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else math.inf
    except json.JSONDecodeError:
        return math.inf


def log_step(out_dir, step, metrics, samples=(), tb=None, wb=None):
    """Append one metrics line (and this step's sample rows); mirror the scalars to TensorBoard (`tb`) and
    Weights & Biases (`wb`, a wandb run) when open."""
    _append_jsonl(os.path.join(out_dir, "metrics.jsonl"), [{"step": step, **metrics}])
    if samples:
        _append_jsonl(os.path.join(out_dir, "samples.jsonl"), [{"step": step, **s} for s in samples])
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if tb is not None:
        for k, v in scalars.items():
            tb.add_scalar(k, v, step)
    if wb is not None:
        wb.log(scalars, step=step)


def tensorboard(out_dir):
    """A SummaryWriter under out_dir/tb when tensorboard is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))


def wandb(args):
    """A Weights & Biases run for --wandb PROJECT (rank 0 only, as tensorboard), its config the run's flags;
    None without the flag. wandb is imported only then: it is optional and slow to import."""
    if not getattr(args, "wandb", None):
        return None
    import wandb as wb  # preflight.check_outputs has said so if it is not installed
    return wb.init(project=args.wandb, dir=args.out, name=os.path.basename(os.path.normpath(args.out)),
                   config=vars(args))


def read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


REWARD_KEYS = ("reward_mean", "val_reward_mean", "format_rate")  # the online trainers' curve


def plot_rewards(out_dir, keys=REWARD_KEYS):
    """reward_curve.png from metrics.jsonl when matplotlib is installed; returns its path or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = read_metrics(out_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(out_dir, "reward_curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(out_dir, plot_keys=REWARD_KEYS, **outputs):
    """End of a run, rank 0: draw the curve of `plot_keys` and print where every output went.
    outputs: name=path of what the script wrote besides metrics and samples (policy=…, state=…)."""
    plot = plot_rewards(out_dir, plot_keys)
    samples = os.path.join(out_dir, "samples.jsonl")  # SFT and DPO write none
    paths = {"metrics": os.path.join(out_dir, "metrics.jsonl"), "samples": samples if os.path.exists(samples) else None,
             **outputs, "plot": plot}
    width = max(len(k) for k in paths) + 2
    print("\n".join(f"{k + ':':<{width}}{v}" for k, v in paths.items() if v))


def progress_postfix(m):
    """The few numbers worth watching on the progress bar."""
    keys = (("reward_mean", "r"), ("answer_rate", "ans"), ("format_rate", "fmt"), ("kl", "kl"),
            ("explained_variance", "ev"),
            ("response_len", "len"), ("tokens_per_s", "tok/s"), ("train_tokens_per_s", "train tok/s"))
    return {short: f"{m[k]:.3g}" for k, short in keys if k in m}
