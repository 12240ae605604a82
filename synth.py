"""The data synthesis pipeline (paper Sec. 3.2, Fig. 2b): images in, stage-2 multi-scale grounding samples and
stage-3 grounding conversations/descriptions out (data.py's sample format), by asking models over HTTP.

    python synth.py --images DIR_OR_LIST --out FILE.jsonl --vlm URL --vlm-model NAME --grounder URL

Per image: 1. recognize objects (VLM), 2. ground each (detector; low scores dropped), 3. relations (VLM),
4. QA generation (VLM, one prompt per kind of data), 5. filter (named thresholds in SynthConfig).

Output, one sample per line: "image" is the path relative to --images (train with that folder as image root),
"id" is "{image}#{n}:{kind}". Stage 2 kinds: object_to_box, box_to_object, rec, reg, text_to_object (data.py's
builders, over the grounded objects), relation_qa, object_choice (the model's QAs, objects as object images);
stage 3: grounding_conversation, grounding_description. Select a stage by the kind at the end of the id.

Protocols, all JSON over POST:
- VLM: any OpenAI-compatible `{vlm}/v1/chat/completions`; the image goes as a base64 data URL, temperature 0.
  API key, if any, from $SYNTH_API_KEY or $OPENAI_API_KEY.
- Grounder, `--grounder-kind detect` (ours): `POST {grounder}/detect {"image": data URL, "labels": [...],
  "box_threshold": t}` -> `{"detections": [{"label", "box": [x1,y1,x2,y2] in pixels of the sent image,
  "score"}]}`. Also accepted as the answer: raw GroundingDINO `{"boxes": [[cx,cy,w,h] normalized], "logits",
  "phrases"}` and transformers' post-processed `{"boxes": [xyxy pixels], "scores", "labels"}`
  (see detections_from_response). Key from $SYNTH_GROUNDER_API_KEY.
- Grounder, `--grounder-kind openai`: any chat model asked data.REC_PROMPT ("Output the coordinate of X") per
  label; the first [x1,y1,x2,y2] of the answer, normalized on the padded square, is the box (score 1.0).

Reliability: a request is retried with exponential backoff (Retry-After honoured) on 429, 5xx, timeouts,
broken connections and non-JSON bodies; 4xx is not retried. Successful responses are cached on disk under a
hash of the request, so a rerun costs nothing. A model answer that cannot be used (not JSON, cut off, wrong
shape) is logged, counted under "malformed" and skipped, never retried (at temperature 0 it would not change).
An image whose request fails for good is counted, not marked done, and redone by the next run. A finished
image's samples are appended and fsynced, then a line in `{out}.done` records it with the output's new length;
on start the output is cut back to the last recorded length. So `kill -9` at any moment followed by the same
command loses nothing and duplicates nothing.
"""

import argparse
import base64
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests
import urllib3
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import data
from data import REC_PROMPT, box_to_pixels, format_box, iou, parse_boxes, pixels_to_box

log = logging.getLogger("synth")

# ----------------------------------------------------------------------------- prompts
# The paper shows its prompts only as pictures (Appendix Figs. 7, 10-12); these follow what its text says of
# them. Each asks for JSON, so that answers can be checked. Objects are named by ids ("man-1") and mentions
# are marked as markdown links, "[the man](man-1)", rather than by copying boxes, which language models
# transcribe badly; the pipeline turns a mark into "the man [box]" or into an object image.

_HEAD = "You are annotating an image to build training data for a visual grounding model."
_OBJECTS = ("The objects in the image, as id: name [x1,y1,x2,y2] (coordinates from 0 to 1 on the image "
            "padded to a square):\n{objects}\n"
            "Relations among them (object1, relation, object2):\n{relations}\n")
_MARKS = ('Mark every mention of a listed object as a markdown link to its id, e.g. "[the dog](dog-1) chases '
          '[a ball](ball-1)".')
