"""The shapes world: the procedural scenes, referring expressions and stage data that let every part of
TinyGroundingGPT run and be measured offline (the project's `shakespeare_char`); train.py's shapes preset (the
tiny model, its tower pretraining, each phase's samples); the fixed REC/POPE evaluation splits in the real
formats, the baselines, and the small tokenizer.

    python shapes.py splits --out data/shapes [--n 500]     # rec_{val,testA,testB}.jsonl, pope_*.jsonl
    python shapes.py baselines --split data/shapes/rec_testA.jsonl
    python shapes.py tokenizer --out assets/shapes/tokenizer.json
"""

import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from data import (
    DEFAULT_SYSTEM,
    SPECIAL_TOKENS,
    STAGE2_KINDS,
    Tokenizer,
    capitalized,
    caption_sample,
    format_box,
    grounding_conversation_sample,
    grounding_description_sample,
    iou,
    patches_in_box,
    pixels_to_box,
    rec_sample,
    spoken_list,
    with_article,
)
from encoders import VisionConfig
from model import Qwen2Config, TinyGroundingGPT, TinyGroundingGPTConfig

SHAPES_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes", "tokenizer.json")


# ----------------------------------------------------------------------------- the shapes world: scenes

SHAPES = {"circle": 4, "square": 3, "triangle": 3, "diamond": 2}  # name -> sampling weight (POPE "popular")
COLORS = {  # name -> (RGB, sampling weight)
    "red": ((215, 45, 45), 5), "green": ((45, 165, 65), 4), "blue": ((45, 85, 215), 4),
    "yellow": ((235, 205, 40), 3), "purple": ((140, 65, 185), 3), "orange": ((240, 135, 30), 2),
}
BACKGROUNDS = {"grey": (128, 128, 128), "dark grey": (70, 70, 75), "beige": (185, 175, 150),
               "slate": (95, 110, 125), "olive": (100, 105, 75), "light grey": (205, 205, 200)}
NOISE_SIDE = 640  # the largest image side the precomputed noise covers


@dataclass
class SceneConfig:
    """Scene difficulty. A training preset can make a curriculum of it: one big object first, more later."""
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.3  # object side / short side; tiny objects leave a 112 px model nothing to see
    max_size: float = 0.5
    min_side: int = 160  # the image's long side in pixels
    max_side: int = 320
    duplicate_prob: float = 0.3  # chance a new object repeats an earlier one's shape: relations become needed

    def __post_init__(self):
        if not (1 <= self.min_objects <= self.max_objects and 0 < self.min_size <= self.max_size < 1
                and 14 <= self.min_side <= self.max_side <= NOISE_SIDE and 0 <= self.duplicate_prob <= 1):
            raise ValueError(f"a SceneConfig needs 1 <= min_objects <= max_objects, 0 < min_size <= max_size < 1, "
                             f"14 <= min_side <= max_side <= {NOISE_SIDE}, 0 <= duplicate_prob <= 1; got {self}")


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str  # "small" | "big": two bands of object sizes with a gap between them, so the words are clear
    box: tuple  # pixels (x1, y1, x2, y2), x2/y2 exclusive
    rgb: tuple  # the colour drawn (the named colour, jittered)

    @property
    def category(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list
    noise_offset: tuple  # where this scene's window lies in the shared noise pool

    def draw(self) -> Image.Image:
        ox, oy = self.noise_offset
        img = Image.fromarray(_noisy_background(self.background)[oy:oy + self.height, ox:ox + self.width])
        draw = ImageDraw.Draw(img)
        for o in self.objects:
            x1, y1, x2, y2 = o.box[0], o.box[1], o.box[2] - 1, o.box[3] - 1  # drawn extent is inclusive
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            if o.shape == "circle":
                draw.ellipse([x1, y1, x2, y2], fill=o.rgb)
            elif o.shape == "square":
                draw.rectangle([x1, y1, x2, y2], fill=o.rgb)
            elif o.shape == "triangle":
                draw.polygon([(x1, y2), (x2, y2), (cx, y1)], fill=o.rgb)
            else:
                draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=o.rgb)
        return img

    def box(self, o: ShapeObject) -> list[float]:
        return pixels_to_box(o.box, self.width, self.height)


_BACKGROUND_POOL = {}


def _noisy_background(name: str) -> np.ndarray:
    """A NOISE_SIDE^2 noisy plane of one background colour, made once per process; a scene's background is a
    window of it, so drawing costs a copy (drawing noise per scene cost 2.2 ms a sample)."""
    if name not in _BACKGROUND_POOL:
        noise = np.random.default_rng(0).integers(-14, 15, (NOISE_SIDE, NOISE_SIDE, 3))
        _BACKGROUND_POOL[name] = np.clip(noise + BACKGROUNDS[name], 0, 255).astype(np.uint8)
    return _BACKGROUND_POOL[name]


