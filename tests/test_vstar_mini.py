"""V*-mini scene generator invariants and the TFDS round trip (tiny splits, built in tmp_path)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from deepeyes_jax.data.tokenizer import build_tokenizer, default_corpus
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.sft.conversation import Shapes
from deepeyes_jax.vstar_mini import probes, tasks

from deepeyes_jax.vstar_mini import dataset as vstar_mini_tfds
from deepeyes_jax.vstar_mini import world as vm

N = 400
SCENES = [vm.make_scene(i, seed=0, split="train") for i in range(N)]
CFG = vm.WorldConfig()
CELL = CFG.size // CFG.grid


def _intersects(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _cell_of(box):
    cx, cy = box[0] // CELL * CELL, box[1] // CELL * CELL
    return [cx, cy, cx + CELL, cy + CELL]


def test_deterministic_and_seeded():
    a, b = vm.make_scene(7, seed=3, split="test"), vm.make_scene(7, seed=3, split="test")
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["question"] == b["question"] and a["objects"] == b["objects"]
    assert not np.array_equal(a["image"], vm.make_scene(7, seed=4, split="test")["image"])
    assert not np.array_equal(a["image"], vm.make_scene(7, seed=3, split="train")["image"])
    assert a["image"].shape == (448, 448, 3) and a["image"].dtype == np.uint8


def test_layout_rules():
    m = CFG.margin
    for s in SCENES:
        large, small = s["objects"][0], s["objects"][1:]
        assert large["size"] == "large" and all(o["size"] == "small" for o in small)
        x1, y1, x2, y2 = large["box"]
        assert 0 <= x1 and 0 <= y1 and x2 <= CFG.size and y2 <= CFG.size
        assert CFG.large_size[0] <= x2 - x1 <= CFG.large_size[1] and x2 - x1 == y2 - y1
        grown = [x1 - m, y1 - m, x2 + m, y2 + m]
        assert 1 <= len(small) <= CFG.num_small[1]
        for i, o in enumerate(small):
            b, cell = o["box"], _cell_of(o["box"])
            assert CFG.small_size[0] <= b[2] - b[0] <= CFG.small_size[1]
            assert cell[0] + m <= b[0] and b[2] <= cell[2] - m and cell[1] + m <= b[1] and b[3] <= cell[3] - m
            assert not _intersects(cell, grown)
            assert all(not _intersects(b, p["box"]) for p in small[i + 1:])
            assert (o["letter"] != "") == (o["class"] == "tile") and o["letter_colour"] != o["colour"]
        colours = [o["colour"] for o in small]
        pair = [s["objects"][t] for t in s["target_ids"]] if s["kind"] == "relative_position" else []
        assert len(set(colours)) == len(colours) - len(pair) // 2  # the pair shares one, unique elsewhere
        if pair:
            assert pair[0]["colour"] == pair[1]["colour"] and pair[0]["shape"] != pair[1]["shape"]
            assert _cell_of(pair[0]["box"]) == _cell_of(pair[1]["box"])
            gap = max(pair[1]["box"][0] - pair[0]["box"][2], pair[0]["box"][0] - pair[1]["box"][2],
                      pair[1]["box"][1] - pair[0]["box"][3], pair[0]["box"][1] - pair[1]["box"][3])
            assert gap >= 6
        # cells hold one small object each (the pair excepted)
        cells = [tuple(_cell_of(o["box"])) for o in small]
        assert len(set(cells)) == len(cells) - len(pair) // 2


def test_question_answer_consistency():
    for s in SCENES:
        assert s["answer"] in s["options"] and s["options"][ord(s["answer_letter"]) - 65] == s["answer"]
        assert len(set(s["options"])) == len(s["options"]) == (2 if s["kind"] == "relative_position" else 4)
        assert s["question"] == vm.format_question(s["question_text"], s["options"])
        assert s["hard"] == (s["kind"] in vm.HARD_KINDS) and s["data_source"] == "vstar"
        t = [s["objects"][i] for i in s["target_ids"]]
        boxes = np.array([o["box"] for o in t])
        assert s["target_box"] == [float(v) for v in (*boxes[:, :2].min(0), *boxes[:, 2:].max(0))]
        assert all(0 <= v <= CFG.size for v in s["target_box"])
        kind, o = s["kind"], t[0]
        assert (o["size"] == "large") == (kind in vm.EASY_KINDS)
        assert f" {o['colour']} " in s["question_text"] or kind in vm.EASY_KINDS
        if kind == "shape":
            assert o["class"] == "shape" and s["answer"] == o["shape"] and sorted(s["options"]) == sorted(vm.SHAPES)
        elif kind == "letter":
            assert o["class"] == "tile" and s["answer"] == o["letter"]
        elif kind == "letter_colour":
            assert o["class"] == "tile" and s["answer"] == o["letter_colour"] and o["colour"] not in s["options"]
        elif kind == "relative_position":
            (ax, ay), (bx, by) = [((p["box"][0] + p["box"][2]) / 2, (p["box"][1] + p["box"][3]) / 2) for p in t]
            want = {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}
            assert want[s["answer"]] and s["question_text"].startswith(f"Is the small {o['colour']} {o['shape']} ")
        elif kind == "large_colour":
            assert s["answer"] == o["colour"] and set(s["options"]) <= set(vm.COLOURS)
        else:
            assert s["answer"] == o["shape"]


def test_all_kinds_and_hard_fraction():
    kinds = [s["kind"] for s in SCENES]
    relative = {s["answer"] for s in SCENES if s["kind"] == "relative_position"}
    assert relative == {"left", "right", "above", "below"}
    assert set(kinds) == set(CFG.kinds)
    assert abs(np.mean([s["hard"] for s in SCENES]) - CFG.hard_fraction) < 0.07
    only = vm.WorldConfig(kinds=("letter", "large_shape"), hard_fraction=1.0)
    assert {vm.make_scene(i, seed=1, split="train", config=only)["kind"] for i in range(20)} == {"letter"}


def test_pixels_show_the_objects():
    for s in SCENES[:100]:
        for o in s["objects"]:
            x1, y1, x2, y2 = o["box"]
            rgb = np.array(vm.COLOURS[o["colour"]])
            patch = s["image"][y1:y2, x1:x2].reshape(-1, 3)
            if o["class"] == "tile":  # the letter covers the centre of some tiles; most of it is tile colour
                assert (patch == rgb).all(-1).mean() > 0.4
                assert (patch == vm.LETTER_COLOURS[o["letter_colour"]]).all(-1).sum() >= 3 * (x2 - x1)
            else:
                cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
                assert (s["image"][cy - 1:cy + 2, cx - 1:cx + 2] == rgb).all()
                assert 0.4 < (patch == rgb).all(-1).mean() < 1.0 or o["shape"] == "square"
        # the muted background (everything outside the boxes) stays in 90..170, away from object colours
        free = np.ones(s["image"].shape[:2], bool)
        for o in s["objects"]:
            free[o["box"][1]:o["box"][3], o["box"][0]:o["box"][2]] = False
        assert 90 <= s["image"][free].min() and s["image"][free].max() <= 170


def test_position_tint_makes_place_visible():
    """With a tint, red-minus-green of the background rises left to right and blue-minus-green top to
    bottom, by the configured amount, whatever the random blobs; without one it stays level."""
    def background_slope(config, axis, channel):
        diffs = []
        for i in range(12):
            s = vm.make_scene(i, seed=5, split="train", config=config)
            img = s["image"].astype(np.float64)
            free = np.ones(img.shape[:2], bool)
            for o in s["objects"]:
                free[o["box"][1]:o["box"][3], o["box"][0]:o["box"][2]] = False
            d = np.where(free, img[..., channel] - img[..., 1], np.nan)
            profile = np.nanmean(d, axis=1 - axis)  # mean over the other axis
            diffs.append(np.nanmean(profile[-40:]) - np.nanmean(profile[:40]))
        return np.mean(diffs), np.std(diffs)

    tinted = vm.WorldConfig(position_tint=80)
    for axis, channel in ((1, 0), (0, 2)):  # x -> red, y -> blue
        mean, spread = background_slope(tinted, axis, channel)
        assert 60 < mean < 80 and spread < 5, (axis, mean, spread)  # 80 * (448 - 40) / 448 end to end
    assert abs(background_slope(tinted, 0, 0)[0]) < 3  # red does not depend on y
    assert abs(background_slope(vm.WorldConfig(), 1, 0)[0]) < 15


def test_format_question_and_crop_box():
    assert vm.format_question("Q?", ["a", "b"]) == "Question: Q?\nOptions: \nA. a\nB. b\n\n"
    assert vm.crop_box([10, 20, 440, 100], pad=16, size=448) == [0.0, 4.0, 448.0, 116.0]


def test_question_for_poses_another_question():
    s = next(s for s in SCENES if s["kind"] == "letter")
    q, options, answer = vm.question_for(s["objects"], s["target_ids"], "letter_colour", np.random.default_rng(0))
    assert answer == s["objects"][s["target_ids"][0]]["letter_colour"] and answer in options and "tile" in q


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="colour_of_sky"):
        vm.WorldConfig(kinds=("shape", "colour_of_sky"))


def test_tfds_round_trip(tmp_path, monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    data = vstar_mini_tfds.load(str(tmp_path), seed=5, num_train=16, num_test=8)
    assert (len(data["train"]), len(data["test"])) == (16, 8)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert any("vstar_mini-test.array_record" in p.name for p in files)
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = vstar_mini_tfds.load(str(tmp_path), seed=5, num_train=16, num_test=8)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes and len(again["test"]) == 8
    for i in (0, 5, 7):
        got, want = again["test"][i], vm.make_scene(i, seed=5, split="test")
        assert got.pop("index") == i
        assert set(got) == set(want)
        for k in want:
            if k == "image":
                assert got[k].dtype == np.uint8 and np.array_equal(got[k], want[k])
            else:
                assert got[k] == want[k] and type(got[k]) is type(want[k]), k
    # another seed is another dataset next to it
    other = vstar_mini_tfds.load(str(tmp_path), seed=6, num_train=16, num_test=8)
    assert not np.array_equal(other["train"][0]["image"], again["train"][0]["image"])
    assert len(os.listdir(tmp_path / "vstar_mini")) == 2


def test_perception_probe_picks_the_best_scored_candidate_per_scene():
    """With a scorer that prefers the reply with fewer tokens, every family's accuracy is the fraction of
    scenes whose shortest candidate is the right one, computed here independently from the candidates."""
    tok = build_tokenizer(vocab_size=1024, corpus=default_corpus() + tasks.corpus())
    world = vm.WorldConfig(kinds=("letter_colour",))
    scenes = [vm.make_scene(i, seed=4, split="test", config=world) for i in range(5)]
    budgets = tasks.Budgets(112 * 112, CropSpec(448, 448, 112 * 112, 112 * 112), box_grid=56)
    shapes = Shapes(seq_len=640, prompt_patches=64, crop_patches=132, max_crops=1)
    score = lambda params, traj: -traj.loss_mask.sum(1)  # noqa: E731
    out = probes.perception_probe(score, None, scenes, tok, budgets, shapes, batch=8, put=lambda t: t, fetch=np.asarray)

    n_tokens = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    def expected(candidates, right):  # first shortest wins, as argmax does
        lengths = [n_tokens(c) for c in candidates]
        return candidates[int(np.argmin(lengths))] == right
    options = np.mean([expected(s["options"], s["answer"]) for s in scenes])
    boxes = []
    for s in scenes:
        cands = sorted({tuple(tasks.zoom_box(o["box"], budgets, 448)) for o in s["objects"] if o["size"] == "small"})
        texts = [json.dumps({"bbox_2d": [round(v) for v in b]}) for b in cands]
        right = json.dumps({"bbox_2d": [round(v) for v in tasks.zoom_box(s["target_box"], budgets, 448)]})
        boxes.append(expected(texts, right))
    assert out["no_crop"] == out["gt_crop"] == options
    assert out["grounding"] == np.mean(boxes)
    assert out["chance"] == 0.25 and 1 / 6 <= out["grounding_chance"] <= 1 / 4


STRIPED = vm.WorldConfig(kinds=("stripes", "large_colour"), small_size=(84, 100), large_size=(120, 170),
                         num_small=(3, 5), tile_detail="stripes", stripe_width=2)


def _restriped(scene, orientation):
    """The scene with its target tile's stripes redrawn in another orientation."""
    image, target = scene["image"].copy(), dict(scene["objects"][scene["target_ids"][0]], stripes=orientation)
    x1, y1, x2, y2 = target["box"]
    image[y1:y2, x1:x2] = vm.COLOURS[target["colour"]]
    vm._draw_stripes(image, target, STRIPED.stripe_width)
    return image