PROMPTS = {  # step -> prompt; the first line of each is unique
    "recognize": _HEAD + """ Step 1, object recognition: list the distinct objects visible in the image.
- List only objects that certainly exist in the image; if you are not sure something is there, leave it out.
  Every listed object is later located and described, so one invented object teaches the model to hallucinate.
- Use short noun phrases an open-vocabulary detector understands ("man", "red car", "wooden table"), one
  entry per kind of object, most salient first, at most {max_objects}. Skip the background as a whole.
Answer with JSON only: {{"objects": ["...", "..."]}}""",
    "relations": _HEAD + """ Step 3, relationship extraction.
The objects found in the image, as id: name [x1,y1,x2,y2] (from 0 to 1 on the image padded to a square):
{objects}
List the relationships between pairs of these objects that are clearly visible, as triples (object1,
relation, object2): spatial relations (on, under, next to, behind, left of), actions (holding, riding,
looking at), comparisons (bigger than, same colour as). Use the ids exactly as given.
Answer with JSON only: {{"relations": [["man-1", "riding", "horse-1"]]}}""",
    "fine_grained": _HEAD + """ Step 4, fine-grained grounding QAs, which align the three representations of
an object: its text, its coordinates and its object image (a zoomed crop of the image).
""" + _OBJECTS + """Write, from what is visible in the image:
1. "descriptions": for each object id, a short referring expression that picks out that object alone in this
   image (attributes, position, relation to others), e.g. "the man in a red shirt on the left".
2. "relation_qas": up to {max_qas} questions about the relationships among the objects, with answers.
   """ + _MARKS + """ The marked objects of a question will be replaced by their object images, so it must
   make sense to someone who sees only the objects, e.g. "What is [the man](man-1) holding?" -> "[The
   man](man-1) is holding [an umbrella](umbrella-1)."
3. "choice_qas": up to {max_qas} questions whose answer is one of the listed objects, with 2 to 4 option ids
   (the answer and plausible wrong ones); the options will be shown as object images.
Answer with JSON only: {{"descriptions": {{"man-1": "..."}}, "relation_qas": [{{"question": "...", "answer":
"..."}}], "choice_qas": [{{"question": "Which object keeps the rain off the man?", "options": ["umbrella-1",
"car-1"], "answer": "umbrella-1"}}]}}""",
    "conversation": _HEAD + """ Step 4, multi-round grounding conversation between a person asking about the
image and an AI assistant that is looking at it.
""" + _OBJECTS + """Write 3 to 5 rounds of point-to-point questions about local details (an object's
attributes, position, count, action, relations to other objects) that together build a global understanding of
the scene; later questions may follow up on earlier answers. The assistant answers confidently and precisely,
only with what is visible. """ + _MARKS + """ The marks become coordinates.
Answer with JSON only: {{"conversation": [{{"question": "...", "answer": "..."}}]}}""",
    "description": _HEAD + """ Step 4, grounding description: describe the image in detail for someone who
cannot see it (the scene, the objects, their attributes, positions and relationships) in one or two fluent
paragraphs that connect the objects into one picture.
""" + _OBJECTS + _MARKS + """ The marks become coordinates that confirm each object exists, so mark every
mention, and mention only what is visible.
Answer with JSON only: {{"description": "..."}}""",
}

# ----------------------------------------------------------------------------- configuration


def _opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class SynthConfig:
    images: str = _opt("", "directory (searched recursively) or a text file of image paths")
    out: str = _opt("", "output .jsonl; `{out}.done` records the finished images")
    vlm: str = _opt("", "base URL of an OpenAI-compatible server")
    vlm_model: str = _opt("", "model name sent to --vlm")
    grounder: str = _opt("", "grounder base URL (with --grounder-kind openai, default --vlm)")
    grounder_kind: str = _opt("detect", "detect | openai")
    grounder_model: str = _opt("", "model for --grounder-kind openai (default --vlm-model)")
    workers: int = _opt(4, "images processed concurrently")
    cache: str = _opt("", "response cache directory (default `{out}.cache`; 'none' disables)")
    limit: int = _opt(0, "process at most this many new images (0: all)")
    max_side: int = _opt(1024, "larger images are downscaled before sending")
    timeout: float = _opt(120.0, "seconds per HTTP request")
    retries: int = _opt(5, "retries per request after the first try")
    backoff: float = _opt(1.0, "first retry delay in seconds, doubled each time")
    max_wait: float = _opt(60.0, "cap on one delay, Retry-After included")
    max_tokens: int = _opt(1024, "max_tokens of each VLM answer")
    max_objects: int = _opt(10, "objects per image, recognized and kept")
    max_instances: int = _opt(3, "detections kept per object name")
    box_threshold: float = _opt(0.3, "step 2: detections scoring less are dropped")
    boxes: str = _opt("", "step 2: a .jsonl of {image, objects: [{label, box: [x1,y1,x2,y2] pixels]}}: a dataset's "
                          "boxes merged into the grounded objects, as the paper merges RefCOCO's (score 1)")
    max_qas: int = _opt(4, "relation and choice QAs asked for per image")
    # step 5, a sample is dropped for the first reason that applies:
    min_score: float = _opt(0.4, "low_confidence: an object involved scored less")
    min_object_area: float = _opt(0.01, "area_too_small: an object image covers less of the image")
    max_object_area: float = _opt(0.8, "area_too_large: an object image covers more of the image")
    max_option_iou: float = _opt(0.5, "option_iou: two object images overlap more")
    max_boxes: int = _opt(8, "too_many_boxes: more distinct objects involved")


# ----------------------------------------------------------------------------- HTTP: retries, cache, counts


class RequestFailed(Exception):
    """A request that failed for good (retries used up, or a 4xx other than 429)."""


class Malformed(Exception):
    """A response or model answer that cannot be used."""


