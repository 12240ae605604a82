"""sample.py: the CLI on a real photo, boxes and attention maps drawn right, clear errors, and the
OpenAI-compatible server answering good requests and refusing bad ones (4xx JSON, never a crash)."""

import base64
import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests
import torch
from conftest import load, serving
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(ROOT, "assets", "photos", "coffee.jpg")  # 512 x 341: padded on top and bottom
BOX_ANSWER = "The cup [0.100,0.200,0.500,0.600] and the table [0.000,0.000,1.000,1.000]."


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load(ckpt)


@pytest.fixture
def photo(tmp_path):
    """A copy of the photo: sample.py writes its pictures next to the image."""
    return str(shutil.copy(PHOTO, tmp_path / "coffee.jpg"))


def scripted(model, tok, answer):
    """model.generate answering `answer` to anything (a random model rarely writes a box)."""

    def generate(prompts, **kwargs):
        return [tok.encode(answer)[: kwargs.get("max_new_tokens", 64)] for _ in prompts]

    return generate


# ----------------------------------------------------------------------------- the command line


def test_cli_answers_about_a_real_photo_and_saves_the_attention_map(ckpt, loaded, photo, capsys):
    sample.main([photo, "What is on the table?", "--ckpt", ckpt, "--max-new-tokens", "12", "--attn", "text"])
    out = capsys.readouterr().out
    model, tok = loaded
    expected = sample.Session(model, tok, sample.open_image(photo)).ask("What is on the table?", 0.0, 12)
    assert expected.strip() and out.startswith(expected + "\n")  # greedy: the same answer, printed first
    attn_path = photo[: -len(".jpg")] + ".attn.png"
    assert f"attention map (text -> image) on {attn_path}" in out
    with Image.open(attn_path) as heat:
        assert heat.size == (512, 341)


def test_cli_draws_and_prints_the_boxes_of_the_answer(ckpt, loaded, photo, tmp_path, capsys, monkeypatch):
    model, tok = loaded
    monkeypatch.setattr(model, "generate", scripted(model, tok, BOX_ANSWER))
    monkeypatch.setattr(sample.TinyGroundingGPT, "from_pretrained", lambda ckpt, device="cpu": model)
    out_path = str(tmp_path / "drawn.png")
    sample.main([photo, "Where is the cup?", "--ckpt", ckpt, "--out", out_path, "--attn", "coords"])
    out = capsys.readouterr().out.splitlines()
    # 512x341 padded to 512x512 at top 85: y = 0.2*512-85 = 17.4, 0.6*512-85 = 222.2; the table is clipped
    assert out[:4] == [
        BOX_ANSWER,
        "  box 1: [51.2, 17.4, 256, 222.2] pixels",
        "  box 2: [0, 0, 512, 341] pixels",
        f"  drawn on {out_path}",
    ]
    with Image.open(out_path) as drawn:
        assert drawn.size == (512, 341)