def make_scene(rng: random.Random, cfg: SceneConfig | None = None) -> Scene:
    """A random scene: image size and aspect, background, and non-overlapping objects with known boxes."""
    cfg = cfg or SceneConfig()
    long_side = rng.randint(cfg.min_side, cfg.max_side)
    aspect = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9])
    short_side = round(long_side / aspect)
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    mid = math.sqrt(cfg.min_size * cfg.max_size)  # the size words' boundary, with a 12% gap on each side
    objects = []
    for _ in range(rng.randint(cfg.min_objects, cfg.max_objects)):
        for _attempt in range(20):
            if objects and rng.random() < cfg.duplicate_prob:
                shape = rng.choice(objects).shape
            else:
                shape = rng.choices(list(SHAPES), weights=list(SHAPES.values()))[0]
            color = rng.choices(list(COLORS), weights=[w for _, w in COLORS.values()])[0]
            size = rng.choice(["small", "big"])
            lo, hi = (cfg.min_size, max(cfg.min_size, mid / 1.12)) if size == "small" else (
                min(cfg.max_size, mid * 1.12), cfg.max_size)
            side = max(4, round(rng.uniform(lo, hi) * min(width, height)))
            x, y = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x, y, x + side, y + side)
            gap = 3
            if all(box[0] >= o.box[2] + gap or o.box[0] >= box[2] + gap or box[1] >= o.box[3] + gap
                   or o.box[1] >= box[3] + gap for o in objects):
                rgb = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[color][0])
                objects.append(ShapeObject(shape, color, size, box, rgb))
                break
    offset = (rng.randint(0, NOISE_SIDE - width), rng.randint(0, NOISE_SIDE - height))
    return Scene(width, height, rng.choice(list(BACKGROUNDS)), objects, offset)


# ----------------------------------------------------------------------------- the shapes world: expressions
# Grammar (the resolver parses exactly what the generator writes):
#   the NP | the NP {left of|right of|above|below} the NP | the {leftmost|...} NP | the {second|third} NP from
#   the {left|right|top|bottom};  NP = [small|big] [colour] shape.

NP = rf"(?:(small|big) )?(?:({'|'.join(COLORS)}) )?({'|'.join(SHAPES)})"
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # axis, direction
SIDES = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}  # axis, sort sign
SUPERLATIVES = {"leftmost": "left", "rightmost": "right", "topmost": "top", "bottommost": "bottom"}
ORDINALS = {"second": 1, "third": 2}
EXPRESSION_RES = [
    ("np", re.compile(rf"the {NP}")),
    ("relation", re.compile(rf"the {NP} ({'|'.join(RELATIONS)}) the {NP}")),
    ("superlative", re.compile(rf"the ({'|'.join(SUPERLATIVES)}) {NP}")),
    ("ordinal", re.compile(rf"the ({'|'.join(ORDINALS)}) {NP} from the ({'|'.join(SIDES)})")),
]


def _np_matches(scene: Scene, size, color, shape) -> list[int]:
    return [k for k, o in enumerate(scene.objects)
            if o.shape == shape and (size is None or o.size == size) and (color is None or o.color == color)]


def _holds(scene: Scene, t: int, r: int, axis: int, sign: int, margin: float) -> bool:
    """Object t lies on side `sign` of object r along `axis` by more than `margin`, and that offset is at
    least half the offset across (a circle far to the left and a little lower is not "below")."""
    (tx, ty), (rx, ry) = scene.objects[t].centre, scene.objects[r].centre
    along, across = (tx - rx, ty - ry) if axis == 0 else (ty - ry, tx - rx)
    return sign * along > margin and abs(along) > abs(across) / 2 - max(0.0, -margin)


def resolve(expression: str, scene: Scene, loose: bool = False) -> list[int]:
    """Indices of the objects `expression` refers to. Positions compare centres with a margin of 8% of the
    short side: strict counts only clear cases, loose (negative margin) also borderline ones. An expression
    is unambiguous for object t iff both give [t] (no other object is even borderline)."""
    margin = 0.08 * min(scene.width, scene.height) * (-1 if loose else 1)
    for form, regex in EXPRESSION_RES:
        m = regex.fullmatch(expression)
        if m is None:
            continue
        g = m.groups()
        if form == "np":
            return _np_matches(scene, *g)
        if form == "relation":
            targets, (axis, sign) = _np_matches(scene, *g[:3]), RELATIONS[g[3]]
            refs = _np_matches(scene, *g[4:])
            if not loose and len(refs) != 1:
                return []
            return [t for t in targets if any(t != r and _holds(scene, t, r, axis, sign, margin)
                                              for r in refs)]
        side, rank, np_groups = ((SUPERLATIVES[g[0]], 0, g[1:4]) if form == "superlative"
                                 else (g[4], ORDINALS[g[0]], g[1:4]))
        axis, sign = SIDES[side]
        matches = sorted(_np_matches(scene, *np_groups), key=lambda k: sign * scene.objects[k].centre[axis])
        if len(matches) <= rank:
            return []
        chosen = scene.objects[matches[rank]].centre[axis]
        near = [k for k in matches if abs(scene.objects[k].centre[axis] - chosen) <= abs(margin)]
        return near if loose else ([matches[rank]] if near == [matches[rank]] else [])
    raise ValueError(f"{expression!r} is not an expression of the shapes world (grammar above data.resolve)")


