"""Training dynamics plot from a run's metrics.jsonl (like DeepEyes Figure 3): `plot(workdir)`.

`launch.plot_metrics` is its command line; `launch.train` calls it at the end of a run.

Four panels over training steps (train-batch curves, plus held-out ``eval/<group>/*`` points when present, the
group ``all`` unless given, e.g. V*-mini's ``hard``): accuracy,
tool calls per trajectory (``zooms_per_trajectory``), grounding IoU (``grounding_iou``)
and response length (``response_length``). Each shows the raw curve and a smoothed one
(TensorBoard-style debiased exponential moving average). A metric missing from the file
gives an empty panel with a note. Drawn with Pillow only (no matplotlib dependency).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from deepeyes_jax.train.metrics import METRICS_FILE, read_metrics_jsonl

# (title, metric, y-axis label); the held-out eval/<group>/<metric> is drawn as points
PANELS = (
    ("Accuracy", "accuracy", "accuracy"),
    ("Tool calls / trajectory", "zooms_per_trajectory", "calls"),
    ("Grounding IoU", "grounding_iou", "IoU"),
    ("Response length", "response_length", "tokens"),
)

BG = (255, 255, 255)
AXIS = (60, 60, 60)
GRID = (228, 228, 228)
TEXT = (30, 30, 30)
NOTE = (150, 150, 150)
RAW = (158, 196, 232)
SMOOTH = (31, 100, 180)
EVAL = (214, 80, 40)


class PlotError(Exception):
    pass


def load_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise PlotError(f"metrics file not found: {path}")
    records = read_metrics_jsonl(path)
    if not records:
        raise PlotError(f"metrics file has no records: {path}")
    by_step = {}
    for rec in records:  # last record of a step wins (e.g. an un-truncated resume)
        by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(rec["step"]))
            ys.append(float(v))
    return xs, ys


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing)."""
    out, last, num = [], 0.0, 0
    for v in values:
        num += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** num) if weight > 0 else v)
    return out


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < 1e-12 * step else t)
        t += step
    return ticks


def fmt_tick(t: float) -> str:
    if t == 0:
        return "0"
    if abs(t) >= 1e4 or abs(t) < 1e-3:
        return f"{t:.1e}"
    return f"{t:.6g}" if t == int(t) else f"{t:.3g}"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    l, _, r, _ = draw.textbbox((0, 0), text, font=font)
    return r - l


def draw_panel(draw, box, title, ylabel, records, key, extra_key, smoothing, fonts):
    x0, y0, x1, y1 = box
    f_title, f_small = fonts
    tw = _text_w(draw, title, f_title)
    draw.text(((x0 + x1 - tw) / 2, y0 + 4), title, fill=TEXT, font=f_title)
    # plot area
    px0, py0, px1, py1 = x0 + 58, y0 + 34, x1 - 12, y1 - 44
    xs, ys = series(records, key)
    exs, eys = series(records, extra_key) if extra_key else ([], [])
    draw.rectangle([px0, py0, px1, py1], outline=AXIS)
    draw.text((px0, py0 - 15), ylabel, fill=NOTE, font=f_small)
    xl = "step"
    draw.text(((px0 + px1 - _text_w(draw, xl, f_small)) / 2, y1 - 18), xl, fill=TEXT, font=f_small)
    if not xs and not exs:
        note = f"no '{key}' in {METRICS_FILE}"
        draw.text(((px0 + px1 - _text_w(draw, note, f_small)) / 2, (py0 + py1) / 2 - 6), note,
                  fill=NOTE, font=f_small)
        return
    allx, ally = xs + exs, ys + eys
    xmin, xmax = min(allx), max(allx)
    ymin, ymax = min(ally), max(ally)
    if xmax == xmin:
        xmin, xmax = xmin - 1, xmax + 1
    pad = (ymax - ymin) * 0.05 if ymax > ymin else max(abs(ymax) * 0.1, 0.5)
    ymin, ymax = ymin - pad, ymax + pad

    def tx(x):
        return px0 + (x - xmin) / (xmax - xmin) * (px1 - px0)

    def ty(y):
        return py1 - (y - ymin) / (ymax - ymin) * (py1 - py0)

    for t in nice_ticks(ymin, ymax):
        y = ty(t)
        draw.line([(px0 + 1, y), (px1 - 1, y)], fill=GRID)
        draw.line([(px0 - 4, y), (px0, y)], fill=AXIS)
        s = fmt_tick(t)
        draw.text((px0 - 6 - _text_w(draw, s, f_small), y - 6), s, fill=TEXT, font=f_small)
    for t in nice_ticks(xmin, xmax):
        x = tx(t)
        draw.line([(x, py1), (x, py1 + 4)], fill=AXIS)
        s = fmt_tick(t)
        draw.text((x - _text_w(draw, s, f_small) / 2, py1 + 6), s, fill=TEXT, font=f_small)
    draw.rectangle([px0, py0, px1, py1], outline=AXIS)

    legend = []
    if xs:
        pts = [(tx(x), ty(y)) for x, y in zip(xs, ys)]
        spts = [(tx(x), ty(y)) for x, y in zip(xs, ema(ys, smoothing))]
        if len(pts) == 1:
            (cx, cy), = pts
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=SMOOTH)
        else:
            draw.line(pts, fill=RAW, width=1)
            draw.line(spts, fill=SMOOTH, width=2)
        legend += [("raw", RAW), ("smoothed", SMOOTH)]
    if exs:
        for x, y in zip(exs, eys):
            cx, cy = tx(x), ty(y)
            draw.ellipse([cx - 3.5, cy - 3.5, cx + 3.5, cy + 3.5], fill=EVAL, outline=EVAL)
        legend.append((extra_key, EVAL))
    lx, ly = px0 + 8, py0 + 6
    if legend:
        lw = 28 + max(_text_w(draw, name, f_small) for name, _ in legend)
        draw.rectangle([lx - 4, ly - 3, lx + lw, ly + 15 * len(legend)], fill=BG, outline=GRID)
    for name, color in legend:
        draw.line([(lx, ly + 6), (lx + 16, ly + 6)], fill=color, width=3)
        draw.text((lx + 20, ly), name, fill=TEXT, font=f_small)
        ly += 15


def render(records: Sequence[dict], width: int, height: int, smoothing: float, eval_group: str = "all") -> Image.Image:
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    fonts = (_font(15), _font(11))
    n = len(PANELS)
    pw = width / n
    for i, (title, key, ylabel) in enumerate(PANELS):
        box = (int(i * pw), 0, int((i + 1) * pw), height)
        draw_panel(draw, box, title, ylabel, records, key, f"eval/{eval_group}/{key}", smoothing, fonts)
    return img


def plot(workdir: str, out: str | None = None, width: int = 1600, height: int = 420,
         smoothing: float = 0.9, eval_group: str = "all") -> str:
    records = load_records(os.path.join(workdir, METRICS_FILE))
    if not 0 <= smoothing < 1:
        raise PlotError(f"--smoothing must be in [0, 1), got {smoothing}")
    if width < 400 or height < 200:
        raise PlotError(f"image too small: {width}x{height} (min 400x200)")
    out = out or os.path.join(workdir, "dynamics.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    render(records, width, height, smoothing, eval_group).save(out, format="PNG")
    return out
