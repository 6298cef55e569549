"""Training dynamics plot from a run's metrics.jsonl (like DeepEyes Figure 3).

    python -m launch.plot_metrics --workdir=runs/vstar_mini [--out=runs/vstar_mini/dynamics.png]

See `deepeyes_jax.train.dynamics` for the panels.
"""

import sys

from absl import app, flags

from deepeyes_jax.train.dynamics import PlotError, plot

flags.DEFINE_string("workdir", None, "Run directory containing metrics.jsonl.")
flags.DEFINE_string("out", None, "Output PNG (default: WORKDIR/dynamics.png).")
flags.DEFINE_integer("width", 1600, "Image width in pixels.")
flags.DEFINE_integer("height", 420, "Image height in pixels.")
flags.DEFINE_float("smoothing", 0.9, "EMA weight of the smoothed line, in [0, 1).")
flags.DEFINE_string("eval_group", "all", "Held-out points drawn: eval/<group>/* (e.g. hard for V*-mini).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    try:
        out = plot(FLAGS.workdir, FLAGS.out, FLAGS.width, FLAGS.height, FLAGS.smoothing, FLAGS.eval_group)
    except PlotError as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