def unambiguous(expression: str, scene: Scene, target: int) -> bool:
    return resolve(expression, scene) == [target] and resolve(expression, scene, loose=True) == [target]


def _noun_phrases(o: ShapeObject) -> list[str]:
    return [o.shape, f"{o.color} {o.shape}", f"{o.size} {o.shape}", f"{o.size} {o.color} {o.shape}"]


def attribute_expressions(scene: Scene, target: int) -> list[str]:
    """testA style: attributes only ("the red circle", "the circle" when it is the only one)."""
    phrases = _noun_phrases(scene.objects[target])
    return [e for e in (f"the {p}" for p in phrases) if unambiguous(e, scene, target)]


def relation_candidates(scene: Scene, target: int) -> list[str]:
    """testB style, not yet checked: relations and order, only for noun phrases that alone match several
    objects; the reference object is named by its shortest unambiguous attribute expression."""
    candidates, refs = [], None
    for phrase in _noun_phrases(scene.objects[target]):
        if len(_np_matches(scene, *re.fullmatch(NP, phrase).groups())) < 2:
            continue
        if refs is None:
            refs = [(attribute_expressions(scene, r) or [None])[0]
                    for r in range(len(scene.objects)) if r != target]
        candidates += [f"the {s} {phrase}" for s in SUPERLATIVES]
        candidates += [f"the {o} {phrase} from the {s}" for o in ORDINALS for s in SIDES]
        candidates += [f"the {phrase} {rel} {ref}" for ref in refs if ref for rel in RELATIONS]
    return candidates


def referring_expression(scene: Scene, target: int, rng: random.Random, kind: str = "any") -> str | None:
    """One random unambiguous expression for the target: kind "attribute", "relation", or "any" (attributes
    two times in three when both exist). None when the target cannot be told apart. Candidates are tried in
    random order and the first unambiguous one wins: the same choice as among all, for less work."""
    attribute = attribute_expressions(scene, target) if kind != "relation" else []
    if kind == "attribute" or (attribute and rng.random() < 2 / 3):
        return rng.choice(attribute) if attribute else None
    candidates = relation_candidates(scene, target)
    rng.shuffle(candidates)
    found = next((e for e in candidates if unambiguous(e, scene, target)), None)
    return found or (rng.choice(attribute) if attribute else None)


# ----------------------------------------------------------------------------- shapes world: stage samples

COUNTS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight"]


def position_words(scene: Scene, o: ShapeObject) -> str:
    """Coarse position in a 3x3 grid of the image ("at the top left", "in the centre"): stage-1 captions name
    it so that the model learns where things are before it must output coordinates (a pre-project lever)."""
    cx, cy = o.centre
    col = ["left", "", "right"][min(2, int(3 * cx / scene.width))]
    row = ["top", "", "bottom"][min(2, int(3 * cy / scene.height))]
    if row and col:
        return f"at the {row} {col}"
    return f"at the {row}" if row else (f"on the {col}" if col else "in the centre")


def _reading_order(scene: Scene) -> list[ShapeObject]:
    return sorted(scene.objects, key=lambda o: (int(3 * o.centre[1] / scene.height), o.centre[0]))


def shapes_caption(scene: Scene, rng: random.Random) -> str:
    parts = [f"a {o.size} {o.color} {o.shape} {position_words(scene, o)}" for o in _reading_order(scene)]
    n, background = len(parts), f"{with_article(scene.background)} background"
    if rng.random() < 0.5:
        return f"{capitalized(spoken_list(parts))}, on {background}."
    objects = f"{COUNTS[n]} object{'s' * (n != 1)}"
    return f"There {'is' if n == 1 else 'are'} {objects} on {background}: {spoken_list(parts)}."