class Stats:
    """Thread-safe counters: requests, retries, cache_hits, failed/<what>:<reason>, and those merged in."""

    def __init__(self):
        self.counts, self._lock = Counter(), threading.Lock()

    def add(self, name: str, n: int = 1):
        with self._lock:
            self.counts[name] += n

    def merge(self, counts: Counter):
        with self._lock:
            self.counts.update(counts)


class DiskCache:
    """JSON values in `dir/ab/<sha256>.json`, written atomically (temporary file, then os.replace)."""

    def __init__(self, directory: str):
        self.dir = Path(directory)

    def get(self, key: str):
        try:
            return json.loads((self.dir / key[:2] / f"{key}.json").read_text())
        except (OSError, ValueError):  # absent or unreadable: ask again
            return None

    def put(self, key: str, value):
        path = self.dir / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)


def reject_constant(name: str):
    """json.loads' hook for NaN, Infinity and -Infinity, which are not JSON: no NaN box or score gets in."""
    raise ValueError(f"{name} is not a JSON number")


def retry_after_seconds(value) -> float | None:
    """Retry-After in seconds (a number or an HTTP date); None when absent or unreadable."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


MAX_ANSWER_BYTES = 16 << 20


class HttpClient:
    """POST JSON, get JSON: the response cache, then tries with exponential backoff."""

    def __init__(self, stats: Stats, cache: DiskCache | None, timeout=120.0, retries=5, backoff=1.0,
                 max_wait=60.0):
        self.stats, self.cache, self.timeout = stats, cache, timeout
        self.retries, self.backoff, self.max_wait = retries, backoff, max_wait
        self._local = threading.local()  # a requests.Session (connection pool) per worker thread

    def post(self, url: str, payload: dict, what: str, api_key: str | None = None):
        # keyed by all that shapes the answer (URL, model, prompt, image), not by the API key
        key = hashlib.sha256(json.dumps([url, payload], sort_keys=True).encode()).hexdigest()
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats.add("cache_hits")
            return hit
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            # fetch() reads the raw stream (to bound it): a gzip body would reach json.loads still compressed
            self._local.session.headers["Accept-Encoding"] = "identity"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        for attempt in range(self.retries + 1):
            self.stats.add("requests")
            delay = None
            try:
                status, text, retry_after = self.fetch(url, payload, headers)
            except requests.Timeout:
                reason = "timeout"
            except requests.RequestException:  # refused, reset, or a body cut short of its Content-Length
                reason = "connection"
            else:
                if status == 200:
                    try:
                        body = json.loads(text)
                    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
                        reason = "bad_json"
                    else:
                        if not (isinstance(body, dict) and "error" in body):
                            if self.cache is not None:
                                self.cache.put(key, body)
                            return body
                        reason = "error_in_200"  # the server failed but said 200: try again, never keep it
                elif status == 429 or status >= 500:
                    reason, delay = f"http_{status}", retry_after_seconds(retry_after)
                else:  # our request is wrong (400, 401, 404...): asking again will not help
                    self.stats.add(f"failed/{what}:http_{status}")
                    raise RequestFailed(f"{url}: HTTP {status}: {text[:200]}")
            if attempt == self.retries:
                break
            self.stats.add("retries")
            if delay is None:  # full jitter: many workers do not retry in lockstep
                delay = self.backoff * 2 ** attempt * random.uniform(0.5, 1.0)
            time.sleep(min(delay, self.max_wait))
        self.stats.add(f"failed/{what}:{reason}")
        raise RequestFailed(f"{url}: {reason}, {self.retries + 1} tries")

    def fetch(self, url: str, payload: dict, headers: dict) -> tuple[int, str, str | None]:
        """(status, body text, Retry-After) of one POST, the whole of it within self.timeout: requests' own
        timeout bounds each socket read, so a server dripping a byte at a time could hold a worker forever."""
        deadline = time.monotonic() + self.timeout
        with self._local.session.post(url, json=payload, headers=headers, timeout=self.timeout, stream=True) as r:
            body = bytearray()
            try:
                while chunk := r.raw.read1(1 << 16):  # what has arrived, not a full 64 KB (urllib3 2's read1)
                    body += chunk
                    if time.monotonic() > deadline:
                        raise requests.Timeout(f"the answer took longer than {self.timeout} s in all")
                    if len(body) > MAX_ANSWER_BYTES:
                        raise requests.RequestException(f"an answer over {MAX_ANSWER_BYTES >> 20} MiB")
            except urllib3.exceptions.ReadTimeoutError as e:  # urllib3's, as requests would have wrapped them
                raise requests.Timeout(e) from e
            except urllib3.exceptions.HTTPError as e:  # a body cut short of its Content-Length, a reset
                raise requests.ConnectionError(e) from e
            return r.status_code, body.decode("utf-8", errors="replace"), r.headers.get("Retry-After")


# ----------------------------------------------------------------------------- the models


def image_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class ChatModel:
    """An OpenAI-compatible chat model: one user turn holding a text and an image; the answer's text back."""

    def __init__(self, http: HttpClient, url: str, model: str, api_key=None, max_tokens=1024, what="vlm"):
        url = url.rstrip("/")
        if not url.endswith("/chat/completions"):
            url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
        self.http, self.url, self.model, self.api_key, self.max_tokens, self.what = (
            http, url, model, api_key, max_tokens, what)

    def ask(self, prompt: str, data_url: str) -> str:
        content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": data_url}}]
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": self.max_tokens, "temperature": 0}
        body = self.http.post(self.url, payload, self.what, self.api_key)
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise Malformed(f"no choices[0].message.content ({e!r})") from None
        if isinstance(text, list):  # some servers answer in content parts
            text = "".join(p["text"] for p in text if isinstance(p, dict) and isinstance(p.get("text"), str))
        if not isinstance(text, str):
            raise Malformed("the message content is not text")
        if choice.get("finish_reason") == "length":
            raise Malformed(f"answer cut off at max_tokens={self.max_tokens}")
        return text


