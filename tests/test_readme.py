"""README.md's "The real model" block, run line by line at tiny scale, as a user would run it.

The lines are read from the README itself, so the block cannot drift from what works. What the test changes,
and only this: the scripts are called by their path in this repository; `--nproc_per_node=8` becomes 2 (gloo
on the CPU); the server's port 8000 becomes a free one; train.py's lines get TINY appended (the towers' input
size of the tiny checkpoints, a small batch, a few steps). Around the lines: a fake Hub (tiny_hub) serves tiny
Qwen2.5 / CLIP / DINOv2 checkpoints under the real repo ids through HF_ENDPOINT, and the working directory
holds small files in the datasets' published formats (LLaVA-Pretrain's JSON, RefCOCO's instances.json +
refs(unc).p, LLaVA-v1.5-mix665k's JSON) with their images. The served model is asked with the official
`openai` client, plainly and streaming.
"""

import base64
import io
import json
import os
import pickle
import random
import re
import shlex
import subprocess
import sys

import pytest
import tiny_hub
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size=56", "--batch_size=8", "--micro_batch_size=2", "--max_steps=2", "--num_workers=0",
        "--max_len=512"]
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


def readme_commands() -> list[list[str]]:
    """The argv of each line of the first bash block under '## The real model' (comments dropped)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## The real model"):]
    block = section[section.index("```bash\n") + 8 : section.index("```", section.index("```bash\n") + 8)]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def as_run_here(argv: list[str]) -> list[str]:
    """A README line as this test runs it (see the module docstring)."""
    script = lambda name: os.path.join(ROOT, name) if name.endswith(".py") else name
    if argv[0] == "python":
        argv = [sys.executable, script(argv[1]), *argv[2:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *map(script, argv[1:])]
    argv = [a.replace("--nproc_per_node=8", "--nproc_per_node=2") for a in argv]
    if any(a.endswith("train.py") for a in argv):
        argv += TINY
    if "--serve" in argv:
        argv[argv.index("--port") + 1] = "0"
    return argv


def scene(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[tuple[str, list[int]]]]:
    """A non-square picture with 2-3 coloured rectangles; (colour name, xywh pixel box) of each."""
    image = Image.new("RGB", size, (240, 240, 235))
    draw, objects = ImageDraw.Draw(image), []
    for name in rng.sample(sorted(COLORS), rng.randint(2, 3)):
        w, h = rng.randint(8, size[0] // 2), rng.randint(8, size[1] // 2)
        x, y = rng.randint(0, size[0] - w), rng.randint(0, size[1] - h)
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLORS[name])
        objects.append((name, [x, y, w, h]))
    return image, objects


def write_datasets(work) -> None:
    """LLaVA-Pretrain (16 captions), RefCOCO (train and val refs, two sentences each), LLaVA-v1.5-mix665k
    (image and text-only conversations), in their published layouts, under `work`."""
    rng = random.Random(0)
    llava = []
    for i in range(16):
        path = f"{i // 10:05d}/{i:09d}.jpg"
        image, objects = scene(rng, (64, 48))
        os.makedirs(work / "images" / "llava" / os.path.dirname(path), exist_ok=True)
        image.save(work / "images" / "llava" / path)
        llava.append({"id": f"{i:09d}", "image": path, "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": " and ".join(f"a {name} box" for name, _ in objects)}]})
    (work / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(llava))

    coco, images, annotations, refs = work / "images" / "coco" / "train2014", [], [], []
    os.makedirs(coco)
    os.makedirs(work / "refcoco")
    for i in range(10):
        image_id, file_name = 1000 + i, f"COCO_train2014_{1000 + i:012d}.jpg"
        image, objects = scene(rng, (60, 80) if i % 2 else (80, 60))
        image.save(coco / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for k, (name, box) in enumerate(objects[:2]):
            ann_id = 10 * image_id + k
            annotations.append({"id": ann_id, "image_id": image_id, "bbox": box, "category_id": 1})
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1,
                         "split": "val" if i >= 8 else "train", "sent_ids": [2 * ann_id, 2 * ann_id + 1],
                         "sentences": [{"sent": f"{name} box", "sent_id": 2 * ann_id, "tokens": [name, "box"]},
                                       {"sent": f"the {name} one", "sent_id": 2 * ann_id + 1,
                                        "tokens": ["the", name, "one"]}]})
    (work / "refcoco" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}))
    with open(work / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the published pickles are Python 2's

    mix = [{"id": f"mix-{i}", "image": f"coco/train2014/{images[i]['file_name']}", "conversations": [
        {"from": "human", "value": "<image>\nWhat colours do you see?"}, {"from": "gpt", "value": "Some boxes."},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "A few."}]} for i in range(4)]
    mix += [{"id": f"text-{i}", "conversations": [{"from": "human", "value": "Say hello."},
                                                   {"from": "gpt", "value": "Hello!"}]} for i in range(2)]
    (work / "llava_v1_5_mix665k.json").write_text(json.dumps(mix))
    scene(rng, (90, 70))[0].save(work / "photo.jpg")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The fake Hub serving the tiny checkpoints under the real repo ids."""
    server = tiny_hub.FakeHub()
    written = tiny_hub.write_all(str(tmp_path_factory.mktemp("checkpoints")))
    for name, directory in written.items():
        server.add_dir(tiny_hub.REPOS[name], directory)
    yield server
    server.close()


