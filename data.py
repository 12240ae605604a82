"""Training and evaluation data: boxes as text, the conversation format and its tokenization, readers for
the real datasets, the sample builders of the paper's stage-2/3 kinds (shared by real data, synth.py and the
shapes world of shapes.py), and batching.

Every box in this project is `[x1,y1,x2,y2]` with values in [0, 1], three decimals, relative to the
image padded to a square (pasted centred, LLaVA style). This file owns that convention.

Commands:
    python data.py convert SOURCE ... --out F.jsonl   # a real dataset as training samples; SOURCE is one of
        llava-pretrain, refcoco, rec-jsonl, vg, flickr30k (python data.py convert SOURCE --help)

RefCOCO's refs(unc|umd).p are pickles: read_refcoco loads them with an unpickler that builds only lists,
dicts, strings and numbers, so a planted file cannot run code.
"""

import argparse
import collections.abc
import json
import os
import pickle
import random
import re
import sys
import xml.etree.ElementTree as ET

import tokenizers
import torch
from PIL import Image

from encoders import ImageProcessor, crop_object, pad_to_square

# ----------------------------------------------------------------------------- boxes as text

_NUM = r"\s*([-+]?\d*\.?\d+)\s*"
BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def format_box(box) -> str:
    """[x1,y1,x2,y2] in [0,1] -> '[0.123,0.456,0.789,1.000]' (clamped, three decimals)."""
    return "[" + ",".join(f"{min(max(float(v), 0.0), 1.0):.3f}" for v in box) + "]"


def parse_boxes(text: str) -> list[list[float]]:
    """Every `[a,b,c,d]` in `text` (spaces tolerated), in order. Values are not clamped."""
    return [[float(g) for g in m.groups()] for m in BOX_RE.finditer(text)]


def pad_offsets(width: int, height: int) -> tuple[int, int, int]:
    """Side S of the padded square and the (left, top) offsets where the image is pasted."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def box_to_pixels(box, width: int, height: int) -> list[float]:
    """Normalized box on the padded square -> pixel box on the original image, clipped to it."""
    side, left, top = pad_offsets(width, height)
    x1, y1, x2, y2 = (v * side for v in box)
    clip = lambda v, hi: min(max(v, 0.0), float(hi))
    return [clip(x1 - left, width), clip(y1 - top, height), clip(x2 - left, width), clip(y2 - top, height)]


def pixels_to_box(box_px, width: int, height: int) -> list[float]:
    """Pixel box [x1,y1,x2,y2] on the original image -> normalized box on the padded square."""
    side, left, top = pad_offsets(width, height)
    x1, y1, x2, y2 = box_px
    return [(x1 + left) / side, (y1 + top) / side, (x2 + left) / side, (y2 + top) / side]


def patches_in_box(box, side: int) -> torch.Tensor:
    """Which of the padded square's side x side patches (row-major, as the towers' patch order) have their
    centre inside the normalized box -> bool [side * side]."""
    centres = (torch.arange(side) + 0.5) / side
    inside_x = (centres >= box[0]) & (centres < box[2])  # [side] columns
    inside_y = (centres >= box[1]) & (centres < box[3])  # [side] rows
    return (inside_y[:, None] & inside_x[None, :]).flatten()


def iou(a, b) -> float:
    """Intersection over union of two [x1,y1,x2,y2] boxes in the same frame; 0 for degenerate boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------- tokenizer and chat template