@dataclass
class Detection:
    label: str
    box: list  # [x1,y1,x2,y2] in pixels of the sent image
    score: float


def cxcywh_to_xyxy(box, width: int, height: int) -> list[float]:
    """Raw GroundingDINO box (cx,cy,w,h normalized by the image's own size) -> pixel [x1,y1,x2,y2]."""
    cx, cy, w, h = (float(v) for v in box)
    return [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]


def detections_from_response(body, width: int, height: int) -> list[Detection]:
    """Our {"detections": [...]}, raw GroundingDINO or transformers' post-processed output -> Detections."""
    try:
        if "detections" in body:
            rows = [(d["label"], d["box"], d["score"]) for d in body["detections"]]
        elif "phrases" in body:  # GroundingDINO's predict(): normalized cx,cy,w,h; the logits are scores
            scores = body["logits"] if "logits" in body else body["scores"]
            boxes = [cxcywh_to_xyxy(b, width, height) for b in body["boxes"]]
            rows = list(zip(body["phrases"], boxes, scores, strict=True))
        elif "boxes" in body:  # transformers' post_process_grounded_object_detection: xyxy pixels
            labels = body["text_labels"] if "text_labels" in body else body["labels"]
            rows = list(zip(labels, body["boxes"], body["scores"], strict=True))
        else:
            raise Malformed(f"grounder answer with unknown keys {sorted(body)[:6]}")
        found = [Detection(str(label).strip(), [float(v) for v in box], float(s)) for label, box, s in rows]
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # zip(strict=True): ValueError; float(1e400 int)
        raise Malformed(f"grounder answer: {e!r}") from None
    if any(len(d.box) != 4 for d in found):
        raise Malformed("a grounder box without 4 numbers")
    return [d for d in found if all(math.isfinite(v) for v in [*d.box, d.score])]  # no NaN box or score


class DetectGrounder:
    """Our /detect protocol (module docstring): one request per image for all its labels."""

    def __init__(self, http: HttpClient, url: str, box_threshold: float, api_key=None):
        url = url.rstrip("/")
        self.http, self.url = http, url if url.endswith("/detect") else url + "/detect"
        self.box_threshold, self.api_key = box_threshold, api_key

    def ground(self, data_url: str, labels: list[str], width: int, height: int, events: Counter):
        payload = {"image": data_url, "labels": labels, "box_threshold": self.box_threshold}
        body = self.http.post(self.url, payload, "grounder", self.api_key)
        return detections_from_response(body, width, height)


class ChatGrounder:
    """Grounding by any OpenAI-compatible model: REC_PROMPT per label, the first box of the answer."""

    def __init__(self, model: ChatModel):
        self.model = model

    def ground(self, data_url: str, labels: list[str], width: int, height: int, events: Counter):
        found = []
        for label in labels:
            try:
                boxes = parse_boxes(self.model.ask(REC_PROMPT.format(label), data_url))
                if not boxes:
                    raise Malformed("no [x1,y1,x2,y2] in the answer")
            except Malformed as e:
                events["malformed/ground"] += 1
                log.warning("grounding %r: %s", label, e)
                continue
            found.append(Detection(label, box_to_pixels(boxes[0], width, height), 1.0))
        return found


# ----------------------------------------------------------------------------- answers -> samples -> filter


@dataclass
class Obj:
    id: str  # "red_car-1"
    label: str
    box: list  # normalized on the padded square, rounded to the three decimals the text shows
    score: float
    area: float  # fraction of the image


LINK_RE = re.compile(r"\[([^\[\]]+)\]\(([\w\-]+)\)")  # "[the man](man-1)"


