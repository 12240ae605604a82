"""synth.py against a loopback server that speaks chat completions and /detect, scripted to fail."""

import base64
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import synth
from data import format_box, load_samples, pixels_to_box

REPO = Path(__file__).resolve().parent.parent
# The scene every test image shows: label -> (box as fractions of width and height, colour, detector score).
# The green triangle scores between box_threshold (0.3) and min_score (0.4): detected, its QAs dropped.
SCENE = {"red square": ((0.10, 0.20, 0.40, 0.55), "red", 0.9),
         "blue circle": ((0.50, 0.45, 0.90, 0.95), "blue", 0.8),
         "green triangle": ((0.55, 0.05, 0.75, 0.30), "green", 0.35)}
STEP_OF = {prompt.split("\n")[0]: step for step, prompt in synth.PROMPTS.items()}


def scene_box(label, width, height):
    x1, y1, x2, y2 = SCENE[label][0]
    return [x1 * width, y1 * height, x2 * width, y2 * height]


def make_images(folder: Path, n: int, size=(320, 240)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, (20 * (i % 10), 120, 90))
        draw = ImageDraw.Draw(img)
        for label, (_, colour, _) in SCENE.items():
            box = scene_box(label, *size)
            draw.ellipse(box, fill=colour) if "circle" in label else draw.rectangle(box, fill=colour)
        img.save(folder / f"img{i:03d}.png")
    return folder


ANSWERS = {  # step -> the model's answer text
    "recognize": '```json\n{"objects": ["red square", "blue circle", "green triangle", "purple cow"]}\n```',
    "relations": '{"relations": [["red_square-1", "left of", "blue_circle-1"], ["x-9", "on", "y-1"]]}',
    "fine_grained": json.dumps({
        "descriptions": {"red_square-1": "the red square on the left",
                         "blue_circle-1": "the big blue circle"},
        "relation_qas": [
            {"question": "Where is [the square](red_square-1) relative to [the circle](blue_circle-1)?",
             "answer": "[The square](red_square-1) is left of [the circle](blue_circle-1)."},
            {"question": "Is [the triangle](green_triangle-1) above [the circle](blue_circle-1)?",
             "answer": "Yes."},  # dropped: the triangle's score is too low
            {"question": "What is [the cow](purple_cow-1) doing?", "answer": "Grazing."}],  # unknown id
        "choice_qas": [{"question": "Which object is round?", "options": ["red_square-1", "blue_circle-1"],
                        "answer": "blue_circle-1"}]}),
    "conversation": json.dumps({"conversation": [
        {"question": "What is on the left?", "answer": "[A red square](red_square-1)."},
        {"question": "And on the right?", "answer": "[A blue circle](blue_circle-1)."}]}),
    "description": 'Here it is: {"description": "[A red square](red_square-1) sits left of '
                   '[a blue circle](blue_circle-1)."}',
}