# Qwen2.5's added tokens (ids 151643-151664 there). The shapes tokenizer carries the same names, other ids.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
REC_PROMPT = "Output the coordinate of {}"  # the paper's REC prompt; training and evaluation both use this
IGNORE = -100  # label of tokens without loss
MARKER_RE = re.compile(r"(<image>|<object>)")
ROLES = {"human": "user", "gpt": "assistant"}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the tokens this project uses, looked up by name."""

    IDS = {
        "pad_id": "<|endoftext|>", "im_start_id": "<|im_start|>", "im_end_id": "<|im_end|>",
        "vision_start_id": "<|vision_start|>", "vision_end_id": "<|vision_end|>",
        "image_pad_id": "<|image_pad|>", "object_pad_id": "<|vision_pad|>",
    }

    def __init__(self, tok: tokenizers.Tokenizer, path: str = "<memory>"):
        # text is only ever text: "<|im_end|>" written by a user or found in a dataset is encoded as those
        # characters, never as the control token (no forged turns); this project adds the special tokens by id
        tok.encode_special_tokens = True
        self.tok, self.path = tok, path
        for attr, name in self.IDS.items():
            token_id = tok.token_to_id(name)
            if token_id is None:
                raise ValueError(f"{path}: the tokenizer has no {name} token; this project needs Qwen2.5's "
                                 f"special tokens ({', '.join(self.IDS.values())})")
            setattr(self, attr, token_id)
        self.stop_ids = [self.im_end_id, self.pad_id]
        # Qwen's embedding has padding rows above its last real token: generation must never sample them.
        self.sampleable_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        try:
            return cls(tokenizers.Tokenizer.from_file(path), path)
        except Exception as e:  # tokenizers' errors name no file ("No such file or directory (os error 2)")
            if isinstance(e, ValueError) and str(e).startswith(path):
                raise
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # Qwen never adds a BOS

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def encode_with_markers(tok: Tokenizer, text: str, num_image_tokens: int, num_object_tokens: int
                        ) -> list[int]:
    """Text -> ids; each `<image>` becomes vision_start + image_pad*N + vision_end, each `<object>` the same
    with object_pad. Text between markers is encoded on its own, as a tokenizer does at special tokens."""
    runs = {"<image>": [tok.image_pad_id] * num_image_tokens,
            "<object>": [tok.object_pad_id] * num_object_tokens}
    ids = []
    for part in MARKER_RE.split(text):
        if part in runs:
            ids += [tok.vision_start_id] + runs[part] + [tok.vision_end_id]
        elif part:
            ids += tok.encode(part)
    return ids


def encode_conversation(tok: Tokenizer, conversations: list[dict], num_image_tokens: int,
                        num_object_tokens: int, system: str | None = None) -> tuple[list[int], list[int]]:
    """ChatML ids and labels. Labels are IGNORE except on each assistant answer and its <|im_end|>:
    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{human}<|im_end|>\\n<|im_start|>assistant\\n
    {gpt}<|im_end|>\\n ... Markers are expanded in human turns (validate_sample keeps them out of answers)."""
    ids = [tok.im_start_id] + tok.encode("system\n" + (DEFAULT_SYSTEM if system is None else system))
    ids += [tok.im_end_id] + tok.encode("\n")
    labels = [IGNORE] * len(ids)
    for turn in conversations:
        role = ROLES[turn["from"]]
        if role == "user":
            turn_ids = encode_with_markers(tok, "user\n" + turn["value"], num_image_tokens, num_object_tokens)
            turn_labels = [IGNORE] * len(turn_ids)
        else:
            # Encoded as one string like the full template would be; the answer's tokens are those ending
            # after the header (a token straddling it, e.g. "\n\n" when the answer starts with "\n", counts).
            header = "assistant\n"
            enc = tok.tok.encode(header + turn["value"], add_special_tokens=False)
            turn_ids = enc.ids
            turn_labels = [i if end > len(header) else IGNORE for i, (_, end) in zip(enc.ids, enc.offsets)]
        ids += [tok.im_start_id] + turn_ids + [tok.im_end_id]
        labels += [IGNORE] + turn_labels + [tok.im_end_id if role == "assistant" else IGNORE]
        newline = tok.encode("\n")
        ids += newline
        labels += [IGNORE] * len(newline)
    return ids, labels


def encode_prompt(tok: Tokenizer, user_text: str, num_image_tokens: int, num_object_tokens: int,
                  system: str | None = None) -> list[int]:
    """A one-turn prompt ending with `<|im_start|>assistant\\n`, ready for generation."""
    ids, _ = encode_conversation(tok, [{"from": "human", "value": user_text}], num_image_tokens,
                                 num_object_tokens, system)
    return ids + [tok.im_start_id] + tok.encode("assistant\n")


# ----------------------------------------------------------------------------- the sample format, validated


class SampleError(ValueError):
    """A bad sample. `reason` is the short name under which skip mode counts it."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {reason}: {detail}")
        self.reason = reason


class SkipCounter:
    """Samples skipped for bad input, by reason. The counts live in a shared-memory tensor, one row per
    DataLoader worker (row 0: the main process), so skips found inside workers reach the training loop."""

    REASONS = ("malformed line", "bad sample", "bad box", "<object> without its box",
               "<image> without an image", "missing image", "corrupt image", "too long", "cut to max_len")

    def __init__(self, max_workers: int = 64):
        self.counts = torch.zeros(max_workers + 1, len(self.REASONS), dtype=torch.int64).share_memory_()
        self.first = {}  # reason -> the first such error's message, as this process saw it

    def add(self, reason: str, message: str = ""):
        worker = torch.utils.data.get_worker_info()
        self.counts[0 if worker is None else 1 + worker.id, self.REASONS.index(reason)] += 1
        self.first.setdefault(reason, message)

    def totals(self) -> dict[str, int]:
        return {r: int(n) for r, n in zip(self.REASONS, self.counts.sum(0)) if n}

    def __str__(self):
        totals = self.totals()
        return ", ".join(f"{n} {r}" for r, n in totals.items()) if totals else "no bad samples"


SKIPPED = SkipCounter()  # what `skip_bad=True` counts into; the training loop prints it at the end


def _counter(skip_bad) -> SkipCounter | None:
    return SKIPPED if skip_bad is True else (skip_bad or None)


