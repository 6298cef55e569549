"""The supervised stage's conversations: the separate abilities a real base model brings, never the composition.

From V*-mini training scenes, each example is one of (`TASKS`):
  scene       scene + its own question (hard or easy) -> a direct answer, or with probability
              `Budgets.tool_prior` a tool call on the target and nothing after it: the base model's prior
              propensity to use an offered tool, equal for hard and easy questions
  easy        scene + an easy question (large object) -> think, answer                    (no zoom needed)
  closeup     a tool-like crop around small target(s) as the only image + a hard question -> answer
  second      scene + easy question -> answer; then a user turn with a crop + hard question -> answer
              (reading a SECOND image of the conversation)
  observed    scene + hard question -> (context, not trained: an answer with a random option); then the
              tool's observation of a crop around the target -> the answer read from the crop
              (a tool_response turn, and answering the first question from it)
  grounding   scene + "Where is the small X?" -> answer {"bbox_2d": [...]} (the box one zooms on)
  tool_call   scene + a question + "Zoom in on X first." -> a tool call in the system prompt's format
  inventory   scene + "List the objects." -> the large object's colour, then each small object's colour and
              box (palette order): one grounding answer per small object, each right after its colour word
              (the dense form of grounding: 3-5 image-selective decisions per example instead of one)
No example contains a tool call followed by anything: that zooming pays off on hard questions is
what RL has to discover.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from deepeyes_jax.data import chat
from deepeyes_jax.data.tokenizer import COMPACT_SYSTEM_PROMPT, SYSTEM_PROMPT, USER_PROMPT
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.sft.conversation import Image, Reply, Text
from deepeyes_jax.vstar_mini import world

TASKS = ("scene", "easy", "closeup", "second", "observed", "grounding", "tool_call", "inventory")
INVENTORY_QUESTION = "List the objects: the large one's colour, then each small one's colour and bounding box."


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Pixel budgets: the scene as the model first sees it (`data.max_pixels`), and a zoomed crop (the rollout's
    own CropSpec)."""
    scene_max_pixels: int
    crop: CropSpec
    tool_pad: int = 16  # the tool-call box is the target box grown by this much (boxes need sides > 30 px)
    # > 0: boxes (tool calls, grounding answers) are the target box snapped outward to this grid instead:
    # only a few coordinate values to learn, and the box always contains the target.
    box_grid: int = 0
    system_prompt: str = SYSTEM_PROMPT
    tool_prior: float = 0.1  # "scene" task: fraction of questions met with a tool call
    kinds: tuple = world.HARD_KINDS + world.EASY_KINDS  # question kinds the tasks may ask


def prompt(image, question: str, budgets: Budgets, *, pixels: tuple[int, int] | None = None) -> list:
    """The rollout's first prompt (DeepEyes' layout, `data.chat.deepeyes_prompt`) as segments; `pixels` =
    (min, max) budget of the image (default: the scene's)."""
    before, after = chat.render(chat.deepeyes_prompt(question, budgets.system_prompt))
    return [Text(before), Image(image, *(pixels or (1, budgets.scene_max_pixels))), Text(after)]


def answer(think: str, text: str) -> str:
    return f"<think>{think}</think>\n<answer>{text}</answer>"


def tool_call(think: str, box) -> str:
    call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [int(round(v)) for v in box]}}
    return f"<think>{think}</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>"


def zoom_box(box, budgets: Budgets, size: int) -> list[float]:
    """The box to zoom on (and to answer "where is X?" with) for target box `box` on a size x size image."""
    if not budgets.box_grid:
        return world.crop_box(box, pad=budgets.tool_pad, size=size)
    g = budgets.box_grid
    return [float(g * math.floor(box[0] / g)), float(g * math.floor(box[1] / g)),
            float(min(size, g * math.ceil(box[2] / g))), float(min(size, g * math.ceil(box[3] / g)))]


def observation(crop, budgets: Budgets) -> list:
    """The zoom tool's observation turn showing `crop` (uint8[h, w, 3]), as the rollout templates it."""
    return [Text("\n<|im_start|>user\n<tool_response>"),
            Image(crop, budgets.crop.min_pixels, budgets.crop.max_pixels),
            Text(f"{USER_PROMPT}</tool_response><|im_end|>\n<|im_start|>assistant\n")]


