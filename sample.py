"""Ask a trained TinyGroundingGPT about an image: one question, a chat, or an OpenAI-compatible server.

    python sample.py assets/shapes_demo.png "Output the coordinate of the circle"
    python sample.py photo.jpg "What is in <object>?" --object 0.1,0.2,0.5,0.6 --attn object
    python sample.py photo.jpg                                   # interactive chat about the image
    python sample.py --serve --port 8000                         # POST /v1/chat/completions, and the
                                                                 # demo page at http://127.0.0.1:8000/

Every box in an answer is drawn on the image (saved as IMAGE.boxes.png, or --out) and printed in pixels.
`--attn` saves the paper's interpretability map (Sec. 5.2): the last layer's attention from an object's
tokens (the answer's coordinates, the question's text, or the object image) to the image patches, averaged
over heads, summed over tokens, normalized, drawn over the image. The default checkpoint is the shipped shapes model:
it knows only the shapes world, but the CLI runs on any photo.

The server also serves a demo page at / (assets/demo.html: one file, plain JavaScript and a canvas, nothing
fetched from elsewhere): pick, drop or choose an example image, ask, see every box of the answer drawn and
labelled, drag boxes on the image to ask about them (<object>), overlay the attention map, ask follow-ups.
It sends the same requests as any client, with two extensions of the OpenAI format:
    "objects": [[x1, y1, x2, y2], ...]   request: the box of each <object> in the messages, in order
                                         (normalized on the image padded to a square)
    "attention": "coords"|"text"|"object"  request: also return the attention map from that source (as --attn)
    "attention": [[float, ...], ...]     response: that map, [side][side] in [0, 1] on the padded square, or
                                         null with "attention_error" saying why (e.g. no box in the answer)
The page's other routes: GET /demo/config.json (the server's limits, the examples' names) and
GET /demo/examples/NAME, one of a fixed list of shipped images (EXAMPLES; a request never names a file).
The server binds 127.0.0.1 unless --host says otherwise, and never fetches a URL: images come as data URLs.
"""

import argparse
import base64
import concurrent.futures
import io
import json
import math
import mimetypes
import os
import resource
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

import data
from encoders import crop_object
from model import TinyGroundingGPT, image_attention

DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes-model")
BOX_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"]


def open_image(path: str) -> Image.Image:
    try:
        return data.load_image(path)
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError, data.ImageTooLarge) as e:
        raise SystemExit(f"error: cannot read {path!r} as an image ({e}); give a JPEG or PNG file") from None


def parse_object_box(text: str) -> list[float]:
    """'x1,y1,x2,y2' normalized on the padded square -> box, checked."""
    try:
        box = [float(v) for v in text.strip("[]() ").split(",")]
    except ValueError:
        box = []
    if not data.is_box(box):
        raise SystemExit(
            f"error: --object {text!r} must be x1,y1,x2,y2 with 0 <= x1 < x2 <= 1 and "
            "0 <= y1 < y2 <= 1, normalized on the image padded to a square"
        )
    return box