def test_striped_tiles_are_unreadable_in_the_scene_and_readable_in_a_zoom():
    """The hard detail of the striped world: the four orientations give the same scene at the 112 x 112 budget
    (a 0.1 grey-level mean difference; a few edge pixels differ by <= 24), while a 2x zoom on the target's cell
    shows them clearly apart; every scene has a striped tile, and a hard question's answer is its target's
    orientation."""
    scenes = [vm.make_scene(i, seed=1, split="train", config=STRIPED) for i in range(40)]
    for s in scenes:
        tiles = [o for o in s["objects"] if o["class"] == "tile"]
        assert tiles and all(o["stripes"] in vm.STRIPES and o["letter"] == "" for o in tiles)
        if s["hard"]:
            target = s["objects"][s["target_ids"][0]]
            assert s["kind"] == "stripes" and s["answer"] == target["stripes"] and s["options"][0] in vm.STRIPES
            x1, y1, x2, y2 = target["box"]
            assert 84 <= x2 - x1 <= 100
    s = next(s for s in scenes if s["hard"])
    grid = tasks.Budgets(1, CropSpec(448, 448, 1, 1), box_grid=112)
    cell = [int(v) for v in tasks.zoom_box(s["target_box"], grid, 448)]

    def shown(image, size):  # the processor's resize
        return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.float32)

    views = [_restriped(s, o) for o in vm.STRIPES]
    scene = [shown(v, 112) for v in views]
    zoom = [shown(v[cell[1]:cell[3], cell[0]:cell[2]], 224) for v in views]
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(scene[a] - scene[b]).mean() < 1.0 and np.abs(scene[a] - scene[b]).max() <= 24
            assert np.abs(zoom[a] - zoom[b]).mean() > 20
    with pytest.raises(ValueError, match="need tiles with another detail"):
        vm.WorldConfig(kinds=("letter",), tile_detail="stripes")