def cut(image, box) -> np.ndarray:
    """image[box] for a float [x1, y1, x2, y2] box (rounded), as the tool crops the original image."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return image[y1:y2, x1:x2]


def grounding(image, name: str, box, budgets: Budgets) -> list:
    """"Where is <name>?" about `image`, answered with `box` (the answer is the trained reply)."""
    where = json.dumps({"bbox_2d": [round(v) for v in box]})
    return prompt(image, where_question(name), budgets) + [Reply(answer(f"I can see {name}.", where))]


def inventory(scene: dict, budgets: Budgets) -> list:
    """"List the objects." about a scene, answered {"large": colour, "small": [[colour, box], ...]} (palette order,
    then top-left first)."""
    objs, size = scene["objects"], scene["image"].shape[0]
    order = list(world.COLOURS)
    small = sorted([order.index(o["colour"]), [round(v) for v in zoom_box(o["box"], budgets, size)]]
                   for o in objs if o["size"] == "small")
    listing = {"large": next(o["colour"] for o in objs if o["size"] == "large"),
               "small": [[order[c], box] for c, box in small]}
    return prompt(scene["image"], INVENTORY_QUESTION, budgets) + [
        Reply(answer("I can see every object.", json.dumps(listing)))]


def where_question(name: str) -> str:
    return f"Where is {name}? Answer with its bounding box."


def zoom_request(question: str, name: str) -> str:
    """A formatted question followed by the request to zoom on `name` first."""
    return f"{question}Zoom in on {name} first."


def target_name(scene: dict, target_ids) -> str:
    """'the small red tile' / 'the small red objects' / 'the small red object' / 'the large object'."""
    objs = [scene["objects"][i] for i in target_ids]
    if objs[0]["size"] == "large":
        return "the large object"
    noun = "objects" if len(objs) > 1 else ("tile" if objs[0]["class"] == "tile" else "object")
    return f"the small {objs[0]['colour']} {noun}"


def _union(boxes):
    b = np.array(boxes, np.float64)
    return [float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())]


def _small_targets(scene: dict, rng, kinds):
    """A random hard question (of `kinds`) about this scene: (kind, target_ids)."""
    objs = scene["objects"]
    small = [i for i, o in enumerate(objs) if o["size"] == "small"]
    by_colour = {}
    for i in small:
        by_colour.setdefault(objs[i]["colour"], []).append(i)
    pairs = [ids for ids in by_colour.values() if len(ids) == 2]
    singles = [ids[0] for ids in by_colour.values() if len(ids) == 1]
    options = [("relative_position", p) for p in pairs]
    options += [(k, [i]) for i in singles for k in
                (("shape",) if objs[i]["class"] != "tile" else ("stripes",) if objs[i].get("stripes")
                 else ("letter", "letter_colour"))]
    options = [(k, ids) for k, ids in options if k in kinds]
    if not options:
        raise ValueError(f"no small target for question kinds {kinds}")
    return options[int(rng.integers(len(options)))]


def crop_window(scene, target_ids, rng, size) -> tuple[int, int, int]:
    """(x1, y1, side): a square crop around the targets, as a zoom on them returns it: the targets' larger side
    plus a random pad on each side, its centre shifted by up to half the pad, moved inside the image (square
    crops all take the same patch count under the crop budget, `SFTConfig.crop_patches`)."""
    box = _union([scene["objects"][i]["box"] for i in target_ids])
    pad = float(rng.uniform(8, 32))
    side = min(size, round(max(box[2] - box[0], box[3] - box[1]) + 2 * pad))
    centre = np.array([box[0] + box[2], box[1] + box[3]]) / 2 + rng.uniform(-pad / 2, pad / 2, size=2)
    x1, y1 = (int(np.clip(round(c - side / 2), 0, size - side)) for c in centre)
    return x1, y1, side


def _crop(scene, target_ids, rng, size):
    x1, y1, side = crop_window(scene, target_ids, rng, size)
    return scene["image"][y1:y1 + side, x1:x1 + side]


def example(scene: dict, task: str, rng, budgets: Budgets) -> list:
    """One conversation (segments for `sft.conversation.pack`) of the given task about a train scene."""
    objs, size = scene["objects"], scene["image"].shape[0]
    large = [i for i, o in enumerate(objs) if o["size"] == "large"]

    easy_kinds = [k for k in world.EASY_KINDS if k in budgets.kinds] or list(world.EASY_KINDS)

    def easy_turn():
        kind = easy_kinds[int(rng.integers(len(easy_kinds)))]
        q, opts, ans = world.question_for(objs, large, kind, rng)
        return prompt(scene["image"], world.format_question(q, opts), budgets), \
            Reply(answer("The large object is clearly visible.", ans))

    if task == "scene":
        name = target_name(scene, scene["target_ids"])
        segs = prompt(scene["image"], scene["question"], budgets)
        if rng.random() < budgets.tool_prior:
            box = zoom_box(scene["target_box"], budgets, size)
            return segs + [Reply(tool_call(f"I need a closer look at {name}.", box))]
        return segs + [Reply(answer(f"{name.capitalize()} is clearly visible.", scene["answer"]))]
    if task == "easy":
        segs, reply = easy_turn()
        return segs + [reply]
    if task == "inventory":
        return inventory(scene, budgets)
    kind, ids = _small_targets(scene, rng, budgets.kinds)
    name = target_name(scene, ids)
    crop = Image(_crop(scene, ids, rng, size), budgets.crop.min_pixels, budgets.crop.max_pixels)
    q, opts, ans = world.question_for(objs, ids, kind, rng)
    hard_q = world.format_question(q, opts)
    seen = Reply(answer(f"{name.capitalize()} is clearly visible.", ans))
    if task == "closeup":
        return prompt(crop.image, hard_q, budgets, pixels=(crop.min_pixels, crop.max_pixels)) + [seen]
    if task == "second":
        segs, reply = easy_turn()
        return segs + [reply, Text("\n<|im_start|>user\n"), crop,
                       Text(f"\n{hard_q}{USER_PROMPT}<|im_end|>\n<|im_start|>assistant\n"), seen]
    box = _union([objs[i]["box"] for i in ids])
    if task == "observed":
        # The crop the tool returns for the zoom box, or (half the time) a jittered one; the first answer
        # is context only, so what is learned is to answer the first question from the observed crop.
        view = cut(scene["image"], zoom_box(box, budgets, size)) if rng.random() < 0.5 else crop.image
        guess = Text(answer(f"{name.capitalize()} is small here.", opts[int(rng.integers(len(opts)))]) + "<|im_end|>")
        return prompt(scene["image"], hard_q, budgets) + [guess] + observation(view, budgets) + [seen]
    if task == "grounding":
        return grounding(scene["image"], name, zoom_box(box, budgets, size), budgets)
    if task == "tool_call":
        # Asked to zoom, alongside a question about the same object (a quarter of the time the large one,
        # so looking is not tied to small objects here); the answer after the zoom is never shown.
        if rng.random() < 0.25:
            easy_kind = easy_kinds[int(rng.integers(len(easy_kinds)))]
            (q, opts, _), ids = world.question_for(objs, large, easy_kind, rng), large
            name, box = target_name(scene, large), objs[large[0]]["box"]
        ask = zoom_request(world.format_question(q, opts), name)
        zoom = zoom_box(box, budgets, size)
        return prompt(scene["image"], ask, budgets) + [Reply(tool_call(f"I need a closer look at {name}.", zoom))]
    raise ValueError(f"unknown SFT task {task!r}; choose from {TASKS}")


def corpus(seed: int = 0, config: world.WorldConfig = world.WorldConfig()) -> list[str]:
    """Tokenizer training text for V*-mini in the world `config`: the prompts, questions, replies and tool calls."""
    rng = np.random.default_rng(seed)
    lines = [SYSTEM_PROMPT, COMPACT_SYSTEM_PROMPT, USER_PROMPT] * 16
    budgets = Budgets(112 * 112, CropSpec(config.size, config.size, 112 * 112, 112 * 112), kinds=config.kinds)
    for i in range(200):
        scene = world.make_scene(i, seed=seed, split="train", config=config)
        lines.append(scene["question"])
        for task in ("easy", "closeup", "observed", "grounding", "tool_call", "inventory"):
            for seg in example(scene, task, rng, budgets):
                if isinstance(seg, (Text, Reply)):
                    lines.append(seg.text)
    return lines