class Session:
    """One image (or none) and its conversation; each `ask` adds a turn and answers it."""

    def __init__(
        self,
        model: TinyGroundingGPT,
        tok: data.Tokenizer,
        image: Image.Image | None,
        objects: list[list[float]] = (),
        system: str | None = None,
        compile: bool = False,
    ):
        self.model, self.tok, self.image, self.system = model, tok, image, system
        self.compile = compile  # decode with the compiled one-token step (model.Qwen2.generate)
        self.history: list[dict] = []
        processor = model.encoder.processor
        self.pixels = processor(image)[None] if image is not None else None  # [1, T, 3, S, S]
        self.object_pixels = torch.stack([processor(crop_object(image, b)) for b in objects]) if objects else None
        self.last: dict = {}  # inputs of the last answer, for attention_map

    def prompt(self, question: str) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """The next turn's prompt: ids up to the assistant's header, the image's and the object images' pixels."""
        turns = self._turns(question)
        text = "".join(t["value"] for t in turns)
        n_objects = text.count("<object>")
        available = 0 if self.object_pixels is None else len(self.object_pixels)
        if n_objects > available:
            raise ValueError(f"the conversation has {n_objects} <object> markers but {available} --object boxes")
        if "<image>" in text and self.image is None:
            raise ValueError("the question has <image> but no image was given")
        config = self.model.config
        ids, _ = data.encode_conversation(self.tok, turns, self.model.num_image_tokens, config.object_tokens,
                                          self.system)
        ids += [self.tok.im_start_id] + self.tok.encode("assistant\n")
        images = self.pixels if "<image>" in text else None
        return ids, images, self.object_pixels[:n_objects] if n_objects else None

    def _turns(self, question: str) -> list[dict]:
        if self.image is not None and not self.history and "<image>" not in question:
            question = "<image>\n" + question  # as in every sample
        return self.history + [{"from": "human", "value": question}]

    def ask(self, question: str, temperature: float = 0.0, max_new_tokens: int = 64, top_p: float = 1.0) -> str:
        ids, images, objects = self.prompt(question)
        context = self.model.config.llm.max_position_embeddings
        if len(ids) >= context:
            raise ValueError(f"the conversation is {len(ids)} tokens, over this model's context of {context} "
                             "tokens")
        max_new_tokens = min(max_new_tokens, context - len(ids))  # the answer ends where the context does
        answer_ids = self.model.generate(
            [ids], images=images, objects=objects, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            compile=self.compile,
        )[0]
        answer = self.tok.decode(answer_ids)
        self.history = self._turns(question) + [{"from": "gpt", "value": answer}]
        self.last = dict(prompt_ids=ids, answer_ids=answer_ids, images=images, objects=objects,
                         max_new_tokens=max_new_tokens)
        return answer


# ----------------------------------------------------------------------------- pictures


def draw_boxes(image: Image.Image, boxes: list[list[float]]) -> tuple[Image.Image, list[list[float]]]:
    """Boxes (normalized, padded square) drawn on a copy of the original image; also returns pixel boxes."""
    out, pixels = image.copy(), []
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(image.size) / 150))
    for i, box in enumerate(boxes):
        px = data.box_to_pixels(box, *image.size)
        pixels.append([round(v, 1) for v in px])
        color = BOX_COLORS[i % len(BOX_COLORS)]
        draw.rectangle(px, outline=color, width=width)
        draw.text((px[0] + width + 1, px[1] + width), str(i + 1), fill=color)
    return out, pixels


