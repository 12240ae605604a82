"""Evaluation: REC Acc@0.5 (RefCOCO/+/g and the shapes splits) and POPE, batched, alone or under torchrun.

    python eval.py --ckpt runs/shapes/stage3 --task rec --data data/shapes          # every rec_*.jsonl there
    python eval.py --ckpt DIR --task rec --data refcoco/instances.json --refs "refcoco/refs(unc).p" \
        --split val --image-dir coco/train2014
    python eval.py --ckpt DIR --task pope --data data/shapes                        # every pope_*.jsonl there

REC: the training prompt (data.REC_PROMPT), greedy decoding, the first box of the answer mapped from the
padded square to original pixels and clipped; correct iff IoU >= 0.5. An answer without a box is wrong and
counted, never dropped. POPE: the benchmark's own answer parser and metrics.
"""

import argparse
import json
import os
import pickle
import re
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from model import TinyGroundingGPT, cache_length, setup_distributed

# ----------------------------------------------------------------------------- scoring (pure functions)


def score_rec_answer(answer: str, gt_px, width: int, height: int) -> tuple[list[float] | None, float]:
    """(predicted pixel box or None, IoU with the ground-truth pixel box) for one generated answer."""
    boxes = data.parse_boxes(answer)
    if not boxes:
        return None, 0.0
    pred = data.box_to_pixels(boxes[0], width, height)
    return pred, data.iou(pred, gt_px)