def test_answered_box_reads_only_a_well_formed_bbox():
    from deepeyes_jax.vstar_mini.skills import answered_box
    assert answered_box('<think>x</think>\n<answer>{"bbox_2d": [1, 2, 30.5, 40]}</answer>') == [1.0, 2.0, 30.5, 40.0]
    for bad in ("<answer>red</answer>", '<answer>{"bbox_2d": [1, 2, 3]}</answer>',
                '<answer>{"box": [1,2,3,4]}</answer>',
                '<answer>{"bbox_2d": ["a", 2, 3, 4]}</answer>', '<answer>[1, 2, 3, 4]</answer>', ""):
        assert answered_box(bad) is None, bad


def test_generated_skills_score_the_answered_box_and_the_asked_zooms_aim(monkeypatch):
    """Grounding: the answered box's IoU with the target (0 when the reply holds none); asked zooms: executed at
    all, and aimed (their zoom's IoU >= 0.5; a row without a zoom counts as a miss)."""
    import types
    from deepeyes_jax.vstar_mini import skills
    replies = ['<answer>{"bbox_2d": [0, 0, 112, 112]}</answer>', '<answer>{"bbox_2d": [224, 0, 336, 112]}</answer>',
               "<answer>no box</answer>"]
    monkeypatch.setattr(skills, "take_rows", lambda traj, rows: rows)
    monkeypatch.setattr(skills, "turns_of", lambda host, i, tok: [{"text": replies[i]}])
    truth = (10, 10, 100, 100)  # IoU 0.65 with the first answer, 0 with the second
    records = [types.SimpleNamespace(box=truth)] * 3
    rows = [dict(batch=0, row=i, category="grounding", index=i) for i in range(3)] + [
        dict(batch=0, row=3 + i, category="asked", index=i, zooms=z, grounding_iou=iou, has_grounding=float(z > 0))
        for i, (z, iou) in enumerate([(1, 0.7), (1, 0.2), (0, 0.0), (2, 0.5)])]
    out = skills.generated_skills(types.SimpleNamespace(outputs=[(None, None, None)], rows=rows), records, None)
    assert out["grounding_iou50"] == pytest.approx(1 / 3)
    assert out["grounding_mean_iou"] == pytest.approx((8100 / 12544) / 3)
    assert out["tool_call_when_asked"] == 0.75 and out["tool_call_aim_iou50"] == 0.5


