"""Research probes of the shapes model: does it choose the object by what the expression names?

    python experiments/probes.py pairs --split data/shapes/rec_testA.jsonl   # writes pairs_testA.jsonl
    python eval.py --ckpt CKPT --task rec --data data/shapes/pairs_testA.jsonl --out P.jsonl
    python experiments/probes.py score P.jsonl          # right answers, scenes both right, same box twice
    python experiments/probes.py attention CKPT [--pairs data/shapes/pairs_testA.jsonl]   # attention shift

The colour-and-shape probe asks "the {colour} {shape}" about each object of the two-object scenes whose
objects differ; the attention shift is how far the question moves the model's look over the image (0: not
at all, 1: each question looks at its own object). docs/experiments.md has what they measured.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import data  # noqa: E402
from model import TinyGroundingGPT, image_attention  # noqa: E402


def write_pairs(split_path: str) -> str:
    """The colour-and-shape probe: every two-object scene of a REC split whose objects differ in colour or
    shape, asked "the {colour} {shape}" about each of its objects in turn (2 rows per scene), written next to the
    split as pairs_{split}.jsonl. Size and salience cannot answer both rows; only reading colour and shape can."""
    out = os.path.join(os.path.dirname(split_path), "pairs_" + os.path.basename(split_path).removeprefix("rec_"))
    with open(split_path) as f, open(out, "w") as w:
        for line in f:
            row = json.loads(line)
            objects = row["scene_objects"]
            if len(objects) == 2 and len({(o["color"], o["shape"]) for o in objects}) == 2:
                for o in objects:
                    question = {**row, "expression": f"the {o['color']} {o['shape']}", "bbox": o["bbox"]}
                    w.write(json.dumps(question) + "\n")
    return out


def score_pairs(predictions_path: str) -> dict[str, int]:
    """eval.py --out rows of a pairs file (in its order) -> questions right, scenes with both right, scenes
    given the same box for both questions."""
    with open(predictions_path) as f:
        rows = [json.loads(line) for line in f]
    pairs = list(zip(rows[0::2], rows[1::2]))
    return {"questions": len(rows), "right": sum(r["correct"] for r in rows), "scenes": len(pairs),
            "both right": sum(a["correct"] and b["correct"] for a, b in pairs),
            "same box": sum(a["pred_box"] is not None and a["pred_box"] == b["pred_box"] for a, b in pairs)}


@torch.no_grad()
def attention_shift(ckpt: str, pairs_path: str, limit: int = 0) -> float:
    """Does the question steer the model's look? Over the probe's scenes: the total variation between the two
    questions' attention over the image patches (the last layer's, mean over heads, from the position that
    writes the answer's first token). 0: the look ignores the expression; 1: disjoint looks."""
    model = TinyGroundingGPT.from_pretrained(ckpt)
    tok = data.Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    rows = [json.loads(line) for line in open(pairs_path)][: limit or None]
    if len(rows) < 2:
        raise ValueError(f"{pairs_path}: {len(rows)} questions; the probe asks two per scene (probes.py pairs)")
    looks = []
    for row in rows:
        image = data.load_image(os.path.join(os.path.dirname(pairs_path), row["img_path"]))
        ids = torch.tensor(data.encode_prompt(tok, "<image>\n" + data.REC_PROMPT.format(row["expression"]),
                                              model.num_image_tokens, model.config.object_tokens))  # as eval.py
        probs = model(ids[None], images=model.encoder.processor(image)[None], return_last_attn=True)[-1]
        looks.append(image_attention(probs[0], ids, [len(ids) - 1], model.config.image_token_id)[0])  # [P]
    return sum(0.5 * (a - b).abs().sum().item() for a, b in zip(looks[0::2], looks[1::2])) / (len(looks) // 2)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="probes.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pairs", help="write the probe's questions").add_argument(
        "--split", default="data/shapes/rec_testA.jsonl", help="a REC split of shapes.py splits")
    commands.add_parser("score", help="score eval.py's predictions on the probe").add_argument("predictions")
    shift = commands.add_parser("attention", help="the attention shift of a model")
    shift.add_argument("ckpt")
    shift.add_argument("--pairs", default="data/shapes/pairs_testA.jsonl")
    args = parser.parse_args(argv)
    if args.command == "pairs":
        out = write_pairs(args.split)
        print(f"wrote {out}; score it with: python eval.py --ckpt CKPT --task rec --data {out} --out P.jsonl "
              "&& python experiments/probes.py score P.jsonl")
    elif args.command == "score":
        print(", ".join(f"{k} {v}" for k, v in score_pairs(args.predictions).items()))
    else:
        value = attention_shift(args.ckpt, args.pairs)
        print(f"attention shift between the two questions of a scene: {value:.4f} (0: the look ignores the question)")


if __name__ == "__main__":
    main(sys.argv[1:])