def parse_json_answer(text: str):
    """The JSON value in a model's answer (code fences or prose around it tolerated), else Malformed."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise Malformed("no JSON in the answer")
    start = min(starts)
    try:
        value = json.loads(text[start:text.rfind("}" if text[start] == "{" else "]") + 1],
                           parse_constant=reject_constant)
    except (ValueError, RecursionError) as e:
        raise Malformed(f"not JSON ({type(e).__name__}: {str(e)[:100]})") from None
    try:  # a lone surrogate ("\\ud800") parses, but no file can hold it as UTF-8
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Malformed("the answer holds a lone surrogate") from None
    return value


def read_dataset_boxes(path: str) -> dict[str, list[tuple[str, list[float]]]]:
    """--boxes: image key -> [(label, pixel box)]; a bad line stops the run at once, naming it."""
    boxes = {}
    for where, record in data.read_records(path):
        try:
            objects = [(o["label"].strip(), [float(v) for v in o["box"]]) for o in record["objects"]]
            if not all(label and len(box) == 4 and all(math.isfinite(v) for v in box) and box[0] < box[2]
                       and box[1] < box[3] for label, box in objects) or not isinstance(record["image"], str):
                raise ValueError("want non-empty labels and boxes [x1,y1,x2,y2] with x1 < x2, y1 < y2")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SystemExit(f"error: {where}: not a boxes record {{image, objects: [{{label, box}}]}} ({e})") from None
        boxes.setdefault(record["image"], []).extend(objects)
    return boxes


def select_objects(detections: list[Detection], width: int, height: int, cfg: SynthConfig) -> dict:
    """Step 2's object dictionary S1, {id: Obj}: confident, not degenerate, best first; per name at most
    max_instances that do not duplicate each other (IoU > 0.7); at most max_objects."""
    kept, per_name = {}, Counter()
    for d in sorted(detections, key=lambda d: -d.score):
        px = [max(d.box[0], 0), max(d.box[1], 0), min(d.box[2], width), min(d.box[3], height)]
        box = [round(min(max(v, 0.0), 1.0), 3) for v in pixels_to_box(px, width, height)]
        name = re.sub(r"\W+", "_", d.label.lower()).strip("_")
        if (d.score < cfg.box_threshold or box[2] <= box[0] or box[3] <= box[1] or not name
                or len(kept) == cfg.max_objects or per_name[name] == cfg.max_instances
                or any(o.label == d.label and iou(o.box, box) > 0.7 for o in kept.values())):
            continue
        per_name[name] += 1
        oid = f"{name}-{per_name[name]}"
        kept[oid] = Obj(oid, d.label, box, d.score, (px[2] - px[0]) * (px[3] - px[1]) / (width * height))
    return kept


def render(text: str, objects: dict, object_boxes: list | None = None) -> str:
    """Marks -> "phrase [box]"; with object_boxes, -> "<object>", the box appended to object_boxes.
    An unknown id raises KeyError."""
    def replace(m):
        obj = objects[m[2]]
        if object_boxes is None:
            return f"{m[1]} {format_box(obj.box)}"
        object_boxes.append(obj.box)
        return "<object>"
    return LINK_RE.sub(replace, text)


def _list(value) -> list:
    return value if isinstance(value, list) else []


def stage2_samples(key: str, objects: dict, answer: dict, rng: random.Random, min_score: float):
    """([(kind, sample)] of the multi-scale kinds, number of unusable items in the answer).
    data.py's builders make the image<->coordinate and text<->coordinate kinds from the confident objects
    (named by the model's referring expressions where it gave them; a label shared by several detections is
    no name). The model's relation and choice QAs become text<->image samples: their question objects and
    options are replaced by object images."""
    descriptions = answer.get("descriptions") if isinstance(answer.get("descriptions"), dict) else {}
    bad, out, counts = 0, [], Counter(o.label for o in objects.values())
    grounded = {"image": key, "objects": []}
    for o in (o for o in objects.values() if o.score >= min_score):  # others would only be filtered
        text = descriptions.get(o.id)
        referable = isinstance(text, str) and text.strip() or (counts[o.label] == 1 and o.label)
        grounded["objects"].append({"name": referable or o.label, "box": o.box, "referable": bool(referable)})
    for target in grounded["objects"]:
        builders = ["object_to_box", "box_to_object"]
        builders += ["rec", "reg", "text_to_object"] if target["referable"] else []
        out += [(kind, data.STAGE2_KINDS[kind][0](grounded, rng, target)) for kind in builders]
    for qa in _list(answer.get("relation_qas")):
        try:
            boxes = []
            question = render(qa["question"], objects, boxes)  # question objects become object images
            out.append(("relation_qa", _sample(key, [[question, render(qa["answer"], objects)]], boxes)))
        except (KeyError, TypeError) as e:
            bad += 1
            log.debug("%s: relation QA %r: %r", key, qa, e)
    for qa in _list(answer.get("choice_qas")):
        try:
            options = qa["options"]
            if not (isinstance(options, list) and 2 <= len(options) <= 6 and qa["answer"] in options):
                raise ValueError("options: want a list of 2 to 6 ids holding the answer")
            listing = " ".join(f"({data.LETTERS[k]}) <object>" for k in range(len(options)))
            question = f"{render(qa['question'], objects)} {listing}"
            boxes = [objects[oid].box for oid in options]
            answer_text = f"({data.LETTERS[options.index(qa['answer'])]})"
            out.append(("object_choice", _sample(key, [[question, answer_text]], boxes)))
        except (KeyError, TypeError, ValueError) as e:
            bad += 1
            log.debug("%s: choice QA %r: %r", key, qa, e)
    return [(kind, s) for kind, s in out if s is not None], bad


def _sample(key: str, turns: list, object_boxes=()) -> dict:
    """[[question, answer], ...] -> data.py's sample format, <image> before the first question."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
                          {"from": "gpt", "value": answer}]
    return {"image": key, "conversations": conversations, "objects": [list(b) for b in object_boxes]}