def token_spans(tok: data.Tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text (decoding prefixes: exact for byte-level BPE)."""
    spans, previous = [], 0
    for n in range(1, len(ids) + 1):
        end = len(tok.decode(ids[:n]))
        spans.append((previous, end))
        previous = end
    return spans


@torch.no_grad()
def attention_map(session: Session, source: str) -> torch.Tensor:
    """The last layer's attention of the last answer, from `source` tokens to the image patches -> [side, side].

    source: "coords" (the first box of the answer), "text" (the question's words) or "object" (the object
    image's tokens). Averaged over heads, summed over the source tokens, normalized by its maximum (to [0, 1])."""
    model, tok, last = session.model, session.tok, session.last
    prompt_ids, answer_ids = last["prompt_ids"], last["answer_ids"]
    if last["images"] is None:
        raise ValueError("--attn needs an image")
    ids = prompt_ids + answer_ids
    if source == "coords":
        spans = token_spans(tok, answer_ids)
        match = data.BOX_RE.search(tok.decode(answer_ids))
        if not match:
            raise ValueError("--attn coords needs a box in the answer; try --attn text")
        queries = [len(prompt_ids) + i for i, (a, b) in enumerate(spans) if a < match.end() and b > match.start()]
    elif source == "object":
        queries = [i for i, t in enumerate(ids) if t == model.config.object_token_id]
        if not queries:
            raise ValueError("--attn object needs an <object> in the question (and --object)")
    else:  # the question's words: the last user turn's content, without placeholders and bare whitespace
        # prompt = ... <|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n
        end = max(i for i, t in enumerate(prompt_ids) if t == tok.im_end_id)
        start = max(i for i, t in enumerate(prompt_ids[:end]) if t == tok.im_start_id) + 1
        start += len(tok.encode("user\n"))
        skip = {model.config.image_token_id, model.config.object_token_id, tok.vision_start_id, tok.vision_end_id}
        words = [i for i in range(start, end) if prompt_ids[i] not in skip]
        queries = [i for i in words if tok.decode(prompt_ids[i : i + 1]).strip()]
        if not queries:
            raise ValueError("--attn text needs words in the question")
        if max(queries) < ids.index(model.config.image_token_id):  # causal: words before the image never see it
            raise ValueError("--attn text: the question's words come before the image, so they cannot attend to "
                             "it; try --attn coords")
    ids = torch.tensor(ids)
    _, _, attn = model(ids[None], images=last["images"], objects=last["objects"], return_last_attn=True)
    weights = image_attention(attn[0], ids, queries, model.config.image_token_id).sum(0)  # [num_patches]
    side = math.isqrt(len(weights))
    return (weights / weights.max().clamp(min=1e-12)).reshape(side, side)


def draw_heat_map(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """Heat map [side, side] on the padded square, blended over the image, cropped back to the image."""
    square, left, top = data.pad_offsets(*image.size)
    h = (heat.clamp(0, 1) * 255).byte().numpy()
    mask = Image.fromarray(h, mode="L").resize((square, square), Image.BICUBIC)
    red = Image.new("RGB", (square, square), (255, 40, 0))
    canvas = Image.new("RGB", (square, square))
    canvas.paste(image, (left, top))
    blended = Image.composite(red, canvas, mask.point(lambda v: int(v * 0.7)))
    return blended.crop((left, top, left + image.size[0], top + image.size[1]))


def show_answer(image: Image.Image | None, answer: str, save_to: str | None) -> None:
    print(answer)
    boxes = data.parse_boxes(answer)
    if image is None or not boxes:
        return
    drawn, pixels = draw_boxes(image, boxes)
    for i, px in enumerate(pixels):
        print(f"  box {i + 1}: [{', '.join(f'{v:g}' for v in px)}] pixels")
    if save_to:
        drawn.save(save_to)
        print(f"  drawn on {save_to}")


# ----------------------------------------------------------------------------- OpenAI-compatible server


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


DECODING = threading.BoundedSemaphore(2)  # images decoded at once: each may take up to ~160 MB (40 MP, RGB)


def decode_data_url(url: str, max_pixels: int = data.MAX_IMAGE_PIXELS) -> Image.Image:
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise RequestError(400, "image_url.url must be a data URL: data:image/<type>;base64,<data>")
    try:
        raw = base64.b64decode(url.split(",", 1)[1], validate=True)
        with DECODING:
            return data.load_image(io.BytesIO(raw), max_pixels=max_pixels)
    except data.ImageTooLarge as e:
        raise RequestError(413, f"image_url.url: {e}") from None
    except (ValueError, UnidentifiedImageError, OSError) as e:
        raise RequestError(400, f"image_url.url does not hold a readable image ({e})") from None


def chat_turns(messages, max_image_pixels: int = data.MAX_IMAGE_PIXELS
               ) -> tuple[str | None, list[dict], Image.Image | None]:
    """OpenAI messages -> (system prompt, our turns, the image). One image at most; it becomes <image> where
    its part stands. The last message must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list")
    system, turns, image = None, [], None
    for n, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{n}].role must be system, user or assistant")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(400, f"messages[{n}].content must be a string or a list of parts")
        text = ""
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text += part["text"]
            elif kind == "image_url" and role == "user":
                if image is not None:
                    raise RequestError(400, "this model takes one image per conversation")
                url = part.get("image_url")  # {"url": ...} as OpenAI documents it; a bare string tolerated
                image = decode_data_url(url.get("url") if isinstance(url, dict) else url, max_image_pixels)
                text += "<image>\n"
            else:
                raise RequestError(400, f"messages[{n}] has an unsupported part {kind!r}")
        if role == "system":
            system = text
        else:
            turns.append({"from": "human" if role == "user" else "gpt", "value": text})
    if not turns or turns[-1]["from"] != "human":
        raise RequestError(400, "the last message must be the user's")
    return system, turns, image


class ChatServer:
    """/v1/chat/completions over one model. Requests are checked on their connection's thread, then answered
    one at a time on the model's own thread: CUDA graphs that torch.compile records belong to the thread that
    recorded them, so a thread per request would record them again (and keep another memory pool) each time."""

    def __init__(self, model: TinyGroundingGPT, tok: data.Tokenizer, name: str,
                 max_image_pixels: int = data.MAX_IMAGE_PIXELS, compile: bool = False):
        self.model, self.tok, self.name, self.count = model, tok, name, 0
        self.max_image_pixels, self.compile = max_image_pixels, compile
        self.model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # requests past their body and not yet answered: each may hold a decoded image (~160 MB at most)
        self.pending = threading.BoundedSemaphore(MAX_PENDING)

    def close(self):
        """Drop the queued requests (the one being answered finishes): Ctrl-C does not wait for the queue."""
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    def complete(self, request: dict) -> tuple[dict, list[str]]:
        """The chat.completion for a request, and its content cut into the tokens' texts (for streaming);
        503 while MAX_PENDING others are being answered or waiting, so a flood cannot pile up images."""
        if not self.pending.acquire(blocking=False):
            raise RequestError(503, f"{MAX_PENDING} requests are being answered or waiting; retry later")
        try:
            return self._complete(request)
        finally:
            self.pending.release()

    def _complete(self, request: dict) -> tuple[dict, list[str]]:
        if not isinstance(request, dict):
            raise RequestError(400, "the body must be a JSON object")
        if request.get("model") not in (None, self.name):  # as the OpenAI API answers an unknown model
            raise RequestError(404, f"the model {request['model']!r} does not exist; this server has {self.name!r}")
        if request.get("n") not in (None, 1):
            raise RequestError(400, f"n must be 1 (one answer per request), got {request['n']!r}")
        system, turns, image = chat_turns(request.get("messages"), self.max_image_pixels)
        context = self.model.config.llm.max_position_embeddings
        if 4 * len(turns) > context:  # each turn's ChatML header and end take 4 tokens or more
            raise RequestError(400, f"the messages hold {len(turns):,} turns, more than this model's context of "
                                    f"{context} tokens can hold")
        chars = sum(len(t["value"]) for t in turns) + len(system or "")
        if chars > 16 * context:  # before tokenizing: no token is shorter than 1/16 of this many characters
            raise RequestError(400, f"the messages hold {chars:,} characters, far over this model's context of "
                                    f"{context} tokens")

        def option(key, default):  # absent or null: the default (OpenAI clients send null for unset options)
            value = request.get(key)
            return default if value is None else value

        max_tokens = option("max_tokens", option("max_completion_tokens", 64))
        temperature, top_p = option("temperature", 0.0), option("top_p", 1.0)
        objects = option("objects", [])  # our extension: boxes of the object images, one per <object>
        if not (data.is_number(max_tokens) and isinstance(max_tokens, int) and 1 <= max_tokens <= 1024):
            raise RequestError(400, f"max_tokens must be an integer from 1 to 1024, got {max_tokens!r}")
        if not (data.is_number(temperature) and 0 <= temperature < math.inf):
            raise RequestError(400, f"temperature must be a number >= 0, got {temperature!r}")
        if not (data.is_number(top_p) and 0 < top_p <= 1):
            raise RequestError(400, f"top_p must be a number with 0 < top_p <= 1, got {top_p!r}")
        if not isinstance(objects, list) or not all(data.is_box(b) for b in objects):
            raise RequestError(
                400, "'objects' must be a list of [x1,y1,x2,y2] with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1"
            )
        if objects and image is None:
            raise RequestError(400, "'objects' are boxes on the image: send an image too")
        markers = sum(t["value"].count("<object>") for t in turns)
        if len(objects) > markers:  # each box is cropped and encoded: unused ones would be work for nothing
            raise RequestError(400, f"'objects' has {len(objects)} boxes for {markers} <object> markers in the "
                                    "messages: send one box per marker")
        if not isinstance(request.get("stream", False), bool):
            raise RequestError(400, f"stream must be true or false, got {request['stream']!r}")
        attention = requested_attention(request)  # our extension: the demo page's heat map
        session = Session(self.model, self.tok, image, objects, system, self.compile)
        session.history = turns[:-1]
        options = (turns[-1]["value"], temperature, max_tokens, top_p, attention)
        return self.model_thread.submit(self.answer, session, *options).result()

    def answer(self, session: Session, question: str, temperature: float, max_tokens: int, top_p: float,
               attention: str | None) -> tuple[dict, list[str]]:
        """complete's model work, on the model's thread."""
        try:
            answer = session.ask(question, temperature, max_tokens, top_p)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        self.count += 1
        prompt, completion = len(session.last["prompt_ids"]), len(session.last["answer_ids"])
        pieces = self.token_texts(session.last["answer_ids"])
        extra = attention_field(session, attention) if attention else {}
        response = {
            "id": f"chatcmpl-{self.count}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": "length" if completion >= session.last["max_new_tokens"] else "stop",
                }
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
        return response | extra, pieces


    def token_texts(self, ids: list[int]) -> list[str]:
        """The answer's text cut where its tokens end (a token that ends inside a UTF-8 character joins the
        next), so that the pieces join to exactly the answer."""
        pieces, done = [], ""
        for i in range(1, len(ids) + 1):
            text = self.tok.decode(ids[:i])
            if not text.endswith("\ufffd") and text.startswith(done) and len(text) > len(done):
                pieces.append(text[len(done):])
                done = text
        full = self.tok.decode(ids)
        return pieces + ([full[len(done):]] if full[len(done):] else [])


def stream_chunks(response: dict, pieces: list[str]) -> list[dict]:
    """A chat.completion as the chunks of OpenAI's streaming format: the role, each piece of the content, and
    the finish reason with the usage. The model writes the answer in one call, so the chunks follow it."""
    head = {k: response[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = response["choices"][0]
    chunk = lambda delta, finish=None: {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return ([chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]
            + [{**chunk({}, choice["finish_reason"]), "usage": response["usage"]}])


# ----------------------------------------------------------------------------- the demo page

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEMO_PAGE = os.path.join(ASSETS, "demo.html")
EXAMPLES = {  # the only files the page's routes read: name in the URL -> path under assets/ (an allow-list)
    "shapes_demo.png": "shapes_demo.png",
    "coffee.jpg": "photos/coffee.jpg",
    "chelsea.jpg": "photos/chelsea.jpg",
    "astronaut.jpg": "photos/astronaut.jpg",
}
# The page's own code only: inline script and style, requests to this server, images from data:/blob: URLs.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")


def requested_attention(request: dict) -> str | None:
    """The request's "attention" (our extension): None, or the source of the map to return with the answer."""
    source = request.get("attention")
    if source not in (None, "coords", "text", "object"):
        raise RequestError(400, f"attention must be \"coords\", \"text\" or \"object\", got {source!r}")
    if source and request.get("stream"):  # the chunks carry text only; the map would have nowhere to go
        raise RequestError(400, "attention is returned without stream only")
    return source


def attention_field(session: Session, source: str) -> dict:
    """The response's "attention": the map of the answer just given (attention_map), [side][side] floats on the
    padded square. A map that cannot be made (no box in the answer, no <object>, no image) does not fail the
    request, whose answer is good: it is null, with "attention_error" saying why."""
    try:
        heat = attention_map(session, source)
    except ValueError as e:
        return {"attention": None, "attention_error": str(e).replace("--attn", "attention")}
    return {"attention": [[round(v, 4) for v in row] for row in heat.tolist()]}


def demo_response(chat: ChatServer, path: str) -> tuple[str, bytes] | None:
    """A GET of the demo page -> (content type, body); None for any other path. / is assets/demo.html,
    /demo/config.json what the page needs to know of this server, /demo/examples/NAME one of EXAMPLES."""
    path = urlsplit(path).path
    if path in ("/", "/index.html"):
        with open(DEMO_PAGE, "rb") as f:  # read at each request: an edited page shows on reload
            return "text/html; charset=utf-8", f.read()
    if path == "/demo/config.json":
        config = {"model": chat.name, "max_body": MAX_BODY, "max_image_pixels": chat.max_image_pixels,
                  "examples": list(EXAMPLES)}
        return "application/json", json.dumps(config).encode()
    name = path.removeprefix("/demo/examples/")
    if name != path and name in EXAMPLES:  # a name looked up, never joined to a path: no ../ can escape
        with open(os.path.join(ASSETS, EXAMPLES[name]), "rb") as f:
            return mimetypes.guess_type(name)[0], f.read()
    return None


MAX_BODY = 32 << 20  # bytes of a request
IDLE_SECONDS = 20  # a connection silent this long is closed
BODY_SECONDS = 60  # the most a request's body may take to arrive
MAX_PENDING = 32  # requests being answered or waiting for the model at once; more are told 503


class ChatHandler(BaseHTTPRequestHandler):
    """The routes of --serve: the API (GET /v1/models, POST /v1/chat/completions) and the demo page. serve()
    makes a subclass that sets `chat`, the ChatServer that answers."""

    chat: ChatServer
    timeout = IDLE_SECONDS  # per socket read (the request line, headers, each part of a body)

    def send(self, status: int, content_type: str, body: bytes):
        """One whole response; the demo page's HTML under PAGE_POLICY (it may load nothing from elsewhere)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", PAGE_POLICY)
        self.end_headers()
        self.wfile.write(body)

    def reply(self, status: int, body: dict):
        self.send(status, "application/json", json.dumps(body).encode())

    def stream(self, chunks: list[dict]):
        """Server-sent events, one `data:` line per chunk, then `data: [DONE]`; the connection closes."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def error(self, status: int, message: str):
        self.reply(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def do_GET(self):
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self.reply(200, {"object": "list", "data": [{"id": self.chat.name, "object": "model"}]})
        elif self.path == "/health":
            self.reply(200, {"status": "ok"})
        elif page := demo_response(self.chat, self.path):
            self.send(200, *page)
        else:
            self.error(404, f"no route {self.path}; use POST /v1/chat/completions")

    def do_POST(self):
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self.error(404, f"no route {self.path}; use POST /v1/chat/completions")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self.error(400, "Content-Length must be a number")
        if length < 0:  # rfile.read(-1) would wait for the client to close the connection
            return self.error(400, "Content-Length must not be negative")
        if length > MAX_BODY:
            return self.error(413, f"request larger than {MAX_BODY >> 20} MiB")
        try:
            body = self.read_body(length)
        except TimeoutError:
            self.close_connection = True  # a client too slow to send its request: drop it
            return
        try:
            request = json.loads(body or b"null")
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past the parser's depth
            return self.error(400, f"the body is not JSON ({type(e).__name__}: {str(e)[:200]})")
        try:
            response, pieces = self.chat.complete(request)
            if request.get("stream"):
                return self.stream(stream_chunks(response, pieces))
            self.reply(200, response)
        except RequestError as e:
            self.error(e.status, str(e))
        except Exception as e:  # a bad request must never take the server down
            self.error(500, f"{type(e).__name__}: {e}")

    def read_body(self, length: int) -> bytes:
        """The body, within BODY_SECONDS in all: a client sending a byte now and then cannot hold a worker
        for long (the socket's own timeout bounds each read only)."""
        deadline, parts, left = time.monotonic() + BODY_SECONDS, [], length
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError
            part = self.rfile.read1(min(left, 1 << 16))
            if not part:
                raise TimeoutError  # the client closed before sending it all
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def refuse_method(self):
        self.error(405, f"{self.command} is not served; use GET /v1/models or POST /v1/chat/completions")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = refuse_method

    def log_message(self, fmt, *args):
        sys.stderr.write(f"[serve] {self.address_string()} {fmt % args}\n")


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, as ThreadingHTTPServer, but at most `max_connections` at once: one more is
    answered 503 and closed at once instead of taking a thread (or a file descriptor for long)."""

    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: bursts of connections wait instead of being refused

    def __init__(self, address, handler, max_connections: int = 1024):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            body = b'{"error": {"message": "too many connections; retry later", "code": 503}}'
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            return self.shutdown_request(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve(model: TinyGroundingGPT, tok: data.Tokenizer, name: str, host: str, port: int,
          max_connections: int = 1024, max_image_pixels: int = data.MAX_IMAGE_PIXELS,
          compile: bool = False) -> BoundedHTTPServer:
    """The server, bound and listening (call serve_forever). Its limits: max_connections at once, each closed
    after IDLE_SECONDS of silence; bodies up to MAX_BODY arriving within BODY_SECONDS; images up to
    max_image_pixels, two decoded at a time; prompts within the model's context; one generation at a time."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + 64  # every connection holds a file descriptor (often 1024 by default)
    if soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    handler = type("Handler", (ChatHandler,), {"chat": ChatServer(model, tok, name, max_image_pixels, compile)})
    httpd = BoundedHTTPServer((host, port), handler, max_connections)
    print(f"serving {name} on http://{host}:{httpd.server_address[1]}/v1/chat/completions", flush=True)
    print(f"demo page on http://{host}:{httpd.server_address[1]}/", flush=True)
    return httpd


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="an image file (JPEG, PNG, ...)")
    p.add_argument("prompt", nargs="?", help="the question; without it, an interactive chat")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="exported model directory (default: the shapes model)")
    p.add_argument(
        "--object",
        action="append",
        default=[],
        metavar="X1,Y1,X2,Y2",
        help="object image box for each <object> in the prompt (normalized, padded square)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", help="where to save the image with boxes (default IMAGE.boxes.png)")
    p.add_argument("--attn", choices=["coords", "text", "object"], help="save the attention map (IMAGE.attn.png)")
    p.add_argument("--serve", action="store_true", help="serve /v1/chat/completions instead")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-connections", type=int, default=1024, help="--serve: connections at once (more get 503)")
    p.add_argument("--max-image-pixels", type=int, default=data.MAX_IMAGE_PIXELS,
                   help="--serve: larger images are refused (413) before decoding")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="decode with the compiled one-token step, CUDA graphs on a GPU: a minute to compile, then "
                        "several times faster (default: with --serve on a GPU)")
    args = p.parse_args(argv)
    compile = args.compile if args.compile is not None else args.serve and args.device.startswith("cuda")
    if not args.serve and not args.image:
        p.error("give an IMAGE (and a PROMPT), or --serve")
    # the user's input first: a typo fails at once, not after loading a large model
    image = None if args.serve else open_image(args.image)
    objects = [parse_object_box(b) for b in args.object]
    try:
        model = TinyGroundingGPT.from_pretrained(args.ckpt, device=args.device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    tok = data.Tokenizer.from_file(os.path.join(args.ckpt, "tokenizer.json"))
    shipped = os.path.abspath(args.ckpt) == DEFAULT_CKPT
    print(f"model: {args.ckpt}" + (" (the shipped shapes model: it knows only the shapes world; --ckpt DIR answers "
                                   "with another)" if shipped else ""), file=sys.stderr, flush=True)
    if args.serve:
        httpd = serve(model, tok, os.path.basename(os.path.normpath(args.ckpt)), args.host, args.port,
                      args.max_connections, args.max_image_pixels, compile)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            httpd.server_close()
            httpd.RequestHandlerClass.chat.close()
        return
    session = Session(model, tok, image, objects, compile=compile)
    stem = os.path.splitext(args.image)[0]

    def turn(question: str):
        try:
            answer = session.ask(question, args.temperature, args.max_new_tokens, args.top_p)
            show_answer(image, answer, args.out or stem + ".boxes.png")
            if args.attn:
                draw_heat_map(image, attention_map(session, args.attn)).save(stem + ".attn.png")
                print(f"  attention map ({args.attn} -> image) on {stem}.attn.png")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    if args.prompt:
        return turn(args.prompt)
    print("Chat about the image (an empty line or Ctrl-D ends it).")
    while question := input("you> ").strip():
        turn(question)


if __name__ == "__main__":
    try:
        main()
    except (EOFError, KeyboardInterrupt):
        print()