class FakeServer:
    """OpenAI-compatible /v1/chat/completions and our /detect on 127.0.0.1. `faults` is consumed one per
    request, whatever the path ("ok" = answer normally): "429" (Retry-After: 1), "500", "400", "slow" (answers
    after 1 s), "nonjson" (a 200 whose body is not JSON), "truncated" (body cut short of its Content-Length).
    `answers` overrides ANSWERS; "length:<text>" answers <text> with finish_reason "length"."""

    def __init__(self, faults=(), answers=None, delay=0.0, grounder_format="ours", nan_label=None,
                 label_suffix="", compress=False):
        self.faults, self.answers, self.nan_label = list(faults), {**ANSWERS, **(answers or {})}, nan_label
        self.delay, self.format, self.label_suffix, self.compress = delay, grounder_format, label_suffix, compress
        self.seen, self.lock, self.auth = Counter(), threading.Lock(), set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    fault = server.faults.pop(0) if server.faults else "ok"
                    server.auth.add(self.headers.get("Authorization"))
                time.sleep(server.delay + (1.0 if fault == "slow" else 0.0))
                try:
                    if fault in ("429", "500", "400"):
                        self.send_response(int(fault))
                        self.send_header("Retry-After", "1") if fault == "429" else None
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body = server.answer(self.path, request)
                    if fault == "nonjson":
                        body = b"<html>502 Bad Gateway</html>"
                    if fault == "error200":  # some gateways report failures with a 200
                        body = b'{"error": {"message": "upstream overloaded"}}'
                    if fault == "drip":  # a byte at a time: each read is quick, the whole is not
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        for k in range(len(body)):
                            self.wfile.write(body[k : k + 1])
                            self.wfile.flush()
                            time.sleep(0.05)
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    if server.compress and "gzip" in self.headers.get("Accept-Encoding", ""):  # as nginx's gzip on
                        body = gzip.compress(body)
                        self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:10] if fault == "truncated" else body)
                    if fault == "truncated":
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, path: str, request: dict) -> bytes:
        if path == "/detect":
            image = Image.open(io.BytesIO(base64.b64decode(request["image"].split(",", 1)[1])))
            found = [(label, scene_box(label, *image.size), SCENE[label][2]) for label in request["labels"]
                     if label in SCENE]
            with self.lock:
                self.seen["ground"] += 1
            if self.format == "gdino":  # raw GroundingDINO: normalized cx,cy,w,h
                w, h = image.size
                boxes = [[(b[0] + b[2]) / 2 / w, (b[1] + b[3]) / 2 / h, (b[2] - b[0]) / w, (b[3] - b[1]) / h]
                         for _, b, _ in found]
                return json.dumps({"boxes": boxes, "logits": [s for *_, s in found],
                                   "phrases": [lbl for lbl, *_ in found]}).encode()
            detections = [{"label": lbl + self.label_suffix, "box": b,
                           "score": float("nan") if lbl == self.nan_label else s}
                          for lbl, b, s in found]  # Python's json writes NaN, which is not JSON
            return json.dumps({"detections": detections}).encode()
        assert path == "/v1/chat/completions", path
        content = request["messages"][-1]["content"]
        text = next(p["text"] for p in content if p["type"] == "text")
        assert any(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/jpeg;base64,")
                   for p in content)
        if text.startswith("Output the coordinate of "):  # grounding by a chat model
            label = text[len("Output the coordinate of "):]
            image = Image.open(io.BytesIO(base64.b64decode(content[1]["image_url"]["url"].split(",", 1)[1])))
            step, answer = "ground", (format_box(pixels_to_box(scene_box(label, *image.size), *image.size))
                                      if label in SCENE else "I cannot see it.")
        else:
            step = STEP_OF[text.split("\n")[0]]
            answer = self.answers[step]
        with self.lock:
            self.seen[step] += 1
        finish = "length" if answer.startswith("length:") else "stop"
        message = {"role": "assistant", "content": answer.removeprefix("length:")}
        return json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": finish}]}).encode()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def start(**kwargs):
        servers.append(FakeServer(**kwargs))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def config(srv, tmp_path, images, out="out.jsonl", **overrides) -> synth.SynthConfig:
    values = dict(images=str(images), out=str(tmp_path / out), vlm=srv.url, vlm_model="fake",
                  grounder=srv.url, workers=1, timeout=0.3, retries=5, backoff=0.01, max_wait=2.0)
    return synth.SynthConfig(**{**values, **overrides})


def read_lines(path) -> list[str]:
    return Path(path).read_text().splitlines()