def filter_reason(sample: dict, by_box: dict, cfg: SynthConfig) -> str | None:
    """Step 5: why this sample is dropped, or None. `by_box` maps format_box(obj.box) -> Obj. The object
    images are the sample's "objects"; the objects involved are those plus every box in the text."""
    try:  # a marker the model wrote (<image>, <object>), or a lone surrogate in a label no file can hold
        data.validate_sample(sample, sample.get("image", ""), check_file=False)
        json.dumps(sample, ensure_ascii=False).encode("utf-8")
    except (data.SampleError, UnicodeEncodeError):
        return "invalid"
    text = " ".join(t["value"] for t in sample["conversations"])
    images = [by_box.get(format_box(b)) for b in sample.get("objects", [])]
    involved = {format_box(b) for b in parse_boxes(text)} | {format_box(b) for b in sample.get("objects", [])}
    if not involved:
        return "no_box"  # grounding data must ground something
    if not involved <= by_box.keys():
        return "unknown_box"  # a box the model wrote itself: nothing vouches for it
    if len(involved) > cfg.max_boxes:
        return "too_many_boxes"
    if min(by_box[b].score for b in involved) < cfg.min_score:
        return "low_confidence"
    if any(o.area < cfg.min_object_area for o in images):
        return "area_too_small"
    if any(o.area > cfg.max_object_area for o in images):
        return "area_too_large"
    if any(iou(a.box, b.box) > cfg.max_option_iou for i, a in enumerate(images) for b in images[i + 1:]):
        return "option_iou"
    return None


# ----------------------------------------------------------------------------- the pipeline