def is_number(value) -> bool:
    """An int or float from JSON, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_box(box) -> bool:
    """[x1, y1, x2, y2] with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 (normalized on the padded square): the
    one test of a box from outside, for samples, the command line and the server."""
    return (isinstance(box, (list, tuple)) and len(box) == 4
            and all(is_number(v) and 0.0 <= v <= 1.0 for v in box)
            and box[0] < box[2] and box[1] < box[3])


def check_box(box, where: str):
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise SampleError(where, "bad box", f"{box!r} is not [x1,y1,x2,y2]")
    if not is_box(box):
        raise SampleError(where, "bad box", f"{box!r} must lie in [0,1] with x1<x2 and y1<y2 (normalized on "
                                            "the padded square; convert pixel boxes with data.pixels_to_box)")


def validate_sample(sample, where: str, image_root: str = "", check_file: bool = True):
    """Raise SampleError naming `where` if the sample breaks the format (the format: README, "Data")."""
    if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
        raise SampleError(where, "bad sample", "expected an object with a 'conversations' list")
    image = sample.get("image")
    if image is not None and not isinstance(image, (str, Image.Image)):
        raise SampleError(where, "bad sample", f"'image' must be a path, got {type(image).__name__}")
    if not isinstance(sample.get("objects") or [], list):
        raise SampleError(where, "bad sample", f"'objects' must be a list of boxes, got {sample['objects']!r:.60}")
    n_image = n_object = 0
    for k, turn in enumerate(sample["conversations"]):
        role = turn.get("from") if isinstance(turn, dict) else None
        if not (isinstance(role, str) and role in ROLES and isinstance(turn.get("value"), str)):
            raise SampleError(where, "bad sample", f"turn {k} is not {{'from': 'human'|'gpt', 'value': str}}")
        if turn["from"] == "gpt" and MARKER_RE.search(turn["value"]):
            raise SampleError(where, "bad sample", f"turn {k}: <image>/<object> belong in human turns only")
        n_image += turn["value"].count("<image>")
        n_object += turn["value"].count("<object>")
    if not any(t["from"] == "gpt" for t in sample["conversations"]):
        raise SampleError(where, "bad sample", "no 'gpt' turn: nothing to train on")
    has_image = sample.get("image") is not None
    if n_image > 1 or (has_image and n_image == 0):
        raise SampleError(where, "bad sample", f"an image needs exactly one <image> marker, found {n_image}")
    if (n_image or n_object) and not has_image:
        raise SampleError(where, "<image> without an image", "the text has <image>/<object> but no 'image'")
    boxes = sample.get("objects") or []
    for box in boxes:
        check_box(box, where)
    if n_object > len(boxes):
        raise SampleError(where, "<object> without its box",
                          f"{n_object} <object> markers but {len(boxes)} boxes in 'objects'")
    if check_file and isinstance(sample.get("image"), str):
        path = os.path.join(image_root, sample["image"])
        if not os.path.isfile(path):
            raise SampleError(where, "missing image", f"{path} does not exist (check --image_root)")


def read_records(path: str):
    """(where, parsed object or the error) for each record of a JSON list or a JSONL file. A line that is not
    UTF-8, not JSON, or nested past the parser's depth is an error record (skipped and counted, or named)."""
    raw = open(path, "rb").read()
    try:
        parsed = json.loads(raw.decode("utf-8"))
        if isinstance(parsed, list):
            yield from ((f"{path} item {k}", item) for k, item in enumerate(parsed))
            return
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        jsonl = path.endswith(".jsonl") or "Extra data" in str(e)  # "Extra data": JSONL named .json
        if not jsonl:
            line = getattr(e, "lineno", None) or raw[: getattr(e, "start", 0)].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not a JSON list ({type(e).__name__}: {str(e)[:200]})") from None
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError) as e:
                yield f"{path}:{lineno}", MalformedLine(f"{type(e).__name__}: {str(e)[:200]}")


class MalformedLine(str):
    """The error of a line that is not a JSON record (what read_records yields in its place)."""


def _located(sample: dict, where: str, image_root: str) -> dict:
    return {**sample, "where": where, "image_root": image_root}  # what SFTDataset needs to find the image


def load_samples(paths, image_root: str = "", skip_bad=False) -> list[dict]:
    """Samples from JSON (a list) or JSONL files (a str with commas or a list of paths), validated.
    Each sample gets "where" ("file:line") for later errors and "image_root" (its image path stays as given).
    A bad record raises SampleError, or with `skip_bad` (True: count into SKIPPED; or a SkipCounter) is
    skipped and counted."""
    paths = [p for p in paths.split(",") if p] if isinstance(paths, str) else list(paths)
    return _valid(((where, r) for path in paths for where, r in read_records(path)), image_root, _counter(skip_bad))


def _valid(records, image_root: str, counter, check_file: bool = True) -> list[dict]:
    """The (where, record) pairs that pass validate_sample, located; a bad one raises or is counted."""
    samples = []
    for where, record in records:
        try:
            if isinstance(record, MalformedLine):
                raise SampleError(where, "malformed line", record)
            validate_sample(record, where, image_root, check_file)
        except SampleError as e:
            if counter is None:
                raise
            counter.add(e.reason, str(e))
            continue
        samples.append(_located(record, where, image_root))
    return samples


# ----------------------------------------------------------------------------- readers of the real datasets
# Referring records: {"image", "width", "height", "expression", "bbox" (pixels xyxy), "where"}.
# Grounded images: {"image", "width", "height", "objects": [{"name", "box" (normalized, padded square)}]}, the
# input of the stage-2/3 builders below; optional "descriptions": texts with boxes already inside.

# LLaVA's brief-description instructions (LLaVA paper, Table 8): stage 1 samples one per caption.
BRIEF_INSTRUCTIONS = [
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.", "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]


def caption_sample(image, caption: str, rng: random.Random, sample_id="") -> dict:
    """A stage-1 sample: a sampled brief instruction before or after <image>, the caption as the answer."""
    instruction = rng.choice(BRIEF_INSTRUCTIONS)
    prompt = f"{instruction}\n<image>" if rng.random() < 0.5 else f"<image>\n{instruction}"
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]}


def read_llava_pretrain(path: str, image_root: str = "", seed: int = 0, skip_bad=False,
                        check_file: bool = True) -> list[dict]:
    """LLaVA-Pretrain: `blip_laion_cc_sbu_558k.json` (already conversations with a sampled instruction) or its
    `_meta.json` ({"id", "image", "blip_caption"}), whose captions get an instruction sampled here."""
    rng = random.Random(seed)

    def with_instruction(record):
        if isinstance(record, dict) and "conversations" not in record and "blip_caption" in record:
            return caption_sample(record.get("image"), record["blip_caption"], rng, record.get("id"))
        return record
    records = ((where, with_instruction(record)) for where, record in read_records(path))
    return _valid(records, image_root, _counter(skip_bad), check_file)


# LLaVA-v1.5-mix665k and ShareGPT4V are in the sample format already (text-only samples too): load_samples.


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that refuses every class and function: the published refs pickles hold only lists, dicts,
    strings and numbers (opcodes of their own), while a planted payload must name a callable to run."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a refs pickle of plain data: refusing it")