def name_objects(scene: Scene, rng: random.Random, count: int) -> list[dict]:
    """Up to `count` objects in random order, each named by an unambiguous expression (with its article:
    "the red circle"). Naming is most of a sample's cost, so a sample names only the objects it asks about."""
    named = []
    for k in rng.sample(range(len(scene.objects)), len(scene.objects)):
        expression = referring_expression(scene, k, rng) if len(named) < count else None
        if expression:
            named.append({"name": expression, "box": scene.box(scene.objects[k])})
    return named


def relation_target(scene: Scene, rng: random.Random) -> dict | None:
    """An object of the scene named by a relation or its order (testB's kinds of expression: "the second
    circle from the left"), or None when no object can be named so."""
    for k in rng.sample(range(len(scene.objects)), len(scene.objects)):
        expression = referring_expression(scene, k, rng, "relation")
        if expression:
            return {"name": expression, "box": scene.box(scene.objects[k])}
    return None


def shapes_grounded(scene: Scene, image, named: list[dict]) -> dict:
    """A scene as a grounded image: the named objects, then the others by their box alone (name None: fit
    for options and relations, never asked about), and a description naming every object with its box."""
    named_boxes = [o["box"] for o in named]
    others = [{"name": None, "box": scene.box(o)} for o in scene.objects if scene.box(o) not in named_boxes]
    description = capitalized(spoken_list([f"a {o.size} {o.color} {o.shape} {format_box(scene.box(o))} "
                                         f"{position_words(scene, o)}" for o in _reading_order(scene)]))
    return {"image": image, "width": scene.width, "height": scene.height, "objects": named + others,
            "descriptions": [f"{description}, on {with_article(scene.background)} background."]}


def pope_question(category: str) -> str:
    return f"Is there {with_article(category)} in the image?"


def pope_negatives(scene: Scene, setting: str, rng: random.Random) -> list[str]:
    """Absent categories ordered for one POPE setting: random; popular (most frequent in the world first);
    adversarial (sharing a shape or colour with a present object, the confusable ones, popular first)."""
    present = {o.category for o in scene.objects}
    weight = {f"{c} {s}": cw * sw for c, (_, cw) in COLORS.items() for s, sw in SHAPES.items()}
    absent = [c for c in weight if c not in present]
    rng.shuffle(absent)
    if setting == "popular":
        absent.sort(key=lambda c: -weight[c])
    elif setting == "adversarial":
        confusable = lambda c: any(set(c.split()) & set(p.split()) for p in present)
        absent.sort(key=lambda c: (not confusable(c), -weight[c]))
    elif setting != "random":
        raise ValueError(f"POPE setting must be random, popular or adversarial, got {setting!r}")
    return absent


def pope_sample(scene: Scene, image, rng: random.Random) -> dict:
    """Stage 3: a POPE-style yes/no question about an object category, half of them absent."""
    if rng.random() < 0.5:
        category, answer = rng.choice(scene.objects).category, "Yes."
    else:
        category, answer = pope_negatives(scene, rng.choice(["random", "adversarial"]), rng)[0], "No."
    turns = [{"from": "human", "value": "<image>\n" + pope_question(category)},
             {"from": "gpt", "value": answer}]
    return {"image": image, "conversations": turns}


# Stage 3 keeps REC, as LLaVA-v1.5-mix665k keeps RefCOCO/VG region data: without it the model forgets the short
# answer format of "Output the coordinate of ..." (26% -> 5% testA without it). With the attention loss 30% REC
# keeps it, and 60% POPE questions lift POPE most; half the REC asks by relations and order, which stage 2 asks
# in only 11% of its expressions (docs/experiments.md, "Stage 3", "Relations and order in stage 3").
STAGE3_KINDS = {"conversation": 0.05, "description": 0.05, "pope": 0.6, "rec": 0.15, "rec_relation": 0.15}
STAGE_NAMES = {"stage1-pretrain": 1, "stage1": 1, "1": 1, "stage2": 2, "2": 2, "stage3": 3, "3": 3}


