"""``k15 plot RUN_DIR``: a PNG of a run's main curves from its metrics.jsonl.

Panels (those with data): training reward and accuracy, held-out pass@1, mean response length,
loss, logprob mismatch, and per-phase times. Writes ``RUN_DIR/curves.png`` (replaced on each
run; it belongs to the run) or ``--out`` (an existing file there is refused unless
``--overwrite``), then prints ``plot: wrote PATH``.
"""

from __future__ import annotations

import argparse
import os
import sys

PANELS = (
    ("reward", ("reward/mean", "accuracy/mean")),
    ("held-out pass@1", ("eval/pass@1",)),
    ("response length (tokens)", ("response/length_mean",)),
    ("loss", ("train/loss",)),
    ("logprob |rollout - trainer|", ("logprob/mean_abs_diff", "logprob_check/mean_abs_diff")),
    ("seconds per phase", ("time/rollout_s", "time/reward_s", "time/train_s", "time/sync_s")),
)


def plot_run(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from k15_megatron.jobs.metrics_log import read_metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it a run directory?)")
    records = read_metrics(path)
    panels = [(title, keys) for title, keys in PANELS if any(k in r for r in records for k in keys)]
    if not panels:
        raise ValueError(f"{path}: none of the plotted metrics are present")
    cols = 2
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    from k15_megatron.jobs.help_text import description

    parser = argparse.ArgumentParser(prog="k15 plot", description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG file to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    try:
        if args.out and os.path.exists(args.out) and not args.overwrite:
            raise ValueError(f"{args.out}: exists; pass --overwrite to replace it, or choose another --out")
        print(f"plot: wrote {os.path.abspath(plot_run(args.run_dir, args.out))}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