class Pipeline:
    """The five steps for one image. Thread-safe: one instance serves every worker."""

    def __init__(self, cfg: SynthConfig, stats: Stats):
        self.cfg = cfg
        cache = None if cfg.cache == "none" else DiskCache(cfg.cache or cfg.out + ".cache")
        http = HttpClient(stats, cache, cfg.timeout, cfg.retries, cfg.backoff, cfg.max_wait)
        vlm_key = os.environ.get("SYNTH_API_KEY") or os.environ.get("OPENAI_API_KEY")
        grounder_key = os.environ.get("SYNTH_GROUNDER_API_KEY")
        self.vlm = ChatModel(http, cfg.vlm, cfg.vlm_model, vlm_key, cfg.max_tokens)
        if cfg.grounder_kind == "openai":
            url = cfg.grounder or cfg.vlm
            key = vlm_key if url == cfg.vlm else grounder_key
            self.grounder = ChatGrounder(ChatModel(http, url, cfg.grounder_model or cfg.vlm_model, key, 64,
                                                   "grounder"))
        else:
            self.grounder = DetectGrounder(http, cfg.grounder, cfg.box_threshold, grounder_key)
        self.dataset_boxes = read_dataset_boxes(cfg.boxes) if cfg.boxes else {}

    def ask(self, step: str, data_url: str, events: Counter, key: str, **fmt) -> dict:
        """The VLM's JSON object for PROMPTS[step], or {} (logged and counted as malformed/<step>)."""
        text = ""
        try:
            text = self.vlm.ask(PROMPTS[step].format(**fmt), data_url)
            answer = parse_json_answer(text)
            if not isinstance(answer, dict):
                raise Malformed("not a JSON object")
            return answer
        except Malformed as e:
            events[f"malformed/{step}"] += 1
            log.warning("%s: unusable %s answer (%s): %.200r", key, step, e, text)
            return {}

    def process(self, key: str, path: str) -> tuple[list[dict], Counter]:
        """(samples, counts) for one image; raises RequestFailed, or OSError for an unreadable image."""
        cfg, events = self.cfg, Counter()
        img = data.load_image(path)  # no EXIF rotation: boxes must match how data.py opens it
        original_width = img.width
        img.thumbnail((cfg.max_side, cfg.max_side))  # only shrinks; normalized boxes hold for the original
        width, height = img.size
        data_url = image_data_url(img)

        labels = self.ask("recognize", data_url, events, key, max_objects=cfg.max_objects).get("objects")  # 1
        labels = list(dict.fromkeys(s.strip() for s in _list(labels) if isinstance(s, str) and s.strip()))
        labels = labels[:cfg.max_objects]
        try:  # 2
            detections = self.grounder.ground(data_url, labels, width, height, events) if labels else []
        except Malformed as e:
            events["malformed/ground"] += 1
            log.warning("%s: unusable grounder answer (%s)", key, e)
            detections = []
        scale = width / original_width  # the dataset's boxes are in the original's pixels
        detections += [Detection(label, [v * scale for v in box], 1.0)
                       for label, box in self.dataset_boxes.get(key, [])]
        objects = select_objects(detections, width, height, cfg)
        if not objects:
            events["images_without_objects"] += 1
            return [], events
        table = "\n".join(f"{o.id}: {o.label} {format_box(o.box)}" for o in objects.values())

        triples = self.ask("relations", data_url, events, key, objects=table).get("relations")  # 3
        relations = [t for t in _list(triples) if isinstance(t, list) and len(t) == 3 and isinstance(t[0], str)
                     and isinstance(t[2], str) and t[0] in objects and t[2] in objects]
        context = dict(objects=table, max_qas=cfg.max_qas,
                       relations="\n".join(f"({a}, {r}, {b})" for a, r, b in relations) or "(none)")

        rng = random.Random(key)  # the same instructions and options on every rerun
        answer = self.ask("fine_grained", data_url, events, key, **context)
        kinds, bad = stage2_samples(key, objects, answer, rng, cfg.min_score)
        events["malformed/fine_grained_item"] += bad
        turns = self.ask("conversation", data_url, events, key, **context).get("conversation")  # 4
        try:
            turns = [[render(t["question"], objects), render(t["answer"], objects)] for t in turns]
            kinds += [("grounding_conversation", _sample(key, turns))] if turns else []
        except (KeyError, TypeError):  # not a list of {"question": str, "answer": str}, or an unknown id
            events["malformed/conversation_item"] += turns is not None
        text = self.ask("description", data_url, events, key, **context).get("description")
        try:
            turns = [[data.DESCRIPTION_PROMPT, render(text, objects)]]
            kinds.append(("grounding_description", _sample(key, turns)))
        except (KeyError, TypeError):
            events["malformed/description_item"] += text is not None

        by_box = {format_box(o.box): o for o in objects.values()}
        samples = []
        for kind, sample in kinds:  # 5
            if reason := filter_reason(sample, by_box, cfg):
                events[f"filtered/{reason}"] += 1
                continue
            sample = {"id": f"{key}#{len(samples)}:{kind}", **sample, "objects": sample.get("objects", [])}
            samples.append(sample)
            events[f"samples/{kind}"] += 1
        return samples, events


# ----------------------------------------------------------------------------- output that survives kill -9


class Output:
    """The append-only samples file and `{path}.done`, one JSON line per finished image: {"image", "end",
    "samples"}, "end" being the samples file's length after that image. Opening locks the done file and
    resumes: a torn last line of it is dropped, and the samples file cut back to the last recorded end."""

    def __init__(self, path: str):
        self.path, self.done_path, self.done, end = Path(path), Path(path + ".done"), {}, 0
        size = self.path.stat().st_size if self.path.exists() else 0
        if size and not self.done_path.exists():
            raise SystemExit(f"{self.path} exists without {self.done_path}: synth.py did not write it; "
                             "move it away or choose another --out")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done_file = open(self.done_path, "ab")
        try:  # two runs appending to the same output would interleave their images
            fcntl.flock(self.done_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"{self.done_path} is locked: another synth.py is writing {self.path}") from None
        raw = self.done_path.read_bytes()
        complete = raw[:raw.rfind(b"\n") + 1]
        for n, line in enumerate(complete.splitlines(), 1):
            try:
                record = json.loads(line)
                self.done[record["image"]], end = record, int(record["end"])
            except (ValueError, KeyError, TypeError):
                raise SystemExit(f"{self.done_path}:{n}: not a done record; fix the line, or move "
                                 f"{self.done_path} and {self.path} away to start over") from None
        if len(complete) < len(raw):
            os.truncate(self.done_path, len(complete))
        if size < end:
            raise SystemExit(f"{self.path} ({size} bytes) is shorter than {self.done_path} records ({end}): "
                             "something else changed it; move both away or choose another --out")
        if size > end:
            log.info("%s: dropping %d bytes of an unfinished image", self.path, size - end)
            os.truncate(self.path, end)
        self.samples_file = open(self.path, "ab")

    def write(self, key: str, samples: list[dict]):
        """Samples first, fsynced, then the marker: after a crash between the two, opening cuts them off."""
        lines = [json.dumps(s, ensure_ascii=False, allow_nan=False).encode() + b"\n" for s in samples]  # strict JSON
        self.samples_file.write(b"".join(lines))
        self.samples_file.flush()
        os.fsync(self.samples_file.fileno())
        record = {"image": key, "end": self.samples_file.tell(), "samples": len(samples)}
        self.done_file.write(json.dumps(record).encode() + b"\n")
        self.done_file.flush()
        os.fsync(self.done_file.fileno())
        self.done[key] = record

    def close(self):
        self.samples_file.close()
        self.done_file.close()


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def list_images(spec: str) -> list[tuple[str, str]]:
    """[(key, path)]. The key, which becomes the samples' "image", is the path relative to the directory, or
    the line as written in the list file (relative lines are relative to the list file's folder)."""
    root = Path(spec)
    if root.is_dir():
        return [(f.relative_to(root).as_posix(), str(f)) for f in sorted(root.rglob("*"))
                if f.suffix.lower() in IMAGE_SUFFIXES]
    if root.is_file():
        keys = dict.fromkeys(s.strip() for s in root.read_text().splitlines() if s.strip() and s[0] != "#")
        return [(k, k if os.path.isabs(k) else str(root.parent / k)) for k in keys]
    raise SystemExit(f"--images {spec}: no such directory or list file")