class ShapesStageData:
    """On-the-fly samples of the shapes world for one training stage, map-style and deterministic: sample i
    is a function of (seed, stage, i) only, so every DataLoader worker and every resume sees the same data.
    Stage 1: captions naming coarse positions. Stage 2: the multi-scale kinds (STAGE2_KINDS). Stage 3:
    grounding conversations, grounding descriptions, POPE-style yes/no questions and REC, by any expression or
    by a relation or order alone (STAGE3_KINDS)."""

    def __init__(self, stage: str, length: int, seed: int = 0, scene: SceneConfig | None = None,
                 kinds: dict[str, float] | None = None):
        """kinds: sample kind -> share, replacing the stage's mix (STAGE2_KINDS, STAGE3_KINDS); unnamed: none."""
        if str(stage) not in STAGE_NAMES:
            raise ValueError(f"stage must be one of {sorted(STAGE_NAMES)}, got {stage!r}")
        self.stage, self.level, self.length, self.seed = str(stage), STAGE_NAMES[str(stage)], length, seed
        self.scene = scene or SceneConfig()
        mix = {2: {k: share for k, (_, share) in STAGE2_KINDS.items()}, 3: dict(STAGE3_KINDS)}.get(self.level, {})
        if kinds:
            if set(kinds) - set(mix) or min(kinds.values()) < 0 or not sum(kinds.values()) > 0:
                raise ValueError(f"{self.stage} samples are of the kinds {', '.join(mix) or 'caption, and no other'}"
                                 f", with shares >= 0 and a positive sum; got {kinds}")
            mix = dict(kinds)
        if mix.get("rec_relation") and (self.scene.max_objects < 2 or self.scene.duplicate_prob == 0):
            raise ValueError("rec_relation samples need scenes with repeated shapes (max_objects >= 2, "
                             f"duplicate_prob > 0), or a mix without them (--shapes_kinds); got {self.scene}")
        self.kinds = mix

    def __len__(self):
        return self.length

    def __getitem__(self, i: int) -> dict:
        scene, sample = self._make(i)
        return {**sample, "image": scene.draw()}

    def conversations(self, i: int) -> list[dict]:
        """Sample i's text without drawing its image (what length grouping needs)."""
        return self._make(i)[1]["conversations"]

    def _make(self, i: int) -> tuple[Scene, dict]:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} of {self.length}")
        rng = random.Random(f"shapes:{self.seed}:{self.stage}:{i}")
        while True:  # a scene whose objects no expression tells apart is redrawn (rare)
            scene = make_scene(rng, self.scene)
            if self.level == 1:
                return scene, caption_sample(None, shapes_caption(scene, rng), rng, f"{self.stage}-{i}")
            named = name_objects(scene, rng, 1 if self.level == 2 else 3)
            if not named:
                continue
            grounded = shapes_grounded(scene, None, named)
            if self.level == 2:  # the named object is the target (REC when the drawn kind cannot be made)
                kind = rng.choices(list(self.kinds), weights=list(self.kinds.values()))[0]
                sample = STAGE2_KINDS[kind][0](grounded, rng, named[0]) or rec_sample(grounded, rng, named[0])
            else:
                kind = rng.choices(list(self.kinds), weights=list(self.kinds.values()))[0]
                if kind == "rec_relation":  # the kind is kept: scenes are redrawn until it can be asked
                    while not (target := relation_target(scene, rng)):
                        scene = make_scene(rng, self.scene)
                    grounded = shapes_grounded(scene, None, [target])
                    return scene, {"id": f"{self.stage}-{i}", **rec_sample(grounded, rng, target)}
                sample = (grounding_conversation_sample({**grounded, "objects": named}, rng)
                          if kind == "conversation" else grounding_description_sample(grounded, rng)
                          if kind == "description" else rec_sample(grounded, rng, named[0])
                          if kind == "rec" else pope_sample(scene, None, rng))
            return scene, {"id": f"{self.stage}-{i}", **sample}


# ----------------------------------------------------------------------------- train.py's shapes preset

CATEGORIES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]  # patch classes 1..24; 0: background