def test_end_to_end_writes_every_kind_in_data_format(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNTH_API_KEY", "sk-test")
    srv = server()
    images = make_images(tmp_path / "images", 2)
    counts = synth.synthesize(config(srv, tmp_path, images, workers=2))
    assert "samples: " in capsys.readouterr().out
    assert srv.auth == {"Bearer sk-test", None}  # the VLM's key is not sent to the grounder
    samples = load_samples(str(tmp_path / "out.jsonl"), image_root=str(images))  # data.py validates each
    assert counts["images_done"] == 2 and counts["samples"] == len(samples)
    kinds = Counter(s["id"].split(":")[-1] for s in samples)
    assert set(kinds) == {"object_to_box", "box_to_object", "rec", "reg", "text_to_object", "relation_qa",
                          "object_choice", "grounding_conversation", "grounding_description"}, kinds
    assert {k: v for k, v in counts.items() if k.startswith("samples/")} == {f"samples/{k}": v * 1
                                                                             for k, v in kinds.items()}
    for s in samples:
        first = s["conversations"][0]["value"]
        assert first.startswith("<image>\n") and s["image"] in ("img000.png", "img001.png")
        assert sum(t["value"].count("<object>") for t in s["conversations"]) == len(s["objects"])
    red = [round(v, 3) for v in pixels_to_box(scene_box("red square", 320, 240), 320, 240)]
    recs = [s for s in samples if s["id"].endswith(":rec")]
    rec = next(s for s in recs if "red square" in s["conversations"][0]["value"])
    assert rec["conversations"][1]["value"] == format_box(red)
    rel = next(s for s in samples if s["id"].endswith(":relation_qa"))
    assert rel["conversations"][0]["value"].count("<object>") == 2 and rel["objects"][0] == red
    assert f"The square {format_box(red)} is left of" in rel["conversations"][1]["value"]
    # the triangle (score 0.35) is grounded but every QA about it is dropped; the cow was never detected
    assert counts["filtered/low_confidence"] == 2 and not any("triangle" in json.dumps(s) for s in samples)
    assert counts["malformed/fine_grained_item"] == 2  # the cow QA, on each image
    assert counts["requests"] == 2 * 6 and counts["retries"] == 0


def test_retries_429_500_timeout_nonjson_truncated(server, tmp_path):
    srv = server(faults=["429", "500", "slow", "nonjson", "truncated"])
    images = make_images(tmp_path / "images", 1)
    start = time.time()
    counts = synth.synthesize(config(srv, tmp_path, images))
    assert time.time() - start >= 1.0  # Retry-After: 1 was honoured
    assert counts["retries"] == 5 and counts["requests"] == 6 + 5
    assert counts["images_done"] == 1 and counts["samples"] > 0
    assert not any(k.startswith("failed/") for k in counts)


def test_an_error_sent_with_200_is_retried_and_never_costs_the_image(server, tmp_path):
    """Before: a 200 holding {"error": ...} marked the image done with 0 samples, and reruns skipped it."""
    images = make_images(tmp_path / "images", 1)
    srv = server(faults=["error200"] * 2)  # retries 1: the first request fails for good
    counts = synth.synthesize(config(srv, tmp_path, images, retries=1))
    assert counts["images_failed"] == 1 and counts["failed/vlm:error_in_200"] == 1 and counts["images_done"] == 0
    counts = synth.synthesize(config(srv, tmp_path, images, retries=1))  # a healthy rerun
    assert counts["images_done"] == 1 and counts["samples"] > 0


def test_hostile_but_parseable_answers_never_stop_the_run(server, tmp_path):
    """An id that is a list, a lone surrogate, JSON nested past the parser, a NaN score: each is counted as
    malformed (or dropped), the run finishes every image, and the output is strict JSON."""
    images = make_images(tmp_path / "images", 2)
    srv = server(answers={"relations": '{"relations": [[["red_square-1"], "left of", "blue_circle-1"]]}',
                          "conversation": '{"conversation": [{"question": "\\ud800?", "answer": "x"}]}',
                          "description": "[" * 50_000},
                 nan_label="red square")
    counts = synth.synthesize(config(srv, tmp_path, images, timeout=5))
    assert counts["images_done"] == 2 and counts["images_failed"] == 0
    assert counts["malformed/conversation"] == 2 and counts["malformed/description"] == 2
    text = (tmp_path / "out.jsonl").read_text()
    assert "NaN" not in text and "red square" not in text  # its NaN detection was dropped
    assert all(json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in text.splitlines())
    cached = synth.synthesize(config(srv, tmp_path, images, out="again.jsonl", timeout=5,
                                     cache=str(tmp_path / "out.jsonl.cache")))  # the bad answers, cached
    assert cached["images_done"] == 2 and cached["requests"] == 0


def test_a_grounder_label_no_file_can_hold_costs_its_samples_not_the_run(server, tmp_path):
    """A lone surrogate in the grounder's labels ("dog\\ud800" in its JSON): before, writing the first such
    sample raised in the main loop, and every rerun replayed the cached answer into the same crash."""
    images = make_images(tmp_path / "images", 2)
    srv = server(label_suffix="\ud800", answers={"fine_grained": '{"descriptions": {}}'})  # names: the labels
    counts = synth.synthesize(config(srv, tmp_path, images, timeout=5))
    assert counts["images_done"] == 2 and counts["images_failed"] == 0 and counts["filtered/invalid"] > 0
    (tmp_path / "out.jsonl").read_bytes().decode("utf-8")  # strict UTF-8


def test_content_parts_that_are_not_text_are_left_out():
    class Http:  # before: "".join met the 3 and raised TypeError, and the image failed on every rerun
        def post(self, *args):
            parts = [{"type": "text", "text": 3}, {"type": "image"}, {"type": "text", "text": "ok"}]
            return {"choices": [{"message": {"content": parts}, "finish_reason": "stop"}]}

    assert synth.ChatModel(Http(), "http://vlm", "m").ask("q", "data:") == "ok"


def test_an_image_past_the_pixel_limit_fails_with_a_line_not_a_traceback(server, tmp_path, caplog):
    images = make_images(tmp_path / "images", 1)
    Image.new("1", (7000, 7000)).save(images / "bomb.png")  # 49 MP in a few KB
    counts = synth.synthesize(config(server(), tmp_path, images, timeout=5))
    assert counts["images_done"] == 1 and counts["images_failed"] == 1
    [record] = [r for r in caplog.records if "bomb.png" in r.getMessage()]
    assert "over the limit" in record.getMessage() and record.exc_info is None


def test_compressed_answers_are_read(server, tmp_path):
    """Behind a proxy that gzips what the client accepts, the answers still parse (before: all bad_json)."""
    images = make_images(tmp_path / "images", 1)
    counts = synth.synthesize(config(server(compress=True), tmp_path, images, timeout=5))
    assert counts["images_done"] == 1 and counts["samples"] > 0 and not counts["failed/vlm:bad_json"]


def test_timeout_bounds_the_whole_request_not_each_read(server, tmp_path):
    images = make_images(tmp_path / "images", 1)
    srv = server(faults=["drip"] * 2)  # ~20 s to send a whole answer, 50 ms a byte
    start = time.time()
    counts = synth.synthesize(config(srv, tmp_path, images, timeout=1.0, retries=1))
    assert counts["failed/vlm:timeout"] == 1 and time.time() - start < 6  # before: ~40 s under --timeout 1


def test_dataset_boxes_are_merged_into_the_grounded_objects(server, tmp_path):
    """Step 2's S1 merge: a dataset's box for an image (RefCOCO's, say; original pixels) joins the grounder's
    detections there, so samples are built on it too; other images are untouched; a bad line stops at once."""
    images = make_images(tmp_path / "images", 2, size=(640, 480))  # sent downscaled to 320 x 240
    boxes = tmp_path / "boxes.jsonl"
    wall = {"label": "gray wall", "box": [0, 400, 640, 480]}
    boxes.write_text(json.dumps({"image": "img000.png", "objects": [wall]}))
    srv = server()
    synth.synthesize(config(srv, tmp_path, images, boxes=str(boxes), max_side=320))
    samples = load_samples(str(tmp_path / "out.jsonl"), image_root=str(images))
    wall = format_box(pixels_to_box([0, 400, 640, 480], 640, 480))
    with_wall = [s for s in samples if wall in json.dumps(s)]
    assert with_wall and {s["image"] for s in with_wall} == {"img000.png"}
    boxes.write_text('{"image": "img000.png", "objects": [{"label": "x", "box": [5, 5, 1, 1]}]}')
    with pytest.raises(SystemExit, match="boxes.jsonl:1: not a boxes record"):
        synth.synthesize(config(srv, tmp_path, images, out="other.jsonl", boxes=str(boxes)))


def test_4xx_is_not_retried(server, tmp_path):
    srv = server(faults=["400"])
    counts = synth.synthesize(config(srv, tmp_path, make_images(tmp_path / "images", 1)))
    assert counts["failed/vlm:http_400"] == 1 and counts["retries"] == 0 and counts["images_failed"] == 1


def test_gives_up_then_next_run_redoes_only_the_failed_image_from_cache(server, tmp_path):
    srv = server(faults=["500"] * 3)  # the first image's first request fails 3 times: retries=2 gives up
    images = make_images(tmp_path / "images", 2)
    counts = synth.synthesize(config(srv, tmp_path, images, retries=2))
    assert counts["failed/vlm:http_500"] == 1 and counts["images_failed"] == 1 and counts["images_done"] == 1
    assert len(read_lines(tmp_path / "out.jsonl.done")) == 1
    again = synth.synthesize(config(srv, tmp_path, images, retries=2))
    assert again["images_skipped"] == 1 and again["images_done"] == 1 and again["requests"] == 6
    samples = load_samples(str(tmp_path / "out.jsonl"), image_root=str(images))
    assert {s["image"] for s in samples} == {"img000.png", "img001.png"}
    assert len({s["id"] for s in samples}) == len(samples)


def test_unusable_answers_are_counted_and_skipped(server, tmp_path):
    srv = server(answers={"relations": "Sorry, I cannot help with that.",
                          "description": '{"description": "A red square [0.1',  # cut-off JSON
                          "conversation": 'length:{"conversation": [{"question": "What'})
    images = make_images(tmp_path / "images", 1)
    counts = synth.synthesize(config(srv, tmp_path, images))
    assert counts["malformed/relations"] == counts["malformed/description"] == 1
    assert counts["malformed/conversation"] == 1 and counts["retries"] == 0
    samples = load_samples(str(tmp_path / "out.jsonl"), image_root=str(images))
    kinds = {s["id"].split(":")[-1] for s in samples}
    assert "rec" in kinds and "grounding_description" not in kinds and "grounding_conversation" not in kinds


def test_rerun_with_the_cache_costs_no_request(server, tmp_path):
    srv = server()
    images = make_images(tmp_path / "images", 2)
    cache = str(tmp_path / "cache")
    first = synth.synthesize(config(srv, tmp_path, images, "a.jsonl", cache=cache))
    second = synth.synthesize(config(srv, tmp_path, images, "b.jsonl", cache=cache))
    assert first["requests"] == 12 and second["requests"] == 0 and second["cache_hits"] == 12
    assert sorted(read_lines(tmp_path / "a.jsonl")) == sorted(read_lines(tmp_path / "b.jsonl"))


@pytest.mark.parametrize("grounder_format", ["ours", "gdino"])
def test_detect_formats_and_openai_grounder_agree(server, tmp_path, grounder_format):
    srv = server(grounder_format=grounder_format)
    images = make_images(tmp_path / "images", 1, size=(200, 320))  # portrait: pad offsets on x
    detect_counts = synth.synthesize(config(srv, tmp_path, images, "detect.jsonl", cache="none"))
    chat = synth.synthesize(config(srv, tmp_path, images, "chat.jsonl", cache="none", grounder_kind="openai",
                                   grounder=""))
    assert srv.seen["ground"] == 1 + 4  # one /detect, then REC_PROMPT per recognized label
    assert chat["malformed/ground"] == 1  # "purple cow": no box in the answer
    red = format_box(pixels_to_box(scene_box("red square", 200, 320), 200, 320))
    assert detect_counts["images_done"] == chat["images_done"] == 1
    samples = lambda name: map(json.loads, read_lines(tmp_path / name))
    rec_answers = lambda name: {s["conversations"][1]["value"] for s in samples(name)
                                if s["id"].endswith(":rec")}
    assert red in rec_answers("detect.jsonl")
    # the chat grounder scores 1.0, so the triangle survives there: compare the squares and circles only
    assert rec_answers("detect.jsonl") <= rec_answers("chat.jsonl")


def test_detections_from_response_converts_the_common_formats():
    ours = {"detections": [{"label": "dog", "box": [10, 20, 110, 220], "score": 0.5}]}
    raw = {"boxes": [[0.3, 0.6, 0.5, 1.0]], "logits": [0.5], "phrases": ["dog"]}  # 200x200 image
    hf = {"boxes": [[10, 20, 110, 220]], "scores": [0.5], "text_labels": ["dog"]}
    for body in (ours, raw, hf):
        [d] = synth.detections_from_response(body, 200, 200)
        assert d.label == "dog" and d.score == 0.5 and d.box == pytest.approx([10, 20, 110, 220])
    for bad in ({"boxes": [[1, 2, 3]], "scores": [1], "labels": ["a"]}, {"what": 1},
                {"detections": [{"label": "a", "box": [10**400, 0, 1, 1], "score": 1}]},  # float(): OverflowError
                {"boxes": [[0.1, 0.1, 0.1, 0.1]], "logits": [], "phrases": ["a"]}):
        with pytest.raises(synth.Malformed):
            synth.detections_from_response(bad, 100, 100)


def test_parse_json_answer_tolerates_fences_and_rejects_cut_answers():
    assert synth.parse_json_answer('Sure!\n```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert synth.parse_json_answer("[1, 2] as asked") == [1, 2]
    for bad in ('{"a": [1, 2', "no json here", '{"a": }'):
        with pytest.raises(synth.Malformed):
            synth.parse_json_answer(bad)


def test_filter_reasons():
    cfg = synth.SynthConfig()
    objs = [synth.Obj("a-1", "a", [0.1, 0.1, 0.5, 0.5], 0.9, 0.2),
            synth.Obj("b-1", "b", [0.12, 0.1, 0.5, 0.5], 0.9, 0.2),  # overlaps a
            synth.Obj("c-1", "c", [0.6, 0.6, 0.62, 0.62], 0.9, 0.001),  # tiny
            synth.Obj("d-1", "d", [0, 0, 1, 1], 0.9, 0.95),  # the whole image
            synth.Obj("e-1", "e", [0.7, 0.1, 0.9, 0.3], 0.2, 0.05)]  # low score
    by_box = {format_box(o.box): o for o in objs}
    human = lambda text, *boxes: {"image": "x.jpg", "objects": list(boxes), "conversations": [
        {"from": "human", "value": "<image>\n" + text}, {"from": "gpt", "value": "(A)"}]}
    box = lambda o: format_box(o.box)
    a, b, c, d, e = objs
    two = "Which? (A) <object> (B) <object>"
    assert synth.filter_reason(human(two, a.box, d.box), by_box, cfg) == "area_too_large"
    assert synth.filter_reason(human(two, a.box, b.box), by_box, cfg) == "option_iou"
    assert synth.filter_reason(human("Where is <object>?", c.box), by_box, cfg) == "area_too_small"
    assert synth.filter_reason(human(f"What is at {box(e)}?"), by_box, cfg) == "low_confidence"
    assert synth.filter_reason(human("Describe the image."), by_box, cfg) == "no_box"
    assert synth.filter_reason(human("What is at [0.300,0.300,0.400,0.400]?"), by_box, cfg) == "unknown_box"
    assert synth.filter_reason(human(f"{box(a)} {box(b)} {box(c)}"), by_box, synth.SynthConfig(max_boxes=2)) \
        == "too_many_boxes"
    assert synth.filter_reason(human(f"What is at {box(a)}? (A) <object>", a.box), by_box, cfg) is None
    assert synth.filter_reason(human(f"Is <object> at {box(a)}?"), by_box, cfg) == "invalid"  # no box for it
    assert synth.filter_reason(human(f"Is the dog\ud800 at {box(a)}?"), by_box, cfg) == "invalid"


def test_output_resume_cuts_torn_writes(tmp_path):
    path = str(tmp_path / "out.jsonl")
    out = synth.Output(path)
    out.write("a.jpg", [{"id": "a#0"}, {"id": "a#1"}])
    out.write("b.jpg", [])
    out.close()
    with open(path, "ab") as f:  # killed mid-image: one whole sample and half of the next, no marker
        f.write(b'{"id": "c#0"}\n{"id": "c#')
    with open(path + ".done", "ab") as f:
        f.write(b'{"image": "c.jp')  # and a torn marker (impossible after the fsync order, but harmless)
    again = synth.Output(path)
    with pytest.raises(SystemExit, match="locked"):  # a second run on the same output
        synth.Output(path)
    assert set(again.done) == {"a.jpg", "b.jpg"}
    assert read_lines(path) == ['{"id": "a#0"}', '{"id": "a#1"}'] and len(read_lines(path + ".done")) == 2
    again.close()
    os.remove(path + ".done")
    with pytest.raises(SystemExit, match="without"):  # samples without the done file: refuse
        synth.Output(path)


def test_list_images_from_a_folder_or_a_list_file(tmp_path):
    make_images(tmp_path / "set" / "sub", 2)
    found = synth.list_images(str(tmp_path / "set"))
    assert found == [(f"sub/img00{i}.png", str(tmp_path / f"set/sub/img00{i}.png")) for i in (0, 1)]
    (tmp_path / "list.txt").write_text("# images\nset/sub/img001.png\n\nset/sub/img001.png\n/abs/x.jpg\n")
    assert synth.list_images(str(tmp_path / "list.txt")) == [
        ("set/sub/img001.png", str(tmp_path / "set/sub/img001.png")), ("/abs/x.jpg", "/abs/x.jpg")]


def test_cli_reports_missing_arguments(capsys):
    with pytest.raises(SystemExit):
        synth.main(["--images", "x", "--out", "y.jsonl"])
    assert "missing --vlm, --vlm-model, --grounder" in capsys.readouterr().err


def test_kill_9_and_rerun_loses_nothing_and_duplicates_nothing(server, tmp_path):
    srv = server(delay=0.02)
    images = make_images(tmp_path / "images", 24)
    args = [sys.executable, "synth.py", "--images", str(images), "--out", str(tmp_path / "out.jsonl"),
            "--vlm", srv.url, "--vlm-model", "fake", "--grounder", srv.url, "--workers", "3"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / "out.jsonl.done"
    for _ in range(600):  # bounded wait (30 s) for a few images to finish
        if done.exists() and len(read_lines(done)) >= 4 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(read_lines(done))
    assert 4 <= finished < 24, "the run ended before it could be killed mid-way"
    subprocess.run(args, cwd=REPO, check=True, capture_output=True, timeout=60)  # the same command again
    synth.synthesize(config(srv, tmp_path, images, "ref.jsonl", workers=3))  # an uninterrupted run
    resumed, reference = read_lines(tmp_path / "out.jsonl"), read_lines(tmp_path / "ref.jsonl")
    assert sorted(resumed) == sorted(reference) and len(reference) > 24
    assert len(read_lines(done)) == 24