def test_readme_real_model_section_runs_as_written(hub, tmp_path):
    commands = readme_commands()
    programs = [next(a for a in argv if a.endswith(".py")) for argv in commands]
    assert programs == ["download.py", "data.py", "data.py", "data.py", "train.py", "train.py", "train.py",
                        "eval.py", "sample.py", "sample.py"], programs  # this test checks each one below
    write_datasets(tmp_path)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1"}
    env.pop("HF_TOKEN", None)
    outputs = []
    for argv in commands[:-1]:
        result = subprocess.run(as_run_here(argv), cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout + result.stderr)

    assert any(p.startswith("/cdn/Qwen/Qwen2.5-3B-Instruct/") for p in hub.paths())  # weights via the redirect
    assert sorted(os.listdir(tmp_path / "weights")) == ["clip-l-336", "dinov2-l", "qwen2.5-3b"]
    stage1 = [json.loads(line) for line in open(tmp_path / "stage1.jsonl")]
    assert len(stage1) == 16 and all(os.path.isfile(tmp_path / "images" / s["image"]) for s in stage1)
    stage2 = [json.loads(line)["conversations"] for line in open(tmp_path / "stage2.jsonl")]
    questions = [turn["value"].removeprefix("<image>\n") for turns in stage2 for turn in turns[::2]]
    rec = [q for q in questions if q.startswith("Output the coordinate of ") and "<object>" not in q]
    assert len(rec) == 32  # 8 train images x 2 objects x 2 expressions: each one a REC question (Table 7)
    assert len(stage2) == 8  # an image's questions packed into one conversation (up to 8 turns)
    for phase in ("stage1-pretrain", "stage1", "stage2", "stage3"):
        assert os.path.isfile(tmp_path / "runs" / "tgg" / phase / "model.safetensors"), phase
    log = "".join(outputs[4:7])
    assert "stage1-pretrain: starts from weights/clip-l-336 + weights/dinov2-l + weights/qwen2.5-3b" in log
    assert "stage3: 22 samples from llava_v1_5_mix665k.json,stage3.jsonl; skipped: no bad samples" in log

    # eval under torchrun: one row per expression of the val split, in the input order, each id its own
    assert re.search(r"^val +8 ", outputs[7], re.M), outputs[7]
    rows = [json.loads(line) for line in open(tmp_path / "refcoco_val.jsonl")]
    assert [r["index"] for r in rows] == list(range(8)) and len({r["id"] for r in rows}) == 8
    assert rows[0]["expression"].endswith(" box") and rows[1]["expression"].startswith("the ")
    assert "model: runs/tgg/stage3" in outputs[8]

    serve_and_ask(as_run_here(commands[-1]), tmp_path, env)


def serve_and_ask(argv: list[str], cwd, env) -> None:
    """Start the README's server line, ask it with the official openai client (plain and streaming)."""
    openai = pytest.importorskip("openai")
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == "model: runs/tgg/stage3\n"
        match = re.fullmatch(r"serving stage3 on (http://127\.0\.0\.1:\d+)/v1/chat/completions\n",
                             proc.stdout.readline())
        assert match
        client = openai.OpenAI(base_url=match[1] + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["stage3"]
        buf = io.BytesIO()
        Image.open(cwd / "photo.jpg").save(buf, format="JPEG")
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "Output the coordinate of the red box"}]}]
        reply = client.chat.completions.create(model="stage3", messages=messages, max_tokens=8)
        answer = reply.choices[0].message.content
        assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 16
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="stage3", messages=messages, max_tokens=8, stream=True) if c.choices]
        assert "".join(pieces) == answer and len(pieces) >= 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_function_the_readme_names_exists():
    """The paper -> code map and the rest of the README name functions as `file.name`: each must exist, so a
    rename cannot leave the map pointing at nothing."""
    import importlib

    text = open(os.path.join(ROOT, "README.md")).read()
    modules = "encoders|model|data|train|eval|sample|synth|shapes|download"
    names = set(re.findall(rf"`(?:python )?((?:{modules})\.(?!py\b)[A-Za-z_][\w.]*)", text))
    assert len(names) > 40  # the map itself
    missing = []
    for name in sorted(names):
        obj = importlib.import_module(name.split(".")[0])
        for attr in name.split(".")[1:]:
            obj = getattr(obj, attr, None)
        missing += [name] if obj is None else []
    assert not missing