def summary(counts: Counter, seconds: float) -> str:
    def group(prefix):
        items = sorted((k[len(prefix):], v) for k, v in counts.items() if k.startswith(prefix) and v)
        return " ".join(f"{k}={v}" for k, v in items)
    done = counts["images_done"]
    return "\n".join([
        f"images: {done} done, {counts['images_failed']} failed (the same command retries them), "
        f"{counts['images_skipped']} done before, {counts['images_without_objects']} without objects",
        f"samples: {counts['samples']}  {group('samples/')}",
        f"filtered: {group('filtered/') or 'none'}",
        f"malformed answers: {group('malformed/') or 'none'}",
        f"failed requests: {group('failed/') or 'none'}",
        f"requests: {counts['requests']}, retries {counts['retries']}, cache hits {counts['cache_hits']}",
        f"time: {seconds:.1f} s, {done / seconds:.2f} images/s, "
        f"{counts['requests'] / seconds:.1f} requests/s",
    ])


def synthesize(cfg: SynthConfig) -> Counter:
    """Run the pipeline over cfg.images into cfg.out (resuming), print the summary, return the counts."""
    images, output, stats = list_images(cfg.images), Output(cfg.out), Stats()
    todo = [(k, p) for k, p in images if k not in output.done][:cfg.limit or None]
    stats.add("images_skipped", sum(k in output.done for k, _ in images))
    pipeline, start, pending, queue = Pipeline(cfg, stats), time.time(), {}, iter(todo)
    with ThreadPoolExecutor(cfg.workers) as pool, tqdm(total=len(todo), unit="img", desc="synth") as bar:
        def refill():  # a bounded window of futures, however many images there are
            for key, path in queue:
                pending[pool.submit(pipeline.process, key, path)] = key
                if len(pending) >= 2 * cfg.workers:
                    break
        refill()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                key = pending.pop(future)
                try:
                    samples, events = future.result()
                except (RequestFailed, OSError, Image.DecompressionBombError, data.ImageTooLarge) as e:
                    stats.add("images_failed")
                    log.error("%s: %s (not marked done: the next run retries it)", key, e)
                except Exception as e:  # an answer no check foresaw: this image fails, the run goes on
                    stats.add("images_failed")
                    log.exception("%s: %s (not marked done: the next run retries it)", key, e)
                else:
                    output.write(key, samples)
                    stats.merge(events + Counter(images_done=1, samples=len(samples)))
                bar.update(1)
                bar.set_postfix(samples=stats.counts["samples"], failed=stats.counts["images_failed"])
            refill()
    output.close()
    print(summary(stats.counts, max(time.time() - start, 1e-9)), flush=True)
    return stats.counts


def main(argv=None) -> Counter:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(SynthConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f.metadata["help"])
    cfg = SynthConfig(**vars(parser.parse_args(argv)))
    required = ["images", "out", "vlm", "vlm_model"] + (["grounder"] if cfg.grounder_kind == "detect" else [])
    if missing := [f"--{n.replace('_', '-')}" for n in required if not getattr(cfg, n)]:
        parser.error("missing " + ", ".join(missing))
    if cfg.grounder_kind not in ("detect", "openai"):
        parser.error(f"--grounder-kind {cfg.grounder_kind}: use detect or openai")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with logging_redirect_tqdm():
        return synthesize(cfg)


if __name__ == "__main__":
    main()