def read_refcoco(instances_json: str, refs_pickle: str, split: str, image_dir: str = "") -> list[dict]:
    """RefCOCO/+/g as published: COCO `instances.json` + `refs(unc).p` / `refs(umd).p` (a pickled list of
    {ref_id, ann_id, image_id, split, sentences: [{sent}]}); one record per sentence of `split`."""
    coco = json.load(open(instances_json))
    images = {im["id"]: im for im in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    with open(refs_pickle, "rb") as f:
        try:
            refs = PlainDataUnpickler(f, encoding="latin1").load()  # the published pickles are Python 2's
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{refs_pickle}: {e}") from None
    records = []
    for ref in refs:
        if ref["split"] != split:
            continue
        image, (x, y, w, h) = images[ref["image_id"]], anns[ref["ann_id"]]["bbox"]  # COCO boxes are xywh
        for k, sentence in enumerate(ref["sentences"]):
            where = f"{refs_pickle} ref {ref['ref_id']} sentence {sentence.get('sent_id', k)}"  # one per expression
            records.append({"image": os.path.join(image_dir, image["file_name"]), "width": image["width"],
                            "height": image["height"], "expression": sentence["sent"],
                            "bbox": [x, y, x + w, y + h], "where": where})
    if not records:
        splits = sorted({r["split"] for r in refs})
        raise ValueError(f"{refs_pickle}: no refs in split {split!r}; it has {splits}")
    return records


def read_rec_jsonl(path: str, image_dir: str = "", skip_bad=False) -> list[dict]:
    """The common REC jsonl layout: {"img_path", "expression", "bbox": [x1,y1,x2,y2] pixels, "width",
    "height"} (Shikra's REC_refcoco_unc_val.jsonl, and the shapes eval splits). A bad row raises SampleError
    naming file and line, or with `skip_bad` (as load_samples) is counted and skipped."""
    records, counter = [], _counter(skip_bad)
    for where, r in read_records(path):
        try:
            records.append(_rec_record(where, r, image_dir))
        except SampleError as e:
            if counter is None:
                raise
            counter.add(e.reason, str(e))
    return records


def _rec_record(where: str, r, image_dir: str) -> dict:
    if isinstance(r, MalformedLine):
        raise SampleError(where, "malformed line", r)
    if not isinstance(r, dict):
        raise SampleError(where, "bad sample", f"expected a JSON object, got {type(r).__name__}")
    if missing := [k for k in ("img_path", "expression", "bbox", "width", "height") if k not in r]:
        raise SampleError(where, "bad sample", f"missing keys {missing}")
    if not all(isinstance(r[k], str) and r[k] for k in ("img_path", "expression")):
        raise SampleError(where, "bad sample", "img_path and expression must be non-empty strings")
    width, height, bbox = r["width"], r["height"], r["bbox"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise SampleError(where, "bad sample", f"width and height must be positive integers, got {width!r}, "
                                               f"{height!r}")
    # pixel boxes may overshoot the image by a pixel's rounding: clipped; beyond that the row is wrong
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)
            and -1 <= bbox[0] < bbox[2] <= width + 1 and -1 <= bbox[1] < bbox[3] <= height + 1):
        raise SampleError(where, "bad box", f"bbox {bbox!r} is not [x1,y1,x2,y2] pixels inside the {width}x"
                                            f"{height} image")
    bbox = [min(max(v, 0), limit) for v, limit in zip(bbox, (width, height, width, height))]
    return {"image": os.path.join(image_dir, r["img_path"]), "width": width, "height": height,
            "expression": r["expression"], "bbox": bbox, "where": where}


def read_visual_genome(region_json: str, image_data_json: str, image_dir: str = "") -> list[dict]:
    """Visual Genome region descriptions -> grounded images. `region_descriptions.json`: [{"id", "regions":
    [{"region_id", "image_id", "phrase", "x", "y", "width", "height"}]}]; `image_data.json` gives sizes and
    the folder (VG_100K or VG_100K_2, from the url). Regions are clipped to the image; empty ones dropped."""
    meta = {m.get("image_id", m.get("id")): m for m in json.load(open(image_data_json))}
    grounded = []
    for entry in json.load(open(region_json)):
        m = meta[entry["id"]]
        w, h = m["width"], m["height"]
        folder = m["url"].rstrip("/").split("/")[-2] if m.get("url") else ""
        objects = []
        for r in entry["regions"]:
            x1, y1 = max(r["x"], 0), max(r["y"], 0)
            x2, y2 = min(r["x"] + r["width"], w), min(r["y"] + r["height"], h)
            if x2 > x1 and y2 > y1 and r["phrase"].strip():
                objects.append({"name": r["phrase"].strip(), "box": pixels_to_box([x1, y1, x2, y2], w, h)})
        grounded.append({"image": os.path.join(image_dir, folder, f"{entry['id']}.jpg"), "width": w,
                         "height": h, "objects": objects, "where": f"{region_json} image {entry['id']}"})
    return grounded


FLICKR_PHRASE_RE = re.compile(r"\[/EN#(\d+)((?:/[\w-]+)+) ([^\]]+)\]")


def _ground_sentence(line: str, boxes: dict, names: dict) -> str:
    """A Flickr30K Entities sentence with each `[/EN#id/type phrase]` replaced by the phrase and its boxes."""
    out, last = [], 0
    for m in FLICKR_PHRASE_RE.finditer(line):
        entity, phrase = m.group(1), m.group(3)
        names.setdefault(entity, phrase)
        found = boxes.get(entity) if entity != "0" else None  # EN#0: "notvisual"
        grounded = phrase + (" " + ";".join(format_box(b) for b in found) if found else "")
        out += [line[last:m.start()], grounded]
        last = m.end()
    return "".join(out) + line[last:]