def test_the_shipped_base_model_was_trained_for_the_default_config():
    """`python -m launch.train` starts from vstar_mini/pretrained: its manifest's settings digest is the default
    config's (a change to the world, budgets, architecture or supervised stage needs a new base model), and it
    fits the repository budget of 25 MB. Its recorded skill table (measured by `launch.pretrain_base` on held-out
    scenes) meets the V*-mini targets the README states: crop reading >= 0.9, no-crop <= chance + 0.1, grounding
    >= 0.8, a well-formed tool call when asked >= 0.95."""
    from configs.vstar_mini import get_config
    from deepeyes_jax.vstar_mini import base_model
    from deepeyes_jax.vstar_mini.experiment import SHIPPED_BASE_MODEL, base_settings
    manifest = base_model.read_manifest(SHIPPED_BASE_MODEL)
    assert manifest["settings_digest"] == base_model.settings_digest(base_settings(get_config()))
    assert manifest["command"].startswith("python -m launch.pretrain_base") and manifest["steps"] > 0
    skills = manifest["skills"]
    assert skills["hard_accuracy_gt_crop"] >= 0.9 and skills["hard_accuracy_no_crop"] <= skills["chance"] + 0.1
    assert skills["grounding_iou50"] >= 0.8 and skills["tool_call_when_asked"] >= 0.95
    size = sum(os.path.getsize(os.path.join(SHIPPED_BASE_MODEL, f)) for f in os.listdir(SHIPPED_BASE_MODEL))
    assert size <= 25 * 2**20



