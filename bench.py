"""Benchmarks: speed of the encoders, the LM's decode, REC evaluation, training steps and data loading.

Run `python bench.py NAME [--key=value ...]`. Each benchmark prints one table and the machine it ran on.
Where a benchmark compares against `transformers`, that package is the reference (as in the tests) and is
imported inside the comparison only; the product never imports it.
"""

import argparse
import platform
import sys
import time

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


BENCHMARKS = {}  # name -> function(argv: list[str]); each section below registers itself


def seconds(fn, *args) -> float:
    """Wall time of fn(*args), the GPU's queued work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def options(name: str, argv: list[str], **defaults) -> dict:
    """One benchmark's --key=value options, typed by their defaults (argparse: an unknown key or a bad value is
    an error; --help lists them with the benchmark's docstring)."""
    parser = argparse.ArgumentParser(prog=f"bench.py {name}", description=BENCHMARKS[name].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in defaults.items():
        parser.add_argument(f"--{key}", type=type(default), default=default, help=f"(default: {default})")
    return vars(parser.parse_args(argv))


# ----------------------------------------------------------------------------- encoders


def bench_encoders(argv: list[str]):
    """Images/s of the full-size tower pair (CLIP-L/14-336 + DINOv2-L/14 at 336, random weights), ours vs
    transformers' CLIPVisionModel + Dinov2Model in the same run: CUDA bf16 when available, else CPU fp32
    (--cpu=1 adds the CPU on a GPU machine; at full size it takes minutes per batch).
    Both produce the model's features (hidden_states[-2] patch tokens of each tower, concatenated): ours
    runs the 23 blocks that needs, transformers all 24 with output_hidden_states, as LLaVA-style code does.
    Options: --batch=32 --iters=3 --warmup=1 --cpu=0|1."""

    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    from encoders import CLIP_L14_336, DINOV2_L14, MultiScaleEncoder, VisionConfig

    opts = options("encoders", argv, batch=32, iters=3, warmup=1, cpu=int(not torch.cuda.is_available()))
    batch, iters, warmup = opts["batch"], opts["iters"], opts["warmup"]

    def compare(device, dtype):  # one device: build both pairs, time both, free them on return
        torch.manual_seed(0)
        ours = MultiScaleEncoder([VisionConfig(**CLIP_L14_336), VisionConfig(**DINOV2_L14)]).to(device, dtype)
        size = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
        hf_clip = CLIPVisionModel(CLIPVisionConfig(intermediate_size=4096, image_size=336, **size))
        hf_dino = Dinov2Model(Dinov2Config(mlp_ratio=4, image_size=518, **size))  # interpolates to 336
        hf_clip, hf_dino = (m.to(device, dtype).eval() for m in (hf_clip, hf_dino))
        pixels = torch.randn(batch, 2, 3, 336, 336, device=device, dtype=dtype)

        def reference():
            states = [m(pixels[:, t], output_hidden_states=True).hidden_states[-2][:, 1:]
                      for t, m in enumerate((hf_clip, hf_dino))]
            return torch.cat(states, dim=-1)

        steps = {"ours (encoders.py)": lambda: ours(pixels), "transformers": reference}
        times = {name: [] for name in steps}
        with torch.inference_mode():
            for _ in range(warmup):
                for step in steps.values():
                    step()
            for _ in range(iters):  # alternate, so that a busy machine slows both alike
                for name, step in steps.items():
                    times[name].append(seconds(step))
        for name, values in times.items():
            median = sorted(values)[len(values) // 2]
            print(f"| {device} | {str(dtype).removeprefix('torch.')} | {name} | {median:.2f} | "
                  f"{batch / median:.2f} |", flush=True)

    print(f"# full-size pair at 336 px, batch {batch}, {iters} timed iterations after {warmup} warm-up")
    print("| device | dtype | implementation | s / batch (median) | images/s |")
    print("|---|---|---|---|---|")
    if opts["cpu"]:
        compare("cpu", torch.float32)
    if torch.cuda.is_available():
        compare("cuda", torch.bfloat16)


BENCHMARKS["encoders"] = bench_encoders


# ----------------------------------------------------------------------------- synth


def _fake_synth_server(port_queue, latency: float):
    """A loopback server in its own process (so that it does not share the client's GIL) answering every
    synth.py step as a well-behaved VLM and /detect grounder would, each answer after `latency` seconds."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import synth

    step_of = {prompt.split("\n")[0]: step for step, prompt in synth.PROMPTS.items()}
    objects = {"red square": [64, 96, 256, 288], "blue circle": [320, 160, 576, 448]}  # pixels of 640x480
    answers = {
        "recognize": {"objects": list(objects)},
        "relations": {"relations": [["red_square-1", "left of", "blue_circle-1"]]},
        "fine_grained": {
            "descriptions": {"red_square-1": "the red square", "blue_circle-1": "the blue circle"},
            "relation_qas": [{"question": "Where is [the square](red_square-1)?",
                              "answer": "Left of [the circle](blue_circle-1)."}],
            "choice_qas": [{"question": "Which is round?", "options": ["red_square-1", "blue_circle-1"],
                            "answer": "blue_circle-1"}]},
        "conversation": {"conversation": [{"question": "What is on the left?",
                                           "answer": "[A square](red_square-1)."}]},
        "description": {"description": "[A square](red_square-1) and [a circle](blue_circle-1)."},
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            if self.path == "/detect":
                body = {"detections": [{"label": k, "box": v, "score": 0.9} for k, v in objects.items()]}
            else:
                text = request["messages"][-1]["content"][0]["text"]
                content = json.dumps(answers[step_of[text.split("\n")[0]]])
                message = {"role": "assistant", "content": content}
                body = {"choices": [{"message": message, "finish_reason": "stop"}]}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever()


def bench_synth(argv: list[str]):
    """synth.py's throughput (images/s, requests/s) against a local fake server in another process, with
    1 and 8 workers: --latency_ms=0 measures our own overhead (image encoding, JSON, threads, two fsyncs per
    image), a latency per answer stands in for a model. No cache, so every request is sent.
    Options: --images=48 --latency_ms=50."""
    import contextlib
    import io
    import multiprocessing
    import tempfile
    from pathlib import Path

    from PIL import Image, ImageDraw

    import synth

    opts = options("synth", argv, images=48, latency_ms=50)
    print(f"# {opts['images']} images of 640x480 per run, 6 requests per image, fake server on loopback")
    print("| latency/answer | workers | s | images/s | requests/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts["images"]):
            img = Image.new("RGB", (640, 480), (i % 256, 120, 90))
            ImageDraw.Draw(img).rectangle([64, 96, 256, 288], fill="red")
            img.save(Path(tmp) / f"{i:04d}.jpg")
        ctx = multiprocessing.get_context("spawn")
        for latency_ms in sorted({0, opts["latency_ms"]}):
            port_queue = ctx.Queue()
            server = ctx.Process(target=_fake_synth_server, args=(port_queue, latency_ms / 1000), daemon=True)
            server.start()
            url = f"http://127.0.0.1:{port_queue.get(timeout=60)}"
            for workers in (1, 8):
                cfg = synth.SynthConfig(images=tmp, out=f"{tmp}/out_{latency_ms}_{workers}.jsonl", vlm=url,
                                        vlm_model="fake", grounder=url, workers=workers, cache="none")
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    counts = synth.synthesize(cfg)
                seconds = time.perf_counter() - start
                assert counts["images_done"] == opts["images"] and counts["samples"] > 0, counts
                rates = f"{counts['images_done'] / seconds:.1f} | {counts['requests'] / seconds:.1f}"
                print(f"| {latency_ms} ms | {workers} | {seconds:.2f} | {rates} |", flush=True)
            server.terminate()
            server.join()


BENCHMARKS["synth"] = bench_synth


# ----------------------------------------------------------------------------- decode


def decode_models(c, device: str, dtype):
    """One set of random weights of LM shape `c`: transformers' Qwen2ForCausalLM, and ours sharing its tensors
    (assigned, not copied); and their size in bytes."""
    import transformers

    from model import Qwen2

    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    with torch.device(device):
        hf = transformers.Qwen2ForCausalLM(hf_config).to(dtype).eval()
    with torch.device("meta"):
        ours = Qwen2(c)
    state = {k: v for k, v in hf.state_dict().items() if k in ours.state_dict()}  # tied: no lm_head
    ours.load_state_dict(state, strict=True, assign=True)
    return ours, hf, sum(v.numel() * v.element_size() for v in state.values())


def bench_decode(argv: list[str]):
    """Decode tokens/s of the language model with random weights, batch 1 and 16: ours (model.py: static KV
    cache, plus the torch.compile'd one-token step with --compile=1, the default on CUDA) vs transformers'
    `generate` (greedy, its default dynamic cache, eager; --hf_static=1 adds its static cache + compile),
    the same weights in the same run. Decode rate = B * (N - 1) / (t(N new tokens) - t(1 new token)), so the
    prefill cancels. Memory traffic per step = weights + the KV cache read; "% roofline" compares it with a
    device-to-device copy measured here. Sizes: 3b (Qwen2.5-3B; the CUDA default, bf16), 0.5b, tiny (4 layers
    of width 256 with the full vocabulary; the CPU default, fp32).
    Options: --size --prompt=600 --new=128 --batches=1,16 --iters=3 --compile --hf_static (CPU: 64, 32)."""
    import functools

    from model import Qwen2Config

    cuda = torch.cuda.is_available()
    opts = options("decode", argv, size="3b" if cuda else "tiny", prompt=600 if cuda else 64,
                   new=128 if cuda else 32, batches="1,16", iters=3, compile=int(cuda), hf_static=0)
    sizes = {
        "3b": Qwen2Config(),
        "0.5b": Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14),
        "tiny": Qwen2Config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4),
    }
    if opts["size"] not in sizes:
        sys.exit(f"bench decode: --size must be one of {', '.join(sizes)}")
    c, device = sizes[opts["size"]], "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32

    ours, hf, weight_bytes = decode_models(c, device, dtype)

    def median(fn, *args) -> float:
        return sorted(seconds(fn, *args) for _ in range(opts["iters"]))[opts["iters"] // 2]

    src = torch.ones(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    copy_gbps = 2 * src.numel() / min(seconds(dst.copy_, src) for _ in range(5)) / 1e9  # read + write
    del src, dst

    def ours_gen(embeds, mask, n, compile=False):
        return ours.generate(embeds, mask, max_new_tokens=n, compile=compile)

    def hf_gen(ids, mask, n, **kw):
        out = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
        return out[:, ids.shape[1]:].tolist()

    P, N = opts["prompt"], opts["new"]
    print(f"# Qwen2.5-{opts['size']} shape, {str(dtype).removeprefix('torch.')}, random weights "
          f"({weight_bytes / 1e9:.2f} GB), prompt {P}, {N} new tokens, greedy, median of {opts['iters']}; "
          f"copy bandwidth {copy_gbps:.0f} GB/s")
    print("| batch | implementation | decode tok/s | ms / step | GB/s | % roofline | same tokens as HF |")
    print("|---|---|---|---|---|---|---|")
    for B in map(int, opts["batches"].split(",")):
        ids = torch.randint(0, 151643, (B, P), device=device)
        mask = torch.ones(B, P, dtype=torch.bool, device=device)
        with torch.inference_mode():
            embeds = ours.embed_tokens(ids)
        runs = {"ours (model.py, eager)": functools.partial(ours_gen, embeds, mask)}
        if opts["compile"]:
            runs["ours (model.py, compiled step)"] = functools.partial(ours_gen, embeds, mask, compile=True)
        runs["transformers generate (dynamic cache)"] = functools.partial(hf_gen, ids, mask)
        if opts["hf_static"]:
            runs["transformers generate (static cache)"] = functools.partial(hf_gen, ids, mask,
                                                                             cache_implementation="static")
        kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.itemsize
        kv_bytes = B * (P + N / 2) * kv_per_token  # the average KV cache read per step
        with torch.inference_mode():
            reference = hf_gen(ids, mask, N)
            for name, run in runs.items():
                same = run(N) == reference  # also the warm-up (and compilation)
                run(1)
                step = (median(run, N) - median(run, 1)) / (N - 1)
                gbps = (weight_bytes + kv_bytes) / step / 1e9
                print(f"| {B} | {name} | {B / step:.1f} | {step * 1e3:.2f} | {gbps:.0f} | "
                      f"{100 * gbps / copy_gbps:.0f}% | {'yes' if same else 'no'} |", flush=True)


BENCHMARKS["decode"] = bench_decode



def bench_eval(argv: list[str]):
    """REC evaluation speed: eval.answer_all, the path `eval.py --task rec` runs (images read and preprocessed
    in loader workers, the questions about one image batched together, its tokens computed once, batched
    greedy decoding; the compiled one-token step with
    --compile=1, the default on CUDA), over --n expressions on --images distinct JPEGs of COCO's size (640 x
    480), with the training prompt and the Qwen2.5 tokenizer (tests/fixtures). Random weights at the model's
    real shapes: 3b (Qwen2.5-3B + CLIP-L/14-336 + DINOv2-L/14, 576 image tokens; the CUDA default, bf16) or
    tiny (the CPU default, fp32). Answers never stop early: every one is --new tokens, what
    a box takes with Qwen's tokenizer ("[0.123,0.456,0.789,0.012]" is 25, then the end). The compilation is
    done in a warm-up batch first and reported apart. Options: --size --n=10834 (RefCOCO val) --images=1500
    --batch=32 --new=26 --compile --workers=8 (CPU: 64 expressions on 16 images, batch 16, 2 workers)."""
    import dataclasses
    import gzip
    import os
    import random
    import shutil
    import tempfile

    import numpy as np
    from PIL import Image

    import data
    import eval as ev
    from model import TinyGroundingGPT

    cuda = torch.cuda.is_available()
    opts = options("eval", argv, size="3b" if cuda else "tiny", n=10834 if cuda else 64,
                   images=1500 if cuda else 16, batch=32 if cuda else 16, new=26, compile=int(cuda),
                   workers=8 if cuda else 2)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    folder = tempfile.mkdtemp(prefix="bench-eval-")
    with gzip.open(os.path.join(os.path.dirname(__file__), "tests", "fixtures", "qwen2.5_tokenizer.json.gz")) as f:
        data.atomic_write(os.path.join(folder, "tokenizer.json"), f.read().decode())
    tok = data.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    config = train_shape(opts["size"])
    config = dataclasses.replace(
        config, llm=dataclasses.replace(config.llm, vocab_size=151936), image_token_id=tok.image_pad_id,
        object_token_id=tok.object_pad_id, pad_token_id=tok.pad_id,
        stop_token_ids=[], sampleable_size=151936)  # no stop: every answer is --new tokens
    torch.manual_seed(0)
    with torch.device(device):
        model = TinyGroundingGPT(config).to(dtype).eval()
    rng = np.random.default_rng(0)
    for i in range(opts["images"]):  # smooth noise, so that JPEG decoding costs what a photo's does
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    words = "the man woman dog left right red blue shirt small big behind near chair table car white".split()
    rand = random.Random(0)
    records = [dict(image=os.path.join(folder, f"{i % opts['images']}.jpg"), width=640, height=480,
                    expression=" ".join(rand.choices(words, k=rand.randint(1, 8)))) for i in range(opts["n"])]
    questions = [data.REC_PROMPT.format(r["expression"]) for r in records]
    prompt = len(data.encode_prompt(tok, "<image>\n" + questions[0], model.num_image_tokens, 16))
    print(f"# {opts['size']}: {str(dtype).removeprefix('torch.')}, random weights, {opts['n']:,} expressions on "
          f"{opts['images']:,} images, prompts of ~{prompt} tokens, {opts['new']} new tokens each, batch "
          f"{opts['batch']}, {opts['workers']} loader workers; compiled step: {bool(opts['compile'])}", flush=True)
    compile_s = seconds(ev.answer_all, model, tok, records[: opts["batch"]], questions[: opts["batch"]],
                        opts["batch"], opts["new"], 0, "", bool(opts["compile"]))
    total = seconds(ev.answer_all, model, tok, records, questions, opts["batch"], opts["new"], opts["workers"],
                    "eval", bool(opts["compile"]))
    print("| what | seconds | expressions/s |")
    print("|---|---|---|")
    print(f"| warm-up batch (compilation) | {compile_s:.1f} | - |")
    print(f"| REC eval, {opts['n']:,} expressions | {total:.1f} | {opts['n'] / total:.1f} |", flush=True)
    shutil.rmtree(folder, ignore_errors=True)


BENCHMARKS["eval"] = bench_eval


# ----------------------------------------------------------------------------- training step


def time_training_step(name: str, build, iters: int, tokens: int, flops: float, peak: float, profile: int):
    """Print one row of bench_train: build() -> a function running one training step of `tokens` tokens and
    `flops` FLOPs, timed over `iters` steps after a warm-up; the model is freed before the next is built."""
    import gc

    cuda = torch.cuda.is_available()
    step = None
    try:
        step = build()
        step()  # warm-up (and compilation)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dt = seconds(lambda: [step() for _ in range(iters)]) / iters
        mfu = f"{100 * flops / dt / peak:5.1f}%" if peak else "    -"
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:7.1f}GB" if cuda else "       -"
        print(f"{name:<34} {dt:>8.3f} {tokens / dt:>10,.0f} {mfu:>6} {mem:>9}", flush=True)
        if profile:  # where one more step's time goes: the kernels that took the most of it
            with torch.profiler.profile() as prof:
                seconds(step)
            sort = "self_device_time_total" if cuda else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=profile, max_name_column_width=60))
    except torch.OutOfMemoryError:
        print(f"{name:<34} out of memory", flush=True)
    step = None  # free this model (weights, gradients, activations) before the next one is built:
    torch._dynamo.reset()  # compiled code holds the blocks,
    gc.collect()  # and FSDP2's hooks make reference cycles
    if cuda:
        torch.cuda.empty_cache()


def train_shape(size: str):
    """The model bench_train times: "3b" (Qwen2.5-3B + CLIP-L/14-336 + DINOv2-L/14) or "tiny"."""
    from encoders import CLIP_L14_336, DINOV2_L14, VisionConfig
    from model import Qwen2Config, TinyGroundingGPTConfig

    if size == "3b":
        llm, towers = Qwen2Config(), [VisionConfig(**CLIP_L14_336), VisionConfig(**DINOV2_L14)]
    else:
        llm = Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2)
        tower = dict(hidden_size=64, num_layers=2, num_heads=4, mlp_size=256, patch_size=14, image_size=112)
        towers = [VisionConfig(kind="clip", **tower), VisionConfig(kind="dinov2", **tower)]
    return TinyGroundingGPTConfig(vision=towers, llm=llm, image_token_id=llm.vocab_size - 1,
                                  object_token_id=llm.vocab_size - 2, pad_token_id=0, stop_token_ids=[1],
                                  sampleable_size=llm.vocab_size - 2)


def transformers_training_step(llm, ids: torch.Tensor, checkpointing: bool):
    """-> one training step (forward + backward) of transformers' Qwen2 LM of shape `llm` on ids [B, T]: bf16
    weights on a GPU (fp32 on a CPU), SDPA, no optimizer."""
    import transformers

    with torch.device(ids.device):
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
            num_key_value_heads=llm.num_key_value_heads, tie_word_embeddings=llm.tie_word_embeddings,
            attn_implementation="sdpa")).to(torch.bfloat16 if ids.is_cuda else torch.float32)
    if checkpointing:
        hf.gradient_checkpointing_enable()
    hf.train()
    return lambda: hf(input_ids=ids, labels=ids).loss.backward()


def bench_train(argv: list[str]):
    """Training speed: train.py's own step on the whole TinyGroundingGPT (frozen towers on one image per
    sample, projector, LLM; random weights): bf16 parameters, forward + backward, then MasterWeightAdamW's
    clip and fp32 update, as train.py runs on one GPU; next to transformers' Qwen2ForCausalLM forward+backward
    of the same LM shape on the same token count (bf16 weights, SDPA, no optimizer). Reports tokens/s, MFU
    (6N + 12LHQT per token, N = LLM parameters) and peak memory. Sizes: 3b (Qwen2.5-3B + CLIP-L/14-336 +
    DINOv2-L/14; the CUDA default), tiny (the CPU default). Options: --size --batch=4 --seq=2048 --iters=5
    --ac=1 (activation checkpointing, both) --compile=0 (torch.compile each of our LLM blocks, as train.py
    --compile does) --hf_ac (transformers' checkpointing; default: as --ac) --fsdp=0 (1: wrapped by FSDP2 as
    train.py does for several processes, here with one) --optimizer=1 (0: ours forward+backward only)
    --hf=1 (0: ours only) --profile=0 (N: profile one more step, print its N costliest kernels)
    (CPU: batch 4, seq 256, ac 0)."""
    import functools
    import os

    import torch.distributed as dist

    import train
    from model import Qwen2, TinyGroundingGPT

    cuda = torch.cuda.is_available()
    opts = options("train", argv, size="3b" if cuda else "tiny", batch=4, seq=2048 if cuda else 256, iters=5,
                   ac=int(cuda), compile=0, hf_ac=-1, fsdp=0, optimizer=1, hf=1, profile=0)
    device = torch.device("cuda" if cuda else "cpu")
    config = train_shape(opts["size"])
    llm, towers = config.llm, config.vision
    if not dist.is_initialized():  # FSDP2 needs a process group, also for one process
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    B, T = opts["batch"], opts["seq"]
    torch.manual_seed(0)
    P, side = (towers[0].image_size // towers[0].patch_size) ** 2, towers[0].image_size
    ids = torch.randint(2, llm.vocab_size - 2, (B, T), device=device)
    ids[:, 1:P + 1] = config.image_token_id  # one image per sample, its P placeholder tokens after the first
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    hf_ac = bool(opts["ac"] if opts["hf_ac"] < 0 else opts["hf_ac"])

    def ours():  # -> one training step of our model as train.py runs it (train.prepare_model, train_step)
        torch.manual_seed(0)
        with torch.device(device):
            model = TinyGroundingGPT(config)
        train.set_trainable(model, "llm+projector")
        model.to(torch.bfloat16 if cuda else torch.float32)
        model.llm.activation_checkpointing = bool(opts["ac"])
        if opts["compile"]:
            for block in model.llm.layers:  # before sharding, as in train.py
                block.compile()
        if opts["fsdp"]:
            train.shard(model)
        optimizer = train.MasterWeightAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        images = torch.randn(B, len(towers), 3, side, side, device=device, dtype=next(model.parameters()).dtype)

        def step():
            model(ids, labels=labels, images=images)[1].backward()
            if opts["optimizer"]:
                optimizer.clip_grad_norm_(1.0)
                optimizer.step()
            optimizer.zero_grad()
        return step

    with torch.device("meta"):  # parameter count without allocating anything
        n_params = sum(p.numel() for p in Qwen2(llm).parameters())
    flops = 6 * n_params + 12 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim * T
    print(f"# {opts['size']}: LLM {n_params / 1e6:,.1f}M params, towers {len(towers)} x {side}px, batch "
          f"{B} x {T} tokens ({P} image tokens each), activation checkpointing: ours {bool(opts['ac'])}, "
          f"transformers {hf_ac}; compiled blocks (ours) {bool(opts['compile'])}; one model on the device at a time")
    print(f"{'implementation':<34} {'s/step':>8} {'tokens/s':>10} {'MFU':>6} {'peak mem':>9}")
    ours_name = ("ours, FSDP2" if opts["fsdp"] else "ours") + (" (+ AdamW step)" if opts["optimizer"] else "")
    reference = functools.partial(transformers_training_step, llm, ids, hf_ac)
    for name, build in [(ours_name, ours), ("transformers Qwen2 LM", reference)][:1 + opts["hf"]]:
        time_training_step(name, build, opts["iters"], B * T, flops * B * T, train.peak_flops(device), opts["profile"])
    dist.destroy_process_group()


BENCHMARKS["train"] = bench_train


# ----------------------------------------------------------------------------- data loading


def bench_data(argv: list[str]):
    """Samples/s of stage-2 shapes data through a DataLoader (drawing, tokenizing, cropping, preprocessing for
    two towers) at the tiny or the full image size, the first batches (worker start) not timed; and the
    share of padded token slots with and without length grouping.
    Options: --image_size=112 --workers=2 --batch=32 --batches=40."""

    import data
    import shapes
    import train
    from encoders import ImageProcessor, VisionConfig

    opts = options("data", argv, image_size=112, workers=2, batch=32, batches=40)
    size, workers, batch, batches = opts["image_size"], opts["workers"], opts["batch"], opts["batches"]
    configs = [VisionConfig(kind, 64, 1, 1, 128, 14, size) for kind in ("clip", "dinov2")]
    tok = data.Tokenizer.from_file(shapes.SHAPES_TOKENIZER)
    samples = shapes.ShapesStageData("stage2", batch * (batches + 2 * workers + 2))
    dataset = data.SFTDataset(samples, tok, ImageProcessor(configs), (size // 14) ** 2, 16, max_len=4096)
    lengths = dataset.lengths

    def step_batches(group: int):  # train.py's data order: one process, no gradient accumulation
        return train.StepBatches(lengths, batch, batch, 0, 1, seed=0, start_step=0,
                                 total_steps=len(lengths) // batch, group=group)

    def padding(group: int) -> float:  # share of the token slots of the padded batches that are padding
        slots = sum(len(b) * max(lengths[i] for i in b) for b in step_batches(group))
        return 1.0 - sum(lengths[i] for b in step_batches(group) for i in b) / slots

    it = iter(torch.utils.data.DataLoader(dataset, batch_sampler=step_batches(16), collate_fn=data.collate,
                                          num_workers=workers))
    for _ in range(2 * workers):
        next(it)
    start = time.time()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.time() - start)
    grouped, plain = padding(16), padding(1)
    print(f"{size} px, 2 towers, {workers} workers, batch {batch}: {rate:.0f} samples/s; padding "
          f"{100 * grouped:.1f}% of token slots with length grouping, {100 * plain:.1f}% without")


BENCHMARKS["data"] = bench_data

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        sys.exit(f"usage: python bench.py {{{','.join(sorted(BENCHMARKS))}}} [--key=value ...]")
    print(f"# machine: {machine()}, torch {torch.__version__}")
    BENCHMARKS[sys.argv[1]](sys.argv[2:])
