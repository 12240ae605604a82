"""The real structure at tiny size, for the tests that run what users run: tiny random Qwen2.5, CLIP and
DINOv2 checkpoints written by transformers in the exact layouts of their Hub repositories, and a loopback
server that serves files as the Hub does (`/{repo}/resolve/main/{file}`, LFS files through a redirect, Range).

What is real about them: the Qwen2.5 tokenizer (tests/fixtures) and vocabulary size, tied embeddings and
sharded safetensors as 3B has; a full CLIPModel (text tower included, sharded) run with feature_layer=-2, so
its last block is never run; DINOv2 stored at a larger native size than it runs at, so its position table is
interpolated as DINOv2-L's 518 -> 336 is; patch size 14. Only the widths and depths are tiny.
"""

import gzip
import hashlib
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
QWEN_TOKENIZER_GZ = os.path.join(FIXTURES, "qwen2.5_tokenizer.json.gz")
IMAGE_SIZE = 56  # what the towers run at (4x4 patches of 14 px): the real model's 336 at tiny size
REPOS = {"qwen": "Qwen/Qwen2.5-3B-Instruct", "clip": "openai/clip-vit-large-patch14-336",
         "dino": "facebook/dinov2-large"}


def randomize(model, std: float = 0.05):
    """Perturb every parameter (norm gains, biases, LayerScale too) so that a dropped tensor changes outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def write_qwen(out: str, seed: int = 0) -> str:
    """Qwen2.5-3B-Instruct's layout: config.json with the real vocabulary (151936 rows), tied embeddings,
    bf16 weights in shards + model.safetensors.index.json, the real tokenizer.json."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
    model = randomize(transformers.Qwen2ForCausalLM(config)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="4MB")
    with gzip.open(QWEN_TOKENIZER_GZ, "rb") as src, open(os.path.join(out, "tokenizer.json"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def write_clip(out: str, native_size: int = IMAGE_SIZE, seed: int = 1) -> str:
    """openai/clip-vit-large-patch14-336's layout: a full CLIPModel (text tower and projections included),
    3 vision blocks, sharded safetensors."""
    import transformers

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=native_size, patch_size=14)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                           projection_dim=16))
    randomize(model).save_pretrained(out, max_shard_size="40KB")
    return out


def write_dinov2(out: str, native_size: int = 70, seed: int = 2) -> str:
    """facebook/dinov2-large's layout: Dinov2Model, one model.safetensors, trained at a larger size (5x5
    patches) than the model runs at (4x4), so its table is interpolated."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2,
                                       image_size=native_size, patch_size=14)
    randomize(transformers.Dinov2Model(config)).save_pretrained(out)
    return out


def write_all(root: str, clip_native_size: int = IMAGE_SIZE) -> dict[str, str]:
    """The three checkpoints under root/{qwen,clip,dino}; returns those directories by name."""
    return {"qwen": write_qwen(os.path.join(root, "qwen")),
            "clip": write_clip(os.path.join(root, "clip"), clip_native_size),
            "dino": write_dinov2(os.path.join(root, "dino"))}


class FakeHub:
    """A loopback server laid out like the Hub: GET /{repo}/resolve/main/{file}. Weight files (LFS on the Hub)
    answer with a 302 to /cdn/..., as the Hub redirects them to its CDN; Range "bytes=START-" gets a 206.

    Every file has the ETag of its sha256 (the redirect also says it in X-Linked-Etag, as the Hub does), and a
    Range request whose If-Range is not that ETag gets the whole file (200).

    `files` maps URL paths to bytes; `requests` records (path, headers). With `token` set, requests without
    that Bearer token get 401. Paths in `truncate` get their first response cut after half the body
    (Content-Length still announces the whole), as when a connection drops; paths in `bare` are answered with
    neither ETag nor Content-Length (the body ends when the connection closes)."""

    def __init__(self, token: str | None = None):
        self.files, self.requests, self.truncate, self.bare, self.token = {}, [], set(), set(), token
        self.etags = {}  # path -> the ETag to announce instead of the file's own (a file that was tampered with)
        self.forced = {}  # path -> (status, headers) to answer with, body-less (a mirror that misbehaves)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append((self.path, dict(self.headers)))
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self.send_error(401)
                path = self.path.removeprefix("/cdn")
                if path not in hub.files:
                    return self.send_error(404)
                if path in hub.forced:
                    status, headers = hub.forced[path]
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    return self.end_headers()
                data, start, bare = hub.files[path], 0, path in hub.bare
                etag = hub.etags.get(path) or '"' + hashlib.sha256(data).hexdigest() + '"'
                lfs = path.endswith((".safetensors", ".bin"))
                if lfs and not self.path.startswith("/cdn/"):
                    self.send_response(302)
                    self.send_header("Location", "/cdn" + path)
                    if not bare:
                        self.send_header("X-Linked-Etag", etag)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                fresh = self.headers.get("If-Range", etag) == etag
                if "Range" in self.headers and fresh:  # only the "bytes=START-" form download.py sends
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                if not bare:
                    self.send_header("ETag", etag)
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in hub.truncate:
                    hub.truncate.discard(path)
                    body = body[: len(body) // 2]  # then HTTP/1.0 closes the connection: a short body
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add(self, repo: str, filename: str, data: bytes) -> bytes:
        self.files[f"/{repo}/resolve/main/{filename}"] = data
        return data

    def add_dir(self, repo: str, directory: str) -> None:
        """Every file of a checkpoint directory, under repo."""
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as f:
                self.add(repo, name, f.read())

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