def read_flickr30k_entities(root: str, image_ids: list[str], image_dir: str = "") -> list[dict]:
    """Flickr30K Entities (`Sentences/{id}.txt` with `[/EN#id/type phrase]` markup, `Annotations/{id}.xml`
    with 1-based inclusive pixel boxes) -> grounded images. "descriptions": each sentence with every boxed
    phrase followed by its boxes ("a dog [..]", several joined by ';'); "objects": entities with one box."""
    grounded = []
    for image_id in image_ids:
        xml = ET.parse(os.path.join(root, "Annotations", f"{image_id}.xml")).getroot()
        w, h = int(xml.find("size/width").text), int(xml.find("size/height").text)
        boxes: dict[str, list] = {}
        for obj in xml.findall("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue  # <nobndbox>: not visible, or the whole scene
            px = [int(bb.find(k).text) - 1 for k in ("xmin", "ymin", "xmax", "ymax")]
            for name in obj.findall("name"):  # one box may belong to several entities
                boxes.setdefault(name.text, []).append(pixels_to_box(px, w, h))
        names = {}  # entity -> its first phrase
        lines = open(os.path.join(root, "Sentences", f"{image_id}.txt"), encoding="utf-8").read().splitlines()
        descriptions = [_ground_sentence(line.strip(), boxes, names) for line in lines if line.strip()]
        objects = [{"name": names[e], "box": b[0]} for e, b in boxes.items() if len(b) == 1 and e in names]
        grounded.append({"image": os.path.join(image_dir, f"{image_id}.jpg"), "width": w, "height": h,
                         "objects": objects, "descriptions": descriptions,
                         "where": f"{root}/Annotations/{image_id}.xml"})
    return grounded


# ----------------------------------------------------------------------------- stage-2 and stage-3 builders
# Each builder takes a grounded image and a random.Random and returns one sample (None when the image cannot
# make that kind, e.g. a choice among objects needs two that do not overlap). Real data and the shapes world
# share them.

REG_PROMPTS = [
    "What is in the region {}? Answer with a short phrase.", "Describe the object at {} briefly.",
    "Give a short description of the region {}.", "Provide a referring expression for the object at {}.",
]
OBJECT_TO_BOX_PROMPTS = [REC_PROMPT.format("<object>"),
                         "Where is the object shown in <object> in the image? Answer with its coordinates."]
LETTERS = "ABCDEF"


def _sample(grounded: dict, human: str, answer: str, objects=()) -> dict:
    sample = {"image": grounded["image"], "conversations": [{"from": "human", "value": "<image>\n" + human},
                                                            {"from": "gpt", "value": answer}]}
    if objects:
        sample["objects"] = [list(b) for b in objects]
    return sample


def capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def group_referring(records: list[dict]) -> list[dict]:
    """Referring records -> one grounded image per image with one object per box (moved onto the padded
    square): its expressions in "names", the first also its "name"."""
    by_image = {}
    for r in records:
        grounded = by_image.setdefault(r["image"], {"image": r["image"], "width": r["width"],
                                                    "height": r["height"], "objects": []})
        box = pixels_to_box(r["bbox"], r["width"], r["height"])
        same = next((o for o in grounded["objects"] if o["box"] == box), None)
        if same is None:
            grounded["objects"].append({"name": r["expression"], "names": [r["expression"]], "box": box})
        elif r["expression"] not in same["names"]:
            same["names"].append(r["expression"])
    return list(by_image.values())


def rec_sample(grounded, rng, target=None):
    """text -> coordinates: the paper's REC prompt, the box as the answer."""
    obj = target or rng.choice(grounded["objects"])
    return _sample(grounded, REC_PROMPT.format(obj["name"]), format_box(obj["box"]))


def reg_sample(grounded, rng, target=None):
    """coordinates -> text: describe the region at a box."""
    obj = target or rng.choice(grounded["objects"])
    return _sample(grounded, rng.choice(REG_PROMPTS).format(format_box(obj["box"])), obj["name"])


def object_to_box_sample(grounded, rng, target=None):
    """object image -> coordinates: where is the object shown in this crop?"""
    obj = target or rng.choice(grounded["objects"])
    return _sample(grounded, rng.choice(OBJECT_TO_BOX_PROMPTS), format_box(obj["box"]), [obj["box"]])


def _options(grounded, rng, target, max_options=4):
    """The target among up to max_options objects whose boxes overlap neither it nor each other much (the
    paper filters high-IoU options); None when there is no distractor."""
    options = [target]
    for obj in rng.sample(grounded["objects"], len(grounded["objects"])):
        if len(options) < max_options and all(iou(obj["box"], o["box"]) < 0.5 for o in options):
            options.append(obj)
    if len(options) < 2:
        return None
    rng.shuffle(options)
    listing = " ".join(f"({LETTERS[k]}) <object>" for k in range(len(options)))
    return options, listing, f"({LETTERS[options.index(target)]})"


def _choice_sample(grounded, rng, target, question):
    """A choice among object images: `question(target)`, then the lettered options; the answer is a letter."""
    target = target or rng.choice(grounded["objects"])
    found = _options(grounded, rng, target)
    if found is None:
        return None
    options, listing, answer = found
    return _sample(grounded, f"{question(target)} {listing}", answer, [o["box"] for o in options])


def box_to_object_sample(grounded, rng, target=None):
    """coordinates -> object image: which of these crops shows the object at the box?"""
    return _choice_sample(grounded, rng, target,
                          lambda t: f"Which object image shows the object at {format_box(t['box'])}?")


def text_to_object_sample(grounded, rng, target=None):
    """text -> object image: which of these crops answers the question?"""
    return _choice_sample(grounded, rng, target, lambda t: f"Which of these object images shows {t['name']}?")


def relation(a, b) -> str:
    """Where box a lies relative to box b, along the axis where their centres differ most."""
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def relation_sample(grounded, rng, target=None):
    """object image <-> object image: where is the first crop's object relative to the second's?"""
    a = target or rng.choice(grounded["objects"])
    others = [o for o in grounded["objects"] if iou(o["box"], a["box"]) < 0.5]  # not a itself, by any name
    if not others:
        return None
    b = rng.choice(others)
    human = "Where is the object in <object> relative to the object in <object>?"
    answer = f"The first object is {relation(a['box'], b['box'])} the second."
    return _sample(grounded, human, answer, [a["box"], b["box"]])


# name -> (builder, share): the mix the shapes world and synth.py draw from (text<->coordinates 65%, far less than
# Table 7's 94%: the shapes preset was tuned with it); the real converters follow Table 7 (stage2_samples)
STAGE2_KINDS = {
    "rec": (rec_sample, 0.45), "reg": (reg_sample, 0.2), "object_to_box": (object_to_box_sample, 0.15),
    "box_to_object": (box_to_object_sample, 0.07), "text_to_object": (text_to_object_sample, 0.07),
    "relation": (relation_sample, 0.06),
}

CONVERSATION_QUESTIONS = [  # (question, answer) templates of the grounding conversation, about one object
    ("Where is {name}?", "{Name} is at {box}."),
    ("What is at {box}?", "{Name}."),
    ("Can you find {name}? Give its coordinates.", "Yes, {name} is at {box}."),
]


def grounding_conversation_sample(grounded, rng, rounds=3):
    """Stage 3: several rounds of point-to-point questions about objects of the image."""
    objects = rng.sample(grounded["objects"], min(rounds, len(grounded["objects"])))
    conversations = []
    for k, obj in enumerate(objects):
        q, a = rng.choice(CONVERSATION_QUESTIONS)
        fields = {"name": obj["name"], "Name": capitalized(obj["name"]), "box": format_box(obj["box"])}
        conversations += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q.format(**fields)},
                          {"from": "gpt", "value": a.format(**fields)}]
    return {"image": grounded["image"], "conversations": conversations}