def pope_answer(text: str) -> str:
    """POPE's parser: text before the first '.', commas removed, split on spaces; any of No/not/no -> no."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio with 'yes' as the positive class (zero-safe)."""
    tp = sum(p == "yes" and y == "yes" for p, y in zip(predictions, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(predictions, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(predictions, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(predictions, labels))
    n = max(1, len(labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=(tp + tn) / n, precision=precision, recall=recall, f1=f1, yes_ratio=(tp + fp) / n, n=n)


# ----------------------------------------------------------------------------- batched answering


class QuestionBatches(torch.utils.data.Dataset):
    """Whole batches, read in loader workers: for a list of record indices, the pixels [T, 3, S, S] of each
    distinct image they ask about, read and preprocessed once however many questions share it."""

    def __init__(self, records: list[dict], processor):
        self.records, self.processor = records, processor

    def __getitem__(self, rows: list[int]) -> tuple[list[int], dict]:
        """(rows, {image path: pixels, or why it could not be read (a str)})."""
        images = {}
        for path in dict.fromkeys(self.records[row]["image"] for row in rows):
            try:
                images[path] = self.processor(data.load_image(path))
            except (OSError, ValueError) as e:  # unreadable, truncated or oversized: its questions only
                images[path] = f"{path}: {e}"
        return rows, images


def answer_all(model, tok, records, questions, batch_size=32, max_new_tokens=64, workers=2, desc="",
               compile=False) -> list:
    """Greedy answers (text) to one question per record, in the records' order; for a record whose image
    cannot be read, a ReadError in its place (the others are answered). The questions about one image are
    batched together, its pixels read once and its tokens computed once per batch (model.generate's image_of:
    RefCOCO asks ~7 questions per image); batching does not change answers (tests/test_eval.py). With
    compile, decoding runs the compiled one-token step (CUDA graphs on a GPU) and every batch has the same
    shapes, so it compiles once: one KV cache for the longest prompt serves every batch, and a short batch is
    filled up with copies of its last question (answered, then dropped)."""
    n_image, n_object = model.num_image_tokens, model.config.object_tokens
    prompts = [data.encode_prompt(tok, "<image>\n" + q, n_image, n_object) for q in questions]
    order = sorted(range(len(records)), key=lambda i: (records[i]["image"], len(prompts[i])))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if compile and prompts:
        context = model.config.llm.max_position_embeddings
        model.llm.setup_cache(batch_size, cache_length(max(map(len, prompts)) + max_new_tokens, context))
    loader = torch.utils.data.DataLoader(QuestionBatches(records, model.encoder.processor), sampler=batches,
                                         batch_size=None, num_workers=workers, collate_fn=lambda batch: batch)
    answers = [None] * len(records)
    for rows, images in tqdm(loader, total=len(batches), desc=desc, leave=False, disable=not desc):
        for row in rows:
            if isinstance(error := images[records[row]["image"]], str):
                answers[row] = ReadError(error)
        rows = [row for row in rows if answers[row] is None]
        if rows:
            n = len(rows)
            rows += [rows[-1]] * (batch_size - n if compile else 0)
            paths = [path for path, pixels in images.items() if not isinstance(pixels, str)]
            out = model.generate([prompts[row] for row in rows], images=torch.stack([images[p] for p in paths]),
                                 max_new_tokens=max_new_tokens, compile=compile,
                                 image_of=[paths.index(records[row]["image"]) for row in rows])
            for row, ids in zip(rows[:n], out):
                answers[row] = tok.decode(ids)
    return answers


def split_by_image(records: list[dict], rank: int, world: int) -> list[int]:
    """This process's questions under torchrun: whole images dealt out in turn, so that the questions about
    one image stay together (and share its computation)."""
    turn = {path: k % world for k, path in enumerate(dict.fromkeys(r["image"] for r in records))}
    return [i for i, r in enumerate(records) if turn[r["image"]] == rank]


class ReadError(str):
    """answer_all's stand-in for the answer to a question whose image could not be read: scored as wrong,
    its rows carry the reason in "error"."""


def evaluate_rec(model, tok, records, batch_size=32, workers=2, desc="", compile=False) -> list[dict]:
    """Per-expression results: the answer, the box read from it, its IoU with the truth, correct at 0.5."""
    questions = [data.REC_PROMPT.format(r["expression"]) for r in records]
    answers = answer_all(model, tok, records, questions, batch_size, workers=workers, desc=desc, compile=compile)
    rows = []
    for r, answer in zip(records, answers):
        pred, overlap = (None, 0.0) if isinstance(answer, ReadError) else score_rec_answer(
            answer, r["bbox"], r["width"], r["height"])
        rows.append(
            dict(
                id=r.get("where", ""),
                expression=r["expression"],
                answer="" if isinstance(answer, ReadError) else answer,
                pred_box=pred,
                gt_box=r["bbox"],
                iou=round(overlap, 4),
                correct=overlap >= 0.5,
                **({"error": str(answer)} if isinstance(answer, ReadError) else {}),
            )
        )
    return rows


def summarize_rec(rows: list[dict], seconds: float) -> dict:
    n = max(1, len(rows))
    return dict(
        n=len(rows),
        acc=sum(r["correct"] for r in rows) / n,
        miou=sum(r["iou"] for r in rows) / n,
        no_box=sum(r["pred_box"] is None for r in rows),
        per_s=len(rows) / max(seconds, 1e-9),
    )


def evaluate_pope(model, tok, records, batch_size=32, workers=2, desc="", compile=False) -> list[dict]:
    """Per-question results: the answer and the yes/no read from it, next to the label."""
    answers = answer_all(model, tok, records, [r["text"] for r in records], batch_size, 16, workers, desc, compile)
    return [
        dict(question_id=r["question_id"], text=r["text"], answer="" if isinstance(a, ReadError) else a,
             prediction="unreadable" if isinstance(a, ReadError) else pope_answer(a), label=r["label"],
             **({"error": str(a)} if isinstance(a, ReadError) else {}))
        for r, a in zip(records, answers)
    ]


# ----------------------------------------------------------------------------- reading the benchmarks


def read_pope(path: str, image_dir: str) -> list[dict]:
    """POPE's question files: JSON Lines (despite .json): question_id, image, text, label (yes/no)."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                records.append({**r, "image": os.path.join(image_dir, r["image"]), "label": r["label"].lower()})
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise SystemExit(
                    f"error: {path}:{n}: not a POPE record ({e}); expected JSON with "
                    "question_id, image, text and label per line"
                ) from None
    return records


def splits_of(args) -> dict[str, list[dict]]:
    """name -> records. --data is a folder (every rec_*.jsonl / pope_*.jsonl in it), one jsonl file, or
    (REC) RefCOCO's instances.json with --refs and --split."""
    prefix = "rec_" if args.task == "rec" else "pope_"
    if args.refs:
        if args.task != "rec":
            raise SystemExit("error: --refs is RefCOCO's REC annotation; use it with --task rec")
        try:
            records = data.read_refcoco(args.data, args.refs, args.split, args.image_dir or "")
        except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
            raise SystemExit(
                f"error: cannot read RefCOCO from --data {args.data} --refs {args.refs} "
                f"({type(e).__name__}: {e}); give COCO's instances.json, the matching refs(unc).p / "
                "refs(umd).p and a split it holds"
            ) from None
        return checked({args.split: records})
    if os.path.isdir(args.data):
        # rec_NAME.jsonl / pope_NAME.jsonl, and POPE's own coco_pope_{random,popular,adversarial}.json
        pattern = re.compile(rf"(?:\w+_)?{prefix}(\w+)\.jsonl?")
        files = sorted(f for f in os.listdir(args.data) if pattern.fullmatch(f))
        if not files:
            raise SystemExit(
                f"error: {args.data} holds no {prefix}*.jsonl file (python shapes.py splits "
                f"--out {args.data} writes the shapes splits)"
            )
        paths = {pattern.fullmatch(f)[1]: os.path.join(args.data, f) for f in files}
    elif os.path.isfile(args.data):
        paths = {os.path.splitext(os.path.basename(args.data))[0].removeprefix(prefix): args.data}
    else:
        raise SystemExit(f"error: --data {args.data} does not exist")
    read = data.read_rec_jsonl if args.task == "rec" else read_pope
    try:
        splits = {name: read(p, args.image_dir or os.path.dirname(p)) for name, p in paths.items()}
    except ValueError as e:  # data.SampleError names file and line
        raise SystemExit(f"error: {e}; expected {prefix}*.jsonl records in the documented layout") from None
    return checked(splits)


def checked(splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Every image of every record exists: a wrong --image-dir fails here, not deep in a loader worker."""
    for records in splits.values():
        for r in records:
            if not os.path.isfile(r["image"]):
                where = r.get("where") or f"question {r.get('question_id')}"
                raise SystemExit(f"error: {where}: image {r['image']} does not exist; check --image-dir")
    return splits


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="exported model directory (config.json, model.safetensors, ...)")
    p.add_argument("--task", choices=["rec", "pope"], required=True)
    p.add_argument("--data", required=True, help="a folder of splits, a jsonl file, or RefCOCO's instances.json")
    p.add_argument("--refs", help="RefCOCO's refs(unc).p / refs(umd).p (with --data instances.json)")
    p.add_argument("--split", default="val", help="with --refs: val, testA, testB, test")
    p.add_argument("--image-dir", help="image folder (default: the folder of the jsonl file)")
    p.add_argument("--out", help="write one JSON line per question here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N questions of each split")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                   help="decode with the compiled one-token step, CUDA graphs on a GPU (default: on a GPU)")
    args = p.parse_args(argv)

    rank, world, device = setup_distributed()  # under torchrun: each process answers a slice, rank 0 reports
    # the data first: a wrong path fails in a second, not after loading a large model
    splits = {name: recs[: args.limit] if args.limit else recs for name, recs in splits_of(args).items()}
    try:
        model = TinyGroundingGPT.from_pretrained(args.ckpt, device=device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    tok = data.Tokenizer.from_file(os.path.join(args.ckpt, "tokenizer.json"))
    evaluate = evaluate_rec if args.task == "rec" else evaluate_pope
    results, all_rows = {}, []
    for name, records in splits.items():
        start = time.time()
        mine = split_by_image(records, rank, world)  # this process's questions; rows go back in input order
        rows = evaluate(model, tok, [records[i] for i in mine], args.batch_size, args.workers,
                        desc=f"{args.task} {name}" if rank == 0 else "", compile=args.compile)
        rows = [{"index": i, **row} for i, row in zip(mine, rows)]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rows)
            rows = sorted((row for part in gathered for row in part), key=lambda row: row["index"])
        if args.task == "rec":
            results[name] = summarize_rec(rows, time.time() - start)
        else:
            results[name] = pope_metrics([r["prediction"] for r in rows], [r["label"] for r in rows])
            results[name]["per_s"] = len(rows) / (time.time() - start)
        all_rows += [{"split": name, **row} for row in rows]
    if rank == 0:
        print_table(args.task, results)
        if unreadable := [row for row in all_rows if "error" in row]:
            print(f"{len(unreadable)} questions had an unreadable image, scored as wrong (the first: "
                  f"{unreadable[0]['error']})")
        if args.out:
            data.atomic_write(args.out, (json.dumps(row) + "\n" for row in all_rows))
            print(f"wrote {len(all_rows)} predictions to {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def print_table(task: str, results: dict) -> None:
    if task == "rec":
        print(f"{'split':<10} {'n':>6} {'Acc@0.5':>8} {'mean IoU':>9} {'no box':>7} {'expr/s':>8}")
        for name, r in results.items():
            print(
                f"{name:<10} {r['n']:>6} {100 * r['acc']:>7.2f}% {r['miou']:>9.3f} {r['no_box']:>7} {r['per_s']:>8.1f}"
            )
    else:
        print(f"{'setting':<12} {'n':>6} {'acc':>7} {'prec':>7} {'recall':>7} {'F1':>7} {'yes':>7} {'q/s':>7}")
        for name, r in results.items():
            print(
                f"{name:<12} {r['n']:>6} {100 * r['accuracy']:>6.2f}% {100 * r['precision']:>6.2f}% "
                f"{100 * r['recall']:>6.2f}% {100 * r['f1']:>6.2f}% {100 * r['yes_ratio']:>6.2f}% "
                f"{r['per_s']:>7.1f}"
            )


if __name__ == "__main__":
    main()