def test_interactive_chat_answers_until_an_empty_line(ckpt, photo, monkeypatch, capsys):
    questions = iter(["What is it?", "And the colour?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
    sample.main([photo, "--ckpt", ckpt, "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert out.startswith("Chat about the image") and next(questions, None) is None


@pytest.mark.parametrize(
    "size, box, pixels",
    [
        ((512, 341), [0.1, 0.2, 0.5, 0.6], [51.2, 17.4, 256.0, 222.2]),  # landscape: padding top/bottom
        ((120, 300), [0.35, 0.1, 0.6, 0.5], [15.0, 30.0, 90.0, 150.0]),  # portrait: padding left/right (90)
    ],
)
def test_draw_boxes_maps_the_padded_square_to_pixels(size, box, pixels):
    image = Image.new("RGB", size, (255, 255, 255))
    drawn, px = sample.draw_boxes(image, [box])
    assert px == [pytest.approx(pixels)] and drawn.size == size
    assert image.getpixel((int(pixels[0]) + 1, int(pixels[1] + pixels[3]) // 2)) == (255, 255, 255)  # a copy
    edge = drawn.getpixel((int(pixels[0]) + 1, int(pixels[1] + pixels[3]) // 2))  # on the left edge
    assert edge == Image.new("RGB", (1, 1), sample.BOX_COLORS[0]).getpixel((0, 0))


def test_show_answer_without_boxes_saves_nothing(tmp_path, capsys):
    image = Image.new("RGB", (64, 48))
    sample.show_answer(image, "A red circle.", str(tmp_path / "x.png"))
    assert capsys.readouterr().out == "A red circle.\n" and not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- attention maps


def reference_map(model, session, queries):
    """The same map computed the long way: last-layer attention from `queries` to the image patches."""
    ids = session.last["prompt_ids"] + session.last["answer_ids"]
    with torch.no_grad():
        _, _, attn = model(torch.tensor([ids]), images=session.last["images"], objects=session.last["objects"],
                           return_last_attn=True)
    patches = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    weights = attn[0][:, queries][:, :, patches].sum(dim=(0, 1))
    return (weights / weights.max()).reshape(8, 8)


def test_attention_map_from_each_source(loaded, monkeypatch):
    model, tok = loaded
    box = "[0.100,0.200,0.500,0.600]"
    monkeypatch.setattr(model, "generate", scripted(model, tok, box))
    image = sample.open_image(PHOTO)
    session = sample.Session(model, tok, image, [[0.1, 0.2, 0.5, 0.6]])
    question = "Where is the cup?"
    assert session.ask(question + " <object>") == box
    prompt = session.last["prompt_ids"]
    n_prompt, n_answer = len(prompt), len(session.last["answer_ids"])
    words = tok.encode(question)  # "\n" before it and " " before <object> are not words
    start = next(i for i in range(n_prompt) if prompt[i : i + len(words)] == words)
    expected = {
        "coords": list(range(n_prompt, n_prompt + n_answer)),  # the whole answer is the box
        "text": list(range(start, start + len(words))),
        "object": [i for i, t in enumerate(prompt) if t == model.config.object_token_id],
    }
    assert len(expected["object"]) == model.config.object_tokens
    maps = {}
    for source, queries in expected.items():
        heat = sample.attention_map(session, source)
        assert heat.shape == (8, 8)  # 112 px / 14 px patches
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
        torch.testing.assert_close(heat, reference_map(model, session, queries))
        maps[source] = heat
        painted = sample.draw_heat_map(image, heat)
        assert painted.size == image.size and painted.mode == "RGB"
    assert not torch.allclose(maps["coords"], maps["text"])


def test_attention_map_errors_say_what_is_missing(loaded, monkeypatch):
    model, tok = loaded
    monkeypatch.setattr(model, "generate", scripted(model, tok, "no box here"))
    session = sample.Session(model, tok, sample.open_image(PHOTO))
    session.ask("What is it?")
    with pytest.raises(ValueError, match="needs a box in the answer"):
        sample.attention_map(session, "coords")
    with pytest.raises(ValueError, match="needs an <object>"):
        sample.attention_map(session, "object")
    text_only = sample.Session(model, tok, None)
    text_only.ask("Hello")
    with pytest.raises(ValueError, match="needs an image"):
        sample.attention_map(text_only, "text")



def test_text_attention_needs_words_after_the_image(loaded, monkeypatch):
    model, tok = loaded
    monkeypatch.setattr(model, "generate", scripted(model, tok, "[0.100,0.200,0.500,0.600]"))
    session = sample.Session(model, tok, sample.open_image(PHOTO))
    session.ask("Where is the cup?\n<image>")  # the words before the image: causal attention never links them
    assert sample.attention_map(session, "coords").shape == (8, 8)
    with pytest.raises(ValueError, match="before the image"):
        sample.attention_map(session, "text")
    session.ask("And the table?")  # a later turn's words come after the image
    assert sample.attention_map(session, "text").shape == (8, 8)


def test_heat_map_zero_keeps_the_image_and_one_turns_it_red():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 200, (60, 100, 3), dtype=np.uint8))  # 100 x 60
    same = sample.draw_heat_map(image, torch.zeros(8, 8))
    assert np.array_equal(np.asarray(same), np.asarray(image))
    red = np.asarray(sample.draw_heat_map(image, torch.ones(8, 8))).astype(int)
    assert red.shape == (60, 100, 3)
    assert (red[..., 0] > np.asarray(image)[..., 0]).mean() > 0.95  # 70 % towards (255, 40, 0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_error_line(ckpt, photo, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(SystemExit, match=r"^error: cannot read .*notes.txt' as an image .*give a JPEG or PNG"):
        sample.main([str(text), "hi", "--ckpt", ckpt])
    with pytest.raises(SystemExit, match=r"^error: cannot read .*missing.jpg' as an image"):
        sample.main([str(tmp_path / "missing.jpg"), "hi", "--ckpt", ckpt])
    with pytest.raises(SystemExit, match=r"^error: cannot read .* as an image"):
        sample.main([str(tmp_path), "hi", "--ckpt", ckpt])  # a folder
    for bad in ("1.5,0,0.5,0.5", "0.5,0.1,0.2,0.9", "0.1,0.5,0.4,0.5", "-0.1,0,0.5,0.5", "0.1,0.2,0.3", "a,b,c,d"):
        with pytest.raises(SystemExit, match=r"^error: --object .* must be x1,y1,x2,y2 with 0 <= x1 < x2 <= 1"):
            sample.main([photo, "What is <object>?", f"--object={bad}", "--ckpt", ckpt])
    with pytest.raises(SystemExit, match=r"^error: the conversation has 2 <object> markers but 1 --object boxes"):
        sample.main([photo, "Is <object> left of <object>?", "--object", "0.1,0.1,0.4,0.4", "--ckpt", ckpt])


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_checkpoint_missing_a_file_is_named(ckpt, photo, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    os.remove(broken / missing)
    with pytest.raises(SystemExit, match=rf"^error: .*broken has no {missing}: give a directory exported by"):
        sample.main([photo, "hi", "--ckpt", str(broken)])


def test_the_script_exits_non_zero_with_one_line(ckpt, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), str(text), "hi", "--ckpt", ckpt],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: cannot read") and result.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(loaded):
    with serving(*loaded, "tiny") as url:
        yield url


def chat(url, body, **kwargs):
    return requests.post(url + "/v1/chat/completions", json=body, timeout=60, **kwargs)


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_server_text_only_completion(server, loaded):
    model, tok = loaded
    r = chat(server, {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hello, who are you?"}],
                      "max_tokens": 6})
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    body = r.json()
    expected = sample.Session(model, tok, None, system="Be brief.").ask("Hello, who are you?", 0.0, 6)
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == 6 else "stop")


def test_server_image_and_text_completion(server, loaded):
    model, tok = loaded
    image = Image.open(PHOTO).convert("RGB").resize((96, 64))
    content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}},
               {"type": "text", "text": "What is in the image?"}]
    r = chat(server, {"messages": [{"role": "user", "content": content}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    expected = sample.Session(model, tok, image).ask("<image>\nWhat is in the image?", 0.0, 8)
    assert r.json()["choices"][0]["message"]["content"] == expected  # the image reached the model
    assert r.json()["usage"]["prompt_tokens"] > model.num_image_tokens
    # multi-turn, with an object image (our "objects" extension)
    turns = [{"role": "user", "content": content}, {"role": "assistant", "content": "A cup."},
             {"role": "user", "content": "And <object>?"}]
    r = chat(server, {"messages": turns, "objects": [[0.1, 0.2, 0.5, 0.6]], "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_server_streams_server_sent_events_that_join_to_the_answer(server):
    body = {"messages": [{"role": "user", "content": "Hello, who are you?"}], "max_tokens": 8}
    whole = chat(server, body).json()
    r = chat(server, {**body, "stream": True}, stream=True)
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == whole["choices"][0]["message"]["content"] and len(chunks) >= 3
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    assert chat(server, {**body, "stream": "yes"}).status_code == 400


def test_server_generates_on_one_thread_whatever_the_connection(server, loaded, monkeypatch):
    """Requests from several connections at once: every generation runs on the same thread, one at a time
    (CUDA graphs recorded by `--compile` belong to the thread that recorded them), and each gets its answer."""
    model, _ = loaded
    threads, running, overlap = [], [0], [False]
    generate = model.generate

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        running[0] += 1
        overlap[0] |= running[0] > 1
        try:
            return generate(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(model, "generate", recording)
    bodies = [{"messages": [{"role": "user", "content": f"Hello number {i}"}], "max_tokens": 4} for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda body: chat(server, body), bodies))
    assert all(r.status_code == 200 for r in replies) and len(threads) == 6
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident() and not overlap[0]


def test_server_lists_its_model(server):
    r = requests.get(server + "/v1/models", timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    assert requests.get(server + "/health", timeout=10).json() == {"status": "ok"}


def raw_request(url, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def test_server_refuses_bad_requests_with_4xx_json_and_keeps_serving(server):
    image = png_data_url(Image.new("RGB", (32, 32), (200, 0, 0)))
    user = {"role": "user", "content": "hi"}

    def with_image(*parts, text="What is it?"):
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]

    def image_part(url):
        return {"type": "image_url", "image_url": {"url": url}}

    bad = {
        "not a JSON object": [1, 2],
        "no messages": {"model": "tiny"},
        "messages not a list": {"messages": "hi"},
        "empty messages": {"messages": []},
        "message not an object": {"messages": ["hi"]},
        "unknown role": {"messages": [{"role": "robot", "content": "hi"}]},
        "content neither text nor parts": {"messages": [{"role": "user", "content": 3}]},
        "unknown part": {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
        "last message not the user's": {"messages": [user, {"role": "assistant", "content": "hello"}]},
        "only a system message": {"messages": [{"role": "system", "content": "Be brief."}]},
        "a URL, not a data URL": {"messages": with_image(image_part("http://example.com/a.png"))},
        "bad base64": {"messages": with_image(image_part("data:image/png;base64,@@@"))},
        "base64 of no image": {"messages": with_image(image_part("data:image/png;base64,aGVsbG8="))},
        "no url": {"messages": with_image({"type": "image_url"})},
        "two images": {"messages": with_image(image_part(image), image_part(image))},
        "image in an assistant turn": {"messages": [{"role": "assistant", "content": [image_part(image)]}, user]},
        "<image> without an image": {"messages": [{"role": "user", "content": "<image>\nWhat is it?"}]},
        "more <object> than objects": {"messages": with_image(image_part(image), text="Is <object> red?")},
        "objects without an image": {"messages": [user], "objects": [[0.1, 0.1, 0.5, 0.5]]},
        "object box out of range": {"messages": with_image(image_part(image)), "objects": [[0.1, 0.1, 1.5, 0.5]]},
        "object box reversed": {"messages": with_image(image_part(image)), "objects": [[0.5, 0.1, 0.1, 0.5]]},
        "object box of 3 numbers": {"messages": with_image(image_part(image)), "objects": [[0.1, 0.1, 0.5]]},
        "objects not a list": {"messages": with_image(image_part(image)), "objects": "0.1,0.1,0.5,0.5"},
        "more objects than <object>": {"messages": with_image(image_part(image), text="Is <object> red?"),
                                       "objects": [[0.1, 0.1, 0.5, 0.5]] * 10_000},
        "max_tokens 0": {"messages": [user], "max_tokens": 0},
        "max_tokens too large": {"messages": [user], "max_tokens": 5000},
        "max_tokens negative": {"messages": [user], "max_completion_tokens": -3},
        "max_tokens not a number": {"messages": [user], "max_tokens": "ten"},
        "max_tokens not an integer": {"messages": [user], "max_tokens": 2.5},
        "negative temperature": {"messages": [user], "temperature": -1},
        "temperature not a number": {"messages": [user], "temperature": "hot"},
        "top_p 0": {"messages": [user], "top_p": 0},
        "top_p above 1": {"messages": [user], "top_p": 1.5},
        "n of 2": {"messages": [user], "n": 2},
        "a prompt past the model's context": {"messages": [{"role": "user", "content": "red " * 300}]},
        "characters far past the context": {"messages": [{"role": "user", "content": "x" * 5000}]},
        "stream not a boolean": {"messages": [user], "stream": "yes"},
    }
    for why, body in bad.items():
        r = chat(server, body)
        assert r.status_code == 400, (why, r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == 400 and isinstance(error["message"], str) and error["message"], why
    for why, payload in {"not JSON": b"{'messages': nope", "empty body": b"", "JSON null": b"null"}.items():
        r = requests.post(server + "/v1/chat/completions", data=payload, timeout=30,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == 400, why
    r = requests.post(server + "/v1/chat/completions", data="nope", timeout=30)
    assert "not JSON" in r.json()["error"]["message"]
    for method, route in [("get", "/v1/nope"), ("post", "/v1/completions"), ("get", "/v1/chat/completions")]:
        r = getattr(requests, method)(server + route, json={"messages": [user]}, timeout=30)
        assert r.status_code == 404 and "use POST /v1/chat/completions" in r.json()["error"]["message"]
    for length in (b"abc", b"-1"):  # a negative length must not leave the server waiting for the body
        reply = raw_request(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                            + b"\r\n\r\n{}")
        assert reply.startswith(b"HTTP/1.0 400") and b"Content-Length must" in reply, reply[:200]
    r = chat(server, {"messages": [{"role": "user", "content": "red " * 300}]})
    assert "over this model's context of 256 tokens" in r.json()["error"]["message"]
    r = chat(server, {"messages": [{"role": "user", "content": "red " * 100}], "max_tokens": 1000})
    usage = r.json()["usage"]  # a prompt that fits: the answer may run to the end of the context, no further
    assert r.status_code == 200 and usage["total_tokens"] <= 256
    r = chat(server, {"model": "gpt-4o", "messages": [user]})  # as OpenAI answers a model it does not have
    assert r.status_code == 404 and "'gpt-4o' does not exist" in r.json()["error"]["message"]
    bomb = io.BytesIO()
    Image.new("1", (7000, 7000)).save(bomb, format="PNG")  # 49 MP in a few KB: refused before decoding
    r = chat(server, {"messages": with_image(image_part("data:image/png;base64," + base64.b64encode(
        bomb.getvalue()).decode()))})
    assert r.status_code == 413 and "over the limit of 40,000,000" in r.json()["error"]["message"]
    for why, payload in {"not UTF-8": b'{"messages": "\xff\xfe"}', "nested past the parser": b"[" * 100_000}.items():
        r = requests.post(server + "/v1/chat/completions", data=payload, timeout=30)
        assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"], why
    r = chat(server, {"messages": [{"role": "user", "content": ""}] * 100_000 + [user]})  # refused before tokenizing
    assert r.status_code == 400 and "100,001 turns" in r.json()["error"]["message"]
    for extreme in ({"temperature": 1e-38}, {"temperature": 1e-50}, {"temperature": 0.5, "top_p": 1e-300}):
        assert chat(server, {"messages": [user], "max_tokens": 2, **extreme}).status_code == 200, extreme
    for method in ("put", "delete", "patch"):
        r = getattr(requests, method)(server + "/v1/chat/completions", json={"messages": [user]}, timeout=30)
        assert r.status_code == 405 and r.json()["error"]["code"] == 405, method
    r = chat(server, {"messages": [user], "max_tokens": 3, "temperature": None, "top_p": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3  # still serving; null = default


def test_serve_command_line_answers_and_stops_on_ctrl_c(ckpt):
    """`python sample.py --serve --port 0` prints where it listens, answers, and exits cleanly on SIGINT."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--serve", "--port", "0", "--ckpt", ckpt,
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # as from a terminal: a background job of a script would inherit SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stderr.readline() == f"model: {ckpt}\n"  # which model answers, first
        line = proc.stdout.readline()
        match = re.fullmatch(r"serving (\S+) on (http://127\.0\.0\.1:\d+)/v1/chat/completions\n", line)
        assert match and match[1] == os.path.basename(ckpt), line
        assert requests.get(match[2] + "/v1/models", timeout=30).json()["data"][0]["id"] == match[1]
        r = chat(match[2], {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def test_server_answers_503_past_its_pending_requests(loaded):
    """Past MAX_PENDING requests answered or waiting, the next is refused at once (each may hold an image)."""
    chat_server = sample.ChatServer(*loaded, "tiny")
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    for _ in range(sample.MAX_PENDING):
        chat_server.pending.acquire()  # as if MAX_PENDING requests were waiting for the model
    with pytest.raises(sample.RequestError, match="32 requests are being answered or waiting") as refused:
        chat_server.complete(body)
    assert refused.value.status == 503
    chat_server.pending.release()
    assert chat_server.complete(body)[0]["usage"]["completion_tokens"] <= 2
    chat_server.close()


def test_server_under_hostile_load_keeps_answering_a_normal_client(ckpt):
    """A bounded load test on loopback against `sample.py --serve`: 1,000 idle connections (half of them with
    half a request sent), four clients sending decompression bombs (12000 x 12000 PNGs of ~20 KB) and prompts
    past the context, and a normal client alongside. The normal client gets every answer, the server's peak
    memory grows by less than 300 MB (before: each bomb decoded to 432 MB, four at a time), it is alive at
    the end, and a connection past --max-connections is told 503 at once."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--serve", "--port", "0", "--ckpt", ckpt,
                             "--device", "cpu", "--max-connections", "1100"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    idle = []
    try:
        url = re.search(r"(http://\S+)/v1/chat/completions", proc.stdout.readline())[1]
        normal = {"messages": [{"role": "user", "content": "Where is the red circle?"}], "max_tokens": 4}
        assert chat(url, normal).status_code == 200
        baseline = peak_rss_mb(proc.pid)
        host, port = url.removeprefix("http://").split(":")
        for k in range(1000):
            s = socket.create_connection((host, int(port)), timeout=10)
            if k % 2:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"messages\"")
            idle.append(s)
        png = io.BytesIO()
        Image.new("1", (12000, 12000)).save(png, format="PNG")
        bomb_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        bomb = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bomb_url}},
                                                          {"type": "text", "text": "What is it?"}]}]}
        long_prompt = {"messages": [{"role": "user", "content": "red circle " * 2000}]}
        hostile_codes = []

        def hostile():
            for _ in range(5):
                hostile_codes.append(chat(url, bomb).status_code)
                hostile_codes.append(chat(url, long_prompt).status_code)

        threads = [threading.Thread(target=hostile) for _ in range(4)]
        for t in threads:
            t.start()
        answers = [chat(url, normal) for _ in range(5)]
        for t in threads:
            t.join(timeout=120)
        assert [r.status_code for r in answers] == [200] * 5
        assert sorted(set(hostile_codes)) == [400, 413] and len(hostile_codes) == 40
        assert peak_rss_mb(proc.pid) - baseline < 300, (baseline, peak_rss_mb(proc.pid))
        for _ in range(101):  # 1,100 connections: the 1,101st is refused at once, not queued
            idle.append(socket.create_connection((host, int(port)), timeout=10))
        assert idle[-1].recv(200).startswith(b"HTTP/1.1 503")
        for s in idle:
            s.close()
        idle.clear()
        assert requests.get(url + "/health", timeout=30).json() == {"status": "ok"}
        assert chat(url, normal).status_code == 200
    finally:
        for s in idle:
            s.close()
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- the demo page's routes


def test_server_serves_the_demo_page_and_only_its_examples(server):
    r = requests.get(server + "/", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "/v1/chat/completions" in r.text and "<canvas" in r.text
    policy = r.headers["Content-Security-Policy"]  # the page may load nothing from elsewhere
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert not re.search(r"(src|href)=\"(https?:)?//", r.text)  # nor does it try: it works offline
    config = requests.get(server + "/demo/config.json", timeout=10).json()
    assert config["model"] == "tiny" and config["max_body"] == sample.MAX_BODY
    assert config["examples"] == list(sample.EXAMPLES) and "shapes_demo.png" in config["examples"]
    for name in config["examples"]:
        r = requests.get(f"{server}/demo/examples/{name}", timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("image/"), name
        with open(os.path.join(ROOT, "assets", sample.EXAMPLES[name]), "rb") as f:
            assert r.content == f.read()
    for path in ("/demo/examples/../sample.py", "/demo/examples/%2e%2e/sample.py", "/demo/examples/photos/LICENSE.txt",
                 "/demo/examples/", "/demo/examples//etc/passwd", "/demo/examples/tokenizer.json", "/demo.html",
                 "/assets/demo.html"):
        r = requests.get(server + path, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == 404, path
    reply = raw_request(server, b"GET /demo/examples/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n")  # not normalized
    assert reply.startswith(b"HTTP/1.0 404"), reply[:100]


def test_server_returns_the_attention_map_on_request(server, loaded, monkeypatch):
    model, tok = loaded
    image = png_data_url(Image.open(PHOTO).convert("RGB").resize((96, 64)))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "Where is the cup?"}]}]
    monkeypatch.setattr(model, "generate", scripted(model, tok, "[0.100,0.200,0.500,0.600]"))
    body = chat(server, {"messages": messages, "attention": "coords"}).json()
    session = sample.Session(model, tok, sample.decode_data_url(image))
    session.ask("Where is the cup?")
    expected = sample.attention_map(session, "coords")
    assert torch.allclose(torch.tensor(body["attention"]), expected, atol=1e-4) and "attention_error" not in body
    assert "attention" not in chat(server, {"messages": messages}).json()  # only when asked
    body = chat(server, {"messages": messages, "attention": "object"}).json()  # the answer stands; the map cannot
    assert body["choices"][0]["message"]["content"] == "[0.100,0.200,0.500,0.600]"
    assert body["attention"] is None and "attention object needs an <object>" in body["attention_error"]
    for bad in ({"attention": "pixels"}, {"attention": 1}, {"attention": "text", "stream": True}):
        r = chat(server, {"messages": messages, **bad})
        assert r.status_code == 400 and "attention" in r.json()["error"]["message"], bad


@pytest.mark.parametrize("url", ["https://example.com/a.png", "http://127.0.0.1:1/a.png", "file:///etc/passwd"])
def test_server_never_fetches_an_image_url(server, url):
    r = chat(server, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                {"type": "text", "text": "What is it?"}]}]})
    assert r.status_code == 400 and "must be a data URL" in r.json()["error"]["message"]