DESCRIPTION_PROMPT = "Describe the image in detail, giving the coordinates of each object you mention."


def spoken_list(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def grounding_description_sample(grounded, rng):
    """Stage 3: a description of the whole image in which each mentioned object carries its box (the
    grounded image's own descriptions when it has them, as Flickr30K Entities does)."""
    if grounded.get("descriptions"):
        answer = " ".join(grounded["descriptions"])
    else:
        answer = "The image shows " + spoken_list([f"{o['name']} {format_box(o['box'])}"
                                                for o in grounded["objects"]]) + "."
    return _sample(grounded, DESCRIPTION_PROMPT, answer)


# Stage 2 from a referring dataset as Table 7 has it: every expression stays a text-coordinate pair (4.1M from
# RefCOCO/+/g and Visual Genome), and the object-image pairs come on top in proportion: image-coordinate 210K,
# text-image 46K. The paper does not split its text-coordinate pairs into REC and REG: every expression is a REC
# sample, and a share of them (REG_SHARE, our choice) also a REG sample.
REG_SHARE = 0.5
EXTRA_SHARES = {"image_coordinate": 210 / 4100, "text_image": 46 / 4100}  # x the text-coordinate pairs
EXTRA_KINDS = {"image_coordinate": ["object_to_box", "box_to_object"], "text_image": ["text_to_object", "relation"]}


def stage2_samples(grounded_images: list[dict], seed: int = 0, reg_share: float = REG_SHARE,
                   extra_shares: dict | None = None) -> list[dict]:
    """Table 7's stage-2 mix from grounded images: a REC sample for every expression of every object, a REG
    sample for `reg_share` of them, then image-coordinate and text-image samples, `extra_shares` (default
    EXTRA_SHARES) x the text-coordinate count each, on objects drawn at random (a kind the image cannot make
    is drawn again elsewhere). Images keep their order; the extra samples follow."""
    rng, samples = random.Random(seed), []
    targets = [(grounded, {**obj, "name": name}) for grounded in grounded_images for obj in grounded["objects"]
               for name in obj.get("names") or [obj["name"]]]
    for grounded, target in targets:
        samples.append(rec_sample(grounded, rng, target))
        if rng.random() < reg_share:
            samples.append(reg_sample(grounded, rng, target))
    text_coordinate = len(samples)
    for group, share in (EXTRA_SHARES if extra_shares is None else extra_shares).items():
        wanted, tries = round(share * text_coordinate), 0
        limit = 20 * wanted  # images that cannot make the group's kinds (one object) must not loop forever
        while wanted and targets and tries < limit:
            tries += 1
            grounded, target = rng.choice(targets)
            sample = STAGE2_KINDS[rng.choice(EXTRA_KINDS[group])][0](grounded, rng, target)
            if sample is not None:
                samples.append(sample)
                wanted -= 1
    return samples


PACK_TURNS = 8  # questions per packed conversation: RefCOCO has ~9 expressions per image, each answer ~20 tokens


def pack_by_image(samples: list[dict], turns: int = PACK_TURNS) -> list[dict]:
    """An image's one-question samples as conversations of up to `turns` rounds (LLaVA-1.5 packs RefCOCO so):
    the image's 576 tokens once for several ~20-token answers. `<image>` stays in the first question only, the
    object boxes are concatenated in the order of their `<object>` markers, and every answer is labelled as
    before; later answers also see the earlier rounds. Images keep the order of their first sample."""
    by_image = {}
    for sample in samples:
        by_image.setdefault(sample["image"], []).append(sample)
    packed = []
    for image, group in by_image.items():
        for start in range(0, len(group), max(1, turns)):
            conversations, objects = [], []
            for k, sample in enumerate(group[start : start + max(1, turns)]):
                question, answer = sample["conversations"]
                text = question["value"] if k == 0 else question["value"].removeprefix("<image>\n")
                conversations += [{"from": "human", "value": text}, answer]
                objects += sample.get("objects", [])
            packed.append({"image": image, "conversations": conversations, **({"objects": objects} if objects else {})})
    return packed


def stage3_samples(grounded_images: list[dict], seed: int = 0) -> list[dict]:
    """A grounding conversation and a grounding description for every grounded image with objects."""
    rng, samples = random.Random(seed), []
    for grounded in grounded_images:
        if grounded["objects"]:
            samples.append(grounding_conversation_sample(grounded, rng))
            samples.append(grounding_description_sample(grounded, rng))
    return samples


# ----------------------------------------------------------------------------- batching


MAX_IMAGE_PIXELS = 40_000_000  # ~6300 x 6300: any photo passes; a decompression bomb does not get decoded


class ImageTooLarge(ValueError):
    pass


def load_image(image, image_root: str = "", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from a path (under image_root), a file object or a PIL image. The size is read from the
    header and checked before any pixel is decoded (a 140 KB PNG can hold 12000 x 12000 pixels); unreadable
    or truncated files raise OSError, oversized ones ImageTooLarge. The limit bounds the square the image is
    padded to (encoders.pad_to_square), so a thin 400000 x 100 strip cannot ask for a 400000^2 canvas."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    source = image if hasattr(image, "read") else os.path.join(image_root, image)
    name = source if isinstance(source, str) else "the image"
    try:
        with Image.open(source) as img:
            side = max(img.width, img.height)
            if side * side > max_pixels:
                raise ImageTooLarge(f"{name} is {img.width}x{img.height}: padded to a square, {side * side:,} "
                                    f"pixels, over the limit of {max_pixels:,}")
            return img.convert("RGB")
    except Image.DecompressionBombError as e:  # Pillow's own, larger limit
        raise ImageTooLarge(f"{name}: {e}") from None


class SampleLengths(collections.abc.Sequence):
    """SFTDataset.lengths: dataset.length(i) for each i, counted when asked."""

    def __init__(self, dataset: "SFTDataset"):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        return self.dataset.length(i % len(self))


class SFTDataset(torch.utils.data.Dataset):
    """Samples (a list from load_samples/the readers, or ShapesStageData) -> tensors, in DataLoader workers:
    ChatML ids and labels, the global image [1, T, 3, S, S] and one crop per <object> [n, T, 3, S, S].
    Bad samples raise SampleError naming file and line, or with `skip_bad` (True: count into SKIPPED; or a
    SkipCounter) are counted and replaced by the next good sample. Samples longer than max_len are cut when
    every image placeholder survives the cut (counted as "cut to max_len"), else are bad ("too long")."""

    def __init__(self, samples, tokenizer: Tokenizer, processor: ImageProcessor, num_image_tokens: int,
                 num_object_tokens: int, max_len: int = 2048, skip_bad=False, system: str | None = None,
                 image_root: str = ""):
        self.samples, self.tok, self.processor = samples, tokenizer, processor
        self.num_image_tokens, self.num_object_tokens = num_image_tokens, num_object_tokens
        self.max_len = max_len
        self.skipped, self.system, self.image_root = _counter(skip_bad), system, image_root
        # token counts that every sample has (length): the system turn; each turn's <|im_start|>, <|im_end|>, "\n"
        self._system_tokens = len(encode_conversation(tokenizer, [], 0, 0, system)[0])
        self._tokens_per_turn = 2 + len(tokenizer.encode("\n"))

    def __len__(self):
        return len(self.samples)

    @property
    def lengths(self) -> "SampleLengths":
        """Token count of each sample, for length grouping: a sequence that counts sample i when asked (a
        batch sampler asks for the samples of one megabatch at a time), so that a run of millions of samples
        neither waits for nor holds them all."""
        return SampleLengths(self)

    def length(self, i: int) -> int:
        """Sample i's token count (placeholders included, capped at max_len), exactly as encode_conversation
        splits its text, without its image."""
        get = getattr(self.samples, "conversations", None)  # ShapesStageData: the text without drawing
        turns = get(i) if get else self.samples[i]["conversations"]
        n = self._system_tokens + self._tokens_per_turn * len(turns)
        marker_cost = {"<image>": self.num_image_tokens + 2, "<object>": self.num_object_tokens + 2}
        for turn in turns:
            for part in MARKER_RE.split(f"{ROLES[turn['from']]}\n{turn['value']}"):
                if part in marker_cost:
                    n += marker_cost[part]
                elif part:
                    n += len(self.tok.encode(part))
        return min(n, self.max_len)

    def __getitem__(self, i: int) -> dict:
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            try:
                return self._tensors(j)
            except SampleError as e:
                if self.skipped is None:
                    raise
                self.skipped.add(e.reason)
        raise RuntimeError("every sample of the dataset is bad; see SKIPPED")

    def _tensors(self, i: int) -> dict:
        sample = self.samples[i]
        where = sample.get("where", f"sample {i}")
        validate_sample(sample, where, self.image_root, check_file=False)
        ids, labels = encode_conversation(self.tok, sample["conversations"], self.num_image_tokens,
                                          self.num_object_tokens, self.system)
        if len(ids) > self.max_len:
            cut = ids[self.max_len:]
            if any(t in (self.tok.image_pad_id, self.tok.object_pad_id) for t in cut) or all(
                    v == IGNORE for v in labels[:self.max_len]):
                raise SampleError(where, "too long", f"{len(ids)} tokens > max_len={self.max_len}, and a cut "
                                                     "would drop an image or every answer")
            ids, labels = ids[:self.max_len], labels[:self.max_len]
            if self.skipped is not None:
                self.skipped.add("cut to max_len")
        images = objects = None
        text = "".join(t["value"] for t in sample["conversations"])
        if "<image>" in text:
            try:
                img = load_image(sample["image"], sample.get("image_root", self.image_root))
            except (OSError, ValueError) as e:  # missing, unreadable or truncated (PIL raises OSErrors)
                raise SampleError(where, "corrupt image", f"{sample['image']}: {e}") from None
            square = pad_to_square(img)  # once, for the image and its crops
            images = self.processor(square)[None]  # [1, T, 3, S, S]
            n_objects = text.count("<object>")
            if n_objects:
                crops = [self.processor(crop_object(square, box)) for box in sample["objects"][:n_objects]]
                objects = torch.stack(crops)  # [n, T, 3, S, S]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "images": images,
                "objects": objects, "pad_id": self.tok.pad_id}


def collate(items: list[dict]) -> dict:
    """Items of SFTDataset -> the batch contract (right padding with the tokenizer's pad id)."""
    longest = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), longest), items[0]["pad_id"], dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.bool)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = it["input_ids"], it["labels"], True
    images = [it["images"] for it in items if it["images"] is not None]
    objects = [it["objects"] for it in items if it["objects"] is not None]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "images": torch.cat(images) if images else None,  # [NI, T, 3, S, S]
            "objects": torch.cat(objects) if objects else None}  # [NO, T, 3, S, S]