def test_a_first_cycle_must_match_the_settings_and_have_no_refining_cycle():
    """`launch.pretrain_base --first_cycle=DIR` runs only the refining cycle on DIR's base model: DIR must hold a
    finished one (a manifest), trained for the config's settings apart from `vstar_mini.refine`, without a
    refining cycle of its own; each refusal names the directory and what is wrong."""
    import copy

    from configs.vstar_mini import get_config
    from deepeyes_jax.vstar_mini import base_model
    from deepeyes_jax.vstar_mini.experiment import SHIPPED_BASE_MODEL, base_settings, check_first_cycle
    ours = base_settings(get_config())
    first = copy.deepcopy(ours)
    first["refine"]["steps"] = 0
    check_first_cycle("d", {"settings": first}, ours)
    check_first_cycle("d", {"settings": {k: v for k, v in ours.items() if k != "refine"}}, ours)  # older manifests
    with pytest.raises(FileNotFoundError, match="--first_cycle=d holds no finished base model"):
        check_first_cycle("d", None, ours)
    with pytest.raises(ValueError, match=r"--first_cycle=d already had a refining cycle \(600 steps\)"):
        check_first_cycle("d", {"settings": ours}, ours)
    other = copy.deepcopy(first)
    other["sft"]["steps"] += 1
    other["init_seed"] = 3
    with pytest.raises(ValueError, match=r"--first_cycle=d was trained for other settings \(init_seed, sft differ\)"):
        check_first_cycle("d", {"settings": other}, ours)
    # the shipped base model's first cycle is the default config's
    shipped = base_model.read_manifest(SHIPPED_BASE_MODEL)
    check_first_cycle(SHIPPED_BASE_MODEL, dict(shipped, settings=dict(shipped["settings"], refine=first["refine"])),
                      ours)


