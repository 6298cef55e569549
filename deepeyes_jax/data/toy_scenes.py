"""A small procedural multiple-choice scene source: the training launcher's built-in data until V*-mini.

Each index deterministically gives a noisy background with one coloured square, the question "What
colour is the square?" with four options, the answer letter and the square's box (for grounding IoU).
"""

from __future__ import annotations

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def scene(index: int, *, seed: int, height: int, width: int) -> dict:
    """-> dict(image uint8[H, W, 3], question str, answer str, data_source str, box [x1, y1, x2, y2])."""
    rng = np.random.default_rng([seed, index])
    image = rng.integers(60, 196, (height, width, 3), dtype=np.uint8)
    names = list(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    side = int(rng.integers(min(height, width) // 6, min(height, width) // 3))
    y, x = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
    image[y:y + side, x:x + side] = COLOURS[colour]
    options = list(rng.permutation(names))
    letters = "ABCD"
    question = "What colour is the square?\nOptions:\n" + "".join(f"{letters[i]}. {o}\n" for i, o in enumerate(options))
    return dict(image=image, question=question, answer=letters[options.index(colour)], data_source="vstar",
                box=[x, y, x + side, y + side])