# ----------------------------------------------------------------------------- commands


def atomic_write(path: str, text) -> None:
    """Write `text` (a str, or an iterable of str written in turn) to `path` so that a reader sees the old
    file or the whole new one, never a part: a temporary file, flushed to disk, then renamed."""
    with open(path + ".tmp", "w") as f:
        f.writelines([text] if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


# source -> (what it reads, its own options: (flag, help, default or None when required))
CONVERTERS = {
    "llava-pretrain": ("LLaVA-Pretrain captions (stage 1)",
                       [("--file", "blip_laion_cc_sbu_558k.json, or its _meta.json", None)]),
    "refcoco": ("RefCOCO/+/g as published (stage 2, or 3 with --stage 3)",
                [("--instances", "COCO's instances.json of the dataset", None),
                 ("--refs", "refs(unc).p or refs(umd).p", None), ("--split", "train, val, testA, ...", "train")]),
    "rec-jsonl": ("the common REC jsonl layout, as Shikra's REC_refcoco_unc_*.jsonl (stage 2 or 3)",
                  [("--file", "a .jsonl of {img_path, expression, bbox, width, height}", None)]),
    "vg": ("Visual Genome region descriptions (stage 2 or 3)",
           [("--regions", "region_descriptions.json", None), ("--image-data", "image_data.json", None)]),
    "flickr30k": ("Flickr30K Entities (stage 2 or 3)",
                  [("--root", "the folder with Annotations/ and Sentences/", None),
                   ("--ids", "a file of image ids, as train.txt", None)]),
}


IMAGE_PATHS = ("Image paths are written as --image-dir joined to the dataset's own paths: relative to the "
               "--image_root that training is given (or absolute, when --image-dir is).")


def convert(args) -> None:
    """Write a real dataset as a JSONL file of samples for `train.py --data1/2/3` (see IMAGE_PATHS)."""
    if args.source == "llava-pretrain":
        samples = read_llava_pretrain(args.file, check_file=False, seed=args.seed)
        samples = [{**s, "image": os.path.join(args.image_dir, s["image"])} if s.get("image") else s
                   for s in samples]
    else:
        if args.source == "refcoco":
            grounded = group_referring(read_refcoco(args.instances, args.refs, args.split, args.image_dir))
        elif args.source == "rec-jsonl":
            skipped = SkipCounter(max_workers=0)
            grounded = group_referring(read_rec_jsonl(args.file, args.image_dir, skip_bad=skipped))
            print(f"{args.file}: bad rows skipped: {skipped}")
        elif args.source == "vg":
            grounded = read_visual_genome(args.regions, args.image_data, args.image_dir)
        else:
            ids = open(args.ids).read().split()
            grounded = read_flickr30k_entities(args.root, ids, args.image_dir)
        if args.stage == "3":
            samples = stage3_samples(grounded, args.seed)
        else:
            extra = {group: getattr(args, f"{group}_share") for group in EXTRA_SHARES}
            samples = pack_by_image(stage2_samples(grounded, args.seed, args.reg_share, extra), args.turns)
    internal = ("where", "image_root")
    atomic_write(args.out, (json.dumps({"id": f"{args.source}-{k}", **{key: v for key, v in sample.items()
                                                                       if key not in internal}}) + "\n"
                            for k, sample in enumerate(samples)))
    print(f"wrote {len(samples)} samples to {args.out}")


def main(argv: list[str]):
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert_parser = commands.add_parser("convert", help="turn a real dataset into training samples (JSONL)",
                                         description="Turn a real dataset into training samples (JSONL). "
                                                     "python data.py convert SOURCE --help: SOURCE's options.")
    sources = convert_parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for source, (what, options) in CONVERTERS.items():
        p = sources.add_parser(source, help=what, description=f"{what}. {IMAGE_PATHS}")
        for flag, help_text, default in options:
            p.add_argument(flag, required=default is None, default=default, help=help_text)
        p.add_argument("--out", required=True, help="the JSONL file to write")
        p.add_argument("--image-dir", default="", help="folder of the images, relative to train.py's --image_root")
        if source != "llava-pretrain":
            p.add_argument("--stage", choices=["2", "3"], default="2",
                           help="2: the stage-2 sample kinds; 3: grounding conversations and descriptions")
            p.add_argument("--turns", type=int, default=PACK_TURNS,
                           help="stage 2: an image's questions per conversation (1: one sample per question)")
            p.add_argument("--reg-share", type=float, default=REG_SHARE,
                           help="stage 2: share of expressions that also give a REG sample (each gives a REC)")
            for group, share in EXTRA_SHARES.items():
                p.add_argument(f"--{group.replace('_', '-')}-share", type=float, default=share,
                               help=f"stage 2: {group.replace('_', '-')} samples per text-coordinate sample "
                                    "(Table 7's proportion)")
        p.add_argument("--seed", type=int, default=0, help="seed of the sampled instructions and kinds")
    args = parser.parse_args(argv)
    if args.command == "convert":
        convert(args)


if __name__ == "__main__":
    main(sys.argv[1:])