def test_object_map_marks_each_object_as_drawn():
    """The object map names the object make_scene painted on each pixel: objects do not overlap (layout rules),
    so an object's box centre is its own id and it lies inside its box; its pixels are >= 99% its colour, the
    shade of its stripes or its letter's colour, and the background's (textured grey) almost never those."""
    for s in [vm.make_scene(i, seed=1, split="train", config=STRIPED) for i in range(10)] + SCENES[:10]:
        omap = vm.object_map(s["objects"], 448)
        assert omap.shape == (448, 448) and omap.dtype == np.uint8
        for i, o in enumerate(s["objects"]):
            x1, y1, x2, y2 = o["box"]
            assert omap[(y1 + y2) // 2, (x1 + x2) // 2] == i + 1 and not (omap[:, :x1] == i + 1).any()
            rgb = np.array(vm.COLOURS[o["colour"]])
            inks = [rgb, np.round(rgb * 0.4)] + ([np.array(vm.LETTER_COLOURS[o["letter_colour"]])] if o["letter"] else [])
            pixels = s["image"][omap == i + 1].astype(int)
            assert np.mean([any((p == ink).all() for ink in inks) for p in pixels[::7]]) >= 0.99
            assert np.mean((s["image"][omap == 0].astype(int) == rgb).all(-1)) < 0.01


def test_vision_stage_labels_name_what_lies_under_each_token():
    """The dense labels of the vision stage: a scene's token at the large object's centre has its colour and size
    and its own grid cell, a crop's token at a striped tile's centre its orientation; the heads a view is not
    asked (stripes of a scene, position in a crop) are ignored."""
    from deepeyes_jax.vstar_mini import vision_stage as vs
    scenes = [vm.make_scene(i, seed=1, split="train", config=STRIPED) for i in range(12)]
    colours, n = list(vm.COLOURS), 16  # a 16 x 16 grid of 28 px tokens: one lies inside the large object
    for s in scenes:
        omap = vm.object_map(s["objects"], 448)
        labels = vs.token_labels(s["objects"], omap, (0, 0, 448), (n, n), scene=True)
        assert labels.shape == (n * n, len(vs.HEADS)) and (labels[:, 2] == vs.IGNORE).all()
        assert (labels[:, 3] == np.arange(n * n) // n).all() and (labels[:, 4] == np.arange(n * n) % n).all()
        large = s["objects"][0]
        x1, y1, x2, y2 = large["box"]
        t = (y1 + y2) // 2 // 28 * n + (x1 + x2) // 2 // 28
        assert labels[t, 0] == 1 + colours.index(large["colour"]) and labels[t, 1] == 2
        assert labels[0, 0] == 0 or omap[:28, :28].mean() > 0  # the corner is background unless covered
        o = next(o for o in s["objects"] if o["class"] == "tile")
        bx1, by1, bx2, by2 = o["box"]
        crop = vs.token_labels(s["objects"], omap, (bx1 - 8, by1 - 8, bx2 - bx1 + 16), (8, 8), scene=False)
        centre = crop[3 * 8 + 3]  # the token left of and above the crop's middle, inside the tile
        assert centre[0] == 1 + colours.index(o["colour"]) and centre[1] == 1
        assert centre[2] == 1 + vm.STRIPES.index(o["stripes"])
        assert (crop[:, 3:] == vs.IGNORE).all() and (crop[:8, 0] == 0).all()  # the 8 px pad row is background


def test_vision_stage_trains_the_tower_in_place_and_compiles_once(monkeypatch):
    """A few steps of the vision stage on a tiny tower: the loss falls, the model's vision weights (and only they)
    change, the step is traced once, and the held-out report has every head's accuracy in [0, 1]."""
    import jax
    from flax import nnx
    from deepeyes_jax.testing.factory import tiny_model
    from deepeyes_jax.vstar_mini import vision_stage as vs
    scenes = [vm.make_scene(i, seed=2, split="train", config=STRIPED) for i in range(24)]
    budgets = tasks.Budgets(112 * 112, CropSpec(448, 448, 224 * 224, 224 * 224), box_grid=112)
    model = tiny_model()
    fc2, lm_head = np.array(model.visual.merger.fc2.kernel.value), np.array(model.lm_head.kernel.value)
    traced, forward = [], vs._forward
    monkeypatch.setattr(vs, "_forward", lambda *a: traced.append(1) or forward(*a))
    stage = vs.VisionStageConfig(steps=24, batch=4, learning_rate=3e-3, warmup=2)
    report = vs.train_tower(model, scenes, budgets, stage, seed=0, put=jax.device_put, fetch=jax.device_get,
                            log_every=4)
    assert len(traced) == 1 and report["steps"] == 24 and len(report["history"]) == 6
    first, last = report["history"][0], report["history"][-1]
    assert last["loss"] < 0.7 * first["loss"], report["history"]
    assert not np.allclose(fc2, model.visual.merger.fc2.kernel.value)
    assert np.array_equal(lm_head, model.lm_head.kernel.value)
    held = vs.evaluate_tower(model, report["head"], scenes[:8], budgets, put=jax.device_put, fetch=jax.device_get,
                             batch_size=4)
    assert set(held) == {f"vision_{name}" for name, _ in vs.HEADS} and all(0 <= v <= 1 for v in held.values())