def patch_targets(scene: Scene, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense targets on the padded square's grid x grid patches: the class of the object whose box holds the
    patch centre (1 + CATEGORIES index; 0 for background) [grid*grid], and that object's normalized box
    [grid*grid, 4] (zeros on background). Boxes never overlap, so each patch has at most one object."""
    classes, boxes = torch.zeros(grid * grid, dtype=torch.long), torch.zeros(grid * grid, 4)
    for o in scene.objects:
        box = scene.box(o)
        inside = patches_in_box(box, grid)
        classes[inside] = 1 + CATEGORIES.index(o.category)
        boxes[inside] = torch.tensor(box)
    return classes, boxes


class TowerData:
    """Scenes with their dense patch targets for pretrain_towers (the shapes world's stand-in
    for CLIP's and DINOv2's pretraining): item i -> (pixels [T, 3, S, S], classes [P], boxes [P, 4]), a
    function of (seed, i) only."""

    def __init__(self, length: int, processor, grid: int, seed: int = 0):
        self.length, self.processor, self.grid, self.seed = length, processor, grid, seed

    def __len__(self):
        return self.length

    def __getitem__(self, i: int):
        scene = make_scene(random.Random(f"shapes:{self.seed}:towers:{i}"))
        return (self.processor(scene.draw()), *patch_targets(scene, self.grid))


# train.py plugs the toy world in at three places: these settings (PRESET, PHASE_SETTINGS), a new model with
# pretrained towers (new_model, pretrain_towers), and each phase's samples (stage_data).

PRESET = dict(  # train.py's defaults under --preset shapes: a tiny model trained from scratch on a CPU
    out_dir="runs/shapes",
    stage="all",
    micro_batch_size=32,
    dtype="float32",  # on a CPU bf16 is no faster (measured with autocast: its attention backward is slow)
    num_workers=1,
    ckpt_every=100,
    log_every=25,
    max_len=256,
    # lengths follow the sample kind here, so length-sorted megabatches would give batches of one kind; a
    # stage-2 run with them spiked and collapsed into repeated digits: mixed batches
    length_group=1,
    # the answer loss alone never taught the shapes LM to look where the question points; this loss did
    # (docs/experiments.md)
    attention_loss=1.0,
)
# `--budget full`: the shipped model's recipe, ~4.6-5.2 h on a 2-core CPU: longer tower pretraining, the quickstart's
# stage 1, a stage 2 of 40,000 steps and a 4,800-step stage 3 (each doubling from 1,200 steps: POPE +4 to +10
# points, REC the same).
# The attention loss starts at stage-2 step 18,000: from a random LM it held the answer loss back, once the LM
# read boxes it paid (docs/experiments.md)
FULL_BUDGET = dict(out_dir="runs/shapes-full", tower_steps=1500, shapes_samples="3200,3200,1280000,153600",
                   attention_loss=1.0, attention_loss_from=18000)
PHASE_SETTINGS = {  # random weights: every phase trains the LM, at far larger learning rates than fine-tuning
    "stage1-pretrain": dict(trains="llm+projector", lr=2e-3, batch_size=32, epochs=1.0),
    "stage1": dict(trains="llm+projector", lr=1e-3, batch_size=32, epochs=1.0),
    "stage2": dict(trains="llm+projector", lr=2e-3, batch_size=32, epochs=1.0),
    # each sample's answer weighs the same: with the token mean, POPE's one-word answers were ~3% of the loss
    # and POPE stayed the weak spot (+4 to +11 points with this, REC the same: docs/experiments.md)
    "stage3": dict(trains="llm+projector", lr=5e-4, batch_size=32, epochs=1.0, loss_mean="sample"),
}


def new_model(max_len: int = 256) -> TinyGroundingGPT:
    """The tiny model of the shapes world, random: two 3-layer towers of width 64 at 112 px (8x8 patches of
    14 px), and a Qwen2-style LM of 4 blocks of width 128 (4 query heads, 2 key/value heads) over the
    shapes tokenizer's 662 tokens. Its towers are its own (pretrain_towers), so their last block is the
    feature layer."""
    tok = Tokenizer.from_file(SHAPES_TOKENIZER)
    tower = dict(hidden_size=64, num_layers=3, num_heads=4, mlp_size=256, patch_size=14, image_size=112,
                 feature_layer=-1)
    llm = Qwen2Config(vocab_size=tok.sampleable_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True,
                      max_position_embeddings=max_len)
    return TinyGroundingGPT(TinyGroundingGPTConfig(
        vision=[VisionConfig(kind="clip", **tower), VisionConfig(kind="dinov2", **tower)], llm=llm,
        image_token_id=tok.image_pad_id, object_token_id=tok.object_pad_id, pad_token_id=tok.pad_id,
        stop_token_ids=tok.stop_ids, sampleable_size=tok.sampleable_size, object_tokens=4))


def pretrain_towers(model: TinyGroundingGPT, steps: int, seed: int, schedule, num_workers: int = 1,
                    log_every: int = 25, grad_clip: float = 1.0, batch_size: int = 64) -> None:
    """The shapes world's stand-in for CLIP's and DINOv2's pretraining, so that the stages, like the paper's,
    start from frozen towers whose patch features already say what is where: each tower of `model` learns,
    per patch, the class of the object there (colour x shape, or background) and that object's box, through
    a linear head that is then dropped. schedule(step) -> learning rate. Without it the LM must learn to see
    and to ground at once, and stalls (docs/experiments.md)."""
    device = model.llm.embed_tokens.weight.device
    towers = model.encoder.towers
    towers.requires_grad_(True).train()
    outputs = [1 + len(CATEGORIES), 4]  # class logits, box
    heads = torch.nn.ModuleList(torch.nn.Linear(t.config.hidden_size, sum(outputs)) for t in towers).to(device)
    params = [*towers.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=schedule(0), weight_decay=0.0)
    dataset = TowerData(steps * batch_size, model.encoder.processor, towers[0].grid, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    print(f"towers: {steps} steps of {batch_size} scenes, per-patch class + box, lr {schedule(0):.2e} at step 0")
    for step, batch in enumerate(loader):
        pixels, target_class, target_box = (t.to(device, non_blocking=True) for t in batch)  # [B,T,3,S,S] [B,P]..
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        loss, report, on_object = 0.0, [], target_class > 0  # [B, P]
        for t, (tower, head) in enumerate(zip(towers, heads)):
            logits, box = head(tower(pixels[:, t])).split(outputs, dim=-1)  # [B, P, classes], [B, P, 4]
            box_error = (box[on_object] - target_box[on_object]).abs().mean()  # L1 in units of the side
            # x10: box errors are fractions of the side (~0.5 at init, ~0.02 trained), class losses ~3 -> ~0.1
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target_class.flatten()) + 10 * box_error
            accuracy = (logits.argmax(-1) == target_class).float().mean()
            report.append(f"{tower.config.kind} acc {accuracy:.3f} box L1 {box_error:.3f}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if step % log_every == 0 or step + 1 == steps:
            print(f"towers {step + 1:>6}/{steps} | loss {loss.item():.4f} | lr {schedule(step):.2e} | "
                  + " | ".join(report), flush=True)
    towers.requires_grad_(False).eval()


def stage_data(phase: str, samples: str, kinds: str = "", scene: str = "", seed: int = 0) -> ShapesStageData:
    """One phase's samples from train.py's flags: samples "N1,N2,N3,N4" per epoch of stage1-pretrain, stage1,
    stage2, stage3; kinds "rec:1,pope:1" (sample kind: share; empty: the stage's mix); scene SceneConfig fields
    "min_objects=2,max_objects=2". A bad value raises ValueError."""
    sizes = [int(n) for n in samples.split(",")]
    if len(sizes) != len(PHASE_SETTINGS):
        raise ValueError(f"--shapes_samples takes {len(PHASE_SETTINGS)} numbers ({', '.join(PHASE_SETTINGS)})")
    fields = {f.name: f.type for f in dataclasses.fields(SceneConfig)}
    scene_values = dict(item.split("=") for item in scene.split(",") if item)
    if set(scene_values) - set(fields):
        raise ValueError(f"--shapes_scene takes {', '.join(fields)}; got {scene!r}")
    scene_config = SceneConfig(**{k: fields[k](v) for k, v in scene_values.items()})
    shares = {k: float(v) for k, v in (item.split(":") for item in kinds.split(",") if item)}
    return ShapesStageData(phase, dict(zip(PHASE_SETTINGS, sizes))[phase], seed=seed, scene=scene_config,
                           kinds=None if phase.startswith("stage1") else shares)


# ----------------------------------------------------------------------------- shapes eval splits, baselines

EVAL_SCENES = {  # split -> (scene difficulty, expression kind)
    "testA": (SceneConfig(min_objects=1, max_objects=4), "attribute"),
    "testB": (SceneConfig(min_objects=3, max_objects=5, duplicate_prob=0.6), "relation"),
}


def write_shapes_splits(out: str, n: int = 500, seed: int = 0):
    """Fixed eval files in the real formats: rec_{val,testA,testB}.jsonl in the RefCOCO jsonl layout (one
    expression per scene; PNGs under images/, paths relative to the jsonl; "scene_objects" added for the
    baselines) and pope_{random,popular,adversarial}.jsonl in POPE's layout (n questions each, half "yes",
    on the same images). Seeds differ from every training stream."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for split in ("val", "testA", "testB"):
        with open(os.path.join(out, f"rec_{split}.jsonl"), "w") as f:
            for i in range(n):
                rng = random.Random(f"eval:{seed}:{split}:{i}")
                config, kind = EVAL_SCENES[split if split != "val" else ("testA", "testB")[i % 2]]
                while True:
                    scene = make_scene(rng, config)
                    target = rng.randrange(len(scene.objects))
                    expression = referring_expression(scene, target, rng, kind)
                    if expression:
                        break
                path = f"images/{split}_{i:05d}.png"
                scene.draw().save(os.path.join(out, path))
                objects = [{"bbox": list(o.box), "shape": o.shape, "color": o.color, "size": o.size}
                           for o in scene.objects]
                row = {"img_path": path, "expression": expression, "bbox": list(scene.objects[target].box),
                       "width": scene.width, "height": scene.height, "scene_objects": objects}
                f.write(json.dumps(row) + "\n")
    files = {s: open(os.path.join(out, f"pope_{s}.jsonl"), "w") for s in ("random", "popular", "adversarial")}
    question_id, image_index = 0, 0
    while question_id < n:
        image_seed = f"eval:{seed}:pope:{image_index}"
        rng = random.Random(image_seed)
        scene = make_scene(rng, SceneConfig(min_objects=3, max_objects=5, duplicate_prob=0.0))
        path = f"images/pope_{image_index:05d}.png"
        scene.draw().save(os.path.join(out, path))
        present = sorted({o.category for o in scene.objects})
        k = min(3, len(present), (n - question_id + 1) // 2)
        positives = rng.sample(present, k)
        for setting, f in files.items():
            negatives = pope_negatives(scene, setting, random.Random(f"{image_seed}:{setting}"))
            qid = question_id
            for category, label in [(c, "yes") for c in positives] + [(c, "no") for c in negatives[:k]]:
                qid += 1
                if qid <= n:
                    f.write(json.dumps({"question_id": qid, "image": path, "text": pope_question(category),
                                        "label": label}) + "\n")
        question_id, image_index = question_id + 2 * k, image_index + 1
    for f in files.values():
        f.close()


def baselines(split_path: str, seed: int = 0) -> dict[str, float]:
    """Acc@0.5 of answers that do not look (random box, centre box of the split's mean size) or look only
    partly (a random object of the scene; a random object of the expression's shape, ignoring colour)."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in open(split_path) if line.strip()]
    mean_w = sum((r["bbox"][2] - r["bbox"][0]) / r["width"] for r in rows) / len(rows)
    mean_h = sum((r["bbox"][3] - r["bbox"][1]) / r["height"] for r in rows) / len(rows)

    def random_box(r):
        xs = sorted(rng.uniform(0, r["width"]) for _ in "xx")
        ys = sorted(rng.uniform(0, r["height"]) for _ in "yy")
        return [xs[0], ys[0], xs[1], ys[1]]

    def centre_box(r):
        w, h = mean_w * r["width"], mean_h * r["height"]
        return [(r["width"] - w) / 2, (r["height"] - h) / 2, (r["width"] + w) / 2, (r["height"] + h) / 2]

    def right_shape(r):
        shape = next(w for w in r["expression"].split() if w in SHAPES)  # the target's noun comes first
        return rng.choice([o for o in r["scene_objects"] if o["shape"] == shape])["bbox"]

    guesses = {"random box": random_box, "centre box": centre_box,
               "random object": lambda r: rng.choice(r["scene_objects"])["bbox"], "right shape": right_shape}
    return {name: sum(iou(guess(r), r["bbox"]) >= 0.5 for r in rows) / len(rows)
            for name, guess in guesses.items()}


# ----------------------------------------------------------------------------- the shapes tokenizer


def train_shapes_tokenizer(vocab_size: int = 640, samples_per_stage: int = 2000) -> tokenizers.Tokenizer:
    """Byte-level BPE trained on the shapes world's text, Qwen's pre-tokenizer (so digits are one token each)
    and Qwen2.5's special token names appended after the learned vocabulary, as in Qwen. Deterministic."""
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [DEFAULT_SYSTEM, "system\n", "user\n", "assistant\n"] * samples_per_stage  # in every sample
    for stage in ("stage1", "stage2", "stage3"):
        data = ShapesStageData(stage, samples_per_stage, seed=12345)
        corpus += [t["value"] for i in range(len(data)) for t in data.conversations(i)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok



# ----------------------------------------------------------------------------- commands


def main(argv: list[str]):
    parser = argparse.ArgumentParser(prog="shapes.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    splits = commands.add_parser("splits", help="write the REC and POPE evaluation splits")
    splits.add_argument("--out", default="data/shapes", help="folder for rec_*.jsonl, pope_*.jsonl and images")
    splits.add_argument("--n", type=int, default=500, help="questions per split")
    splits.add_argument("--seed", type=int, default=0)
    guesses = commands.add_parser("baselines", help="what guessing scores on a REC split")
    guesses.add_argument("--split", default="data/shapes/rec_testA.jsonl")
    guesses.add_argument("--seed", type=int, default=0)
    vocab = commands.add_parser("tokenizer", help="train the shapes tokenizer (deterministic)")
    vocab.add_argument("--out", default=SHAPES_TOKENIZER)
    vocab.add_argument("--vocab-size", type=int, default=640, help="learned tokens, before the special ones")
    args = parser.parse_args(argv)
    if args.command == "splits":
        write_shapes_splits(args.out, args.n, args.seed)
        print(f"wrote rec_{{val,testA,testB}}.jsonl and pope_{{random,popular,adversarial}}.jsonl to {args.out}")
    elif args.command == "baselines":
        for name, acc in baselines(args.split, args.seed).items():
            print(f"{name:14s} Acc@0.5 {100 * acc:5.1f}%")
    else:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        tok = train_shapes_tokenizer(args.vocab_size)
        tok.save(args.out, pretty=False)
        print(f"wrote {args.out}: {tok.get_vocab_size()} tokens, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
