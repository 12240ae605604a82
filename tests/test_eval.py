"""Scorers of eval.py on hand-computed cases: coordinate frames, clipping, degenerate and missing boxes, POPE."""

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import load

import data
import eval as ev
import shapes as shapes_world


def test_rec_answer_is_mapped_from_the_padded_square_to_original_pixels():
    # 200x100 image: padded square S=200, pasted at top=50. Box [0.25,0.25,0.75,0.75] on the square is
    # x 50..150, y 50..150 on the square -> y 0..100 on the image.
    pred, iou = ev.score_rec_answer("It is at [0.250,0.250,0.750,0.750].", [50, 0, 150, 100], 200, 100)
    assert pred == pytest.approx([50, 0, 150, 100])
    assert iou == pytest.approx(1.0)


def test_rec_answer_reaching_into_the_padding_is_clipped_then_scored():
    pred, iou = ev.score_rec_answer("[0.250,0.000,0.750,1.000]", [50, 0, 150, 100], 200, 100)
    assert pred == pytest.approx([50, 0, 150, 100])  # y: 0*200-50 -> clipped to 0; 1*200-50=150 -> clipped 100
    assert iou == pytest.approx(1.0)
    pred, iou = ev.score_rec_answer("[0.250,0.250,0.750,0.500]", [50, 0, 150, 100], 200, 100)
    assert pred == pytest.approx([50, 0, 150, 50])
    assert iou == pytest.approx(0.5)


def test_rec_answer_clipped_to_the_image_and_first_box_wins():
    pred, iou = ev.score_rec_answer("[ 0.0, 0.0 , 1.2, 1.0 ] and [0.1,0.1,0.2,0.2]", [0, 0, 100, 100], 100, 100)
    assert pred == pytest.approx([0, 0, 100, 100])
    assert iou == pytest.approx(1.0)


@pytest.mark.parametrize("answer", ["", "the red circle", "[0.1,0.2,0.3]", "(0.1,0.2),(0.3,0.4)"])
def test_unparseable_answers_are_wrong_not_dropped(answer):
    pred, iou = ev.score_rec_answer(answer, [0, 0, 10, 10], 100, 100)
    assert pred is None and iou == 0.0


def test_degenerate_predicted_box_scores_zero():
    pred, iou = ev.score_rec_answer("[0.5,0.5,0.5,0.9]", [40, 40, 60, 60], 100, 100)
    assert pred is not None and iou == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog.", "no"),
        ("Yes. But no cat.", "yes"),  # only the text before the first '.' counts
        ("no", "no"),
        ("NO", "yes"),  # the benchmark's parser is case-sensitive: only No/not/no
        ("Nope", "yes"),
        ("", "yes"),
        ("yes,no", "yes"),  # commas are removed, not split on: "yesno" is one word
    ],
)
def test_pope_parser_edge_cases(text, expected):
    assert ev.pope_answer(text) == expected


def test_pope_metrics_hand_computed():
    preds = ["yes", "yes", "no", "no", "yes"]
    labels = ["yes", "no", "no", "yes", "yes"]  # tp=2 fp=1 tn=1 fn=1
    m = ev.pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
    zero = ev.pope_metrics(["no", "no"], ["no", "no"])
    assert zero["precision"] == 0.0 and zero["f1"] == 0.0 and zero["accuracy"] == 1.0


# ----------------------------------------------------------------------------- eval.main on a tiny checkpoint

REC_FIELDS = {"split", "index", "id", "expression", "answer", "pred_box", "gt_box", "iou", "correct"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes_world.write_shapes_splits(str(out), n=8)
    return out


def run_eval(ckpt, *args):
    return ev.main(["--ckpt", str(ckpt), "--workers", "0", *map(str, args)])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_rec_on_the_shapes_splits_reports_every_split_and_writes_documented_rows(ckpt, shapes, tmp_path, capsys):
    out = tmp_path / "rec.jsonl"
    results = run_eval(ckpt, "--task", "rec", "--data", shapes, "--out", out, "--batch-size", 8)
    assert set(results) == {"val", "testA", "testB"}
    for r in results.values():
        assert r["n"] == 8 and 0.0 <= r["acc"] <= 1.0 and 0 <= r["no_box"] <= 8 and r["per_s"] > 0
    printed = capsys.readouterr().out
    assert "Acc@0.5" in printed and "testA" in printed and f"wrote 24 predictions to {out}" in printed
    rows = read_jsonl(out)
    assert len(rows) == 24 and all(set(row) == REC_FIELDS for row in rows)
    gt = {(r["expression"], tuple(r["bbox"])) for split in ("val", "testA", "testB")
          for r in read_jsonl(shapes / f"rec_{split}.jsonl")}
    for row in rows:
        assert (row["expression"], tuple(row["gt_box"])) in gt
        assert row["id"].startswith(str(shapes / f"rec_{row['split']}.jsonl"))  # file:line of the record
        pred, overlap = ev.score_rec_answer(row["answer"], row["gt_box"], 1000, 1000)  # parseable or not
        assert (row["pred_box"] is None) == (pred is None)
        assert row["correct"] == (row["iou"] >= 0.5)
        if row["pred_box"] is None:
            assert row["iou"] == 0.0 and not row["correct"]
    # the table's numbers are the rows' numbers
    for name, r in results.items():
        mine = [row for row in rows if row["split"] == name]
        assert r["acc"] == pytest.approx(sum(row["correct"] for row in mine) / 8)
        assert r["no_box"] == sum(row["pred_box"] is None for row in mine)


def test_pope_reports_metrics_per_setting_and_writes_rows(ckpt, shapes, tmp_path):
    out = tmp_path / "pope.jsonl"
    results = run_eval(ckpt, "--task", "pope", "--data", shapes, "--out", out, "--batch-size", 8)
    assert set(results) == {"random", "popular", "adversarial"}
    rows = read_jsonl(out)
    assert len(rows) == 24
    for name, r in results.items():
        mine = [row for row in rows if row["split"] == name]
        assert r["n"] == len(mine) == 8
        expected = ev.pope_metrics([row["prediction"] for row in mine], [row["label"] for row in mine])
        assert r["accuracy"] == pytest.approx(expected["accuracy"]) and r["f1"] == pytest.approx(expected["f1"])
        assert all(row["prediction"] == ev.pope_answer(row["answer"]) for row in mine)


def test_an_unreadable_image_costs_its_question_not_the_run(ckpt, shapes, tmp_path, capsys):
    shutil.copytree(shapes, tmp_path / "splits")
    rows = read_jsonl(tmp_path / "splits" / "rec_val.jsonl")
    (tmp_path / "splits" / rows[1]["img_path"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "rec.jsonl"
    results = run_eval(ckpt, "--task", "rec", "--data", tmp_path / "splits" / "rec_val.jsonl", "--out", out)
    predictions = read_jsonl(out)
    assert results["val"]["n"] == 8 and len(predictions) == 8  # before: the run died, nothing written
    assert "error" in predictions[1] and not predictions[1]["correct"] and predictions[1]["pred_box"] is None
    assert all("error" not in row and row["answer"] for k, row in enumerate(predictions) if k != 1)
    assert "1 questions had an unreadable image" in capsys.readouterr().out


def test_pope_folder_finds_the_benchmarks_own_file_names(ckpt, shapes, tmp_path):
    for setting in ("random", "popular", "adversarial"):  # POPE's repository: coco_pope_{setting}.json
        shutil.copy(shapes / f"pope_{setting}.jsonl", tmp_path / f"coco_pope_{setting}.json")
    results = run_eval(ckpt, "--task", "pope", "--data", tmp_path, "--image-dir", shapes, "--limit", 2)
    assert sorted(results) == ["adversarial", "popular", "random"]


def test_batched_answers_equal_one_at_a_time(ckpt, shapes, tmp_path):
    """The fast path (batches of 8, left-padded prompts of different lengths) against its slow twin."""
    for task in ("rec", "pope"):
        batched, single = tmp_path / f"{task}8.jsonl", tmp_path / f"{task}1.jsonl"
        run_eval(ckpt, "--task", task, "--data", shapes, "--out", batched, "--batch-size", 8)
        run_eval(ckpt, "--task", task, "--data", shapes, "--out", single, "--batch-size", 1)
        answers = [row["answer"] for row in read_jsonl(batched)]
        assert answers == [row["answer"] for row in read_jsonl(single)]
        if task == "rec":
            assert len(set(answers)) > 12  # the answers depend on the input: the comparison can fail


def test_questions_about_one_image_are_batched_with_it_and_answered_as_alone(ckpt, shapes, monkeypatch):
    """Several expressions per image, as in RefCOCO: a batch computes each image's tokens once (generate gets
    fewer images than questions) and answers as one question at a time does."""
    model, tok = load(ckpt)
    base = ev.splits_of(ev.argparse.Namespace(data=str(shapes), refs=None, split="", image_dir=None,
                                              task="rec"))["testA"]
    records = [{**base[i], "expression": base[(i + k) % len(base)]["expression"]} for k in range(3) for i in range(4)]
    calls, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda prompts, images, **kw: calls.append((len(prompts), len(images)))
                        or generate(prompts, images, **kw))
    together = ev.evaluate_rec(model, tok, records, batch_size=6, workers=0)
    assert sorted(calls) == [(6, 2), (6, 2)]  # two batches, each 3 questions about each of 2 images
    alone = ev.evaluate_rec(model, tok, records, batch_size=1, workers=0)
    assert [r["answer"] for r in together] == [r["answer"] for r in alone]
    assert len({r["answer"] for r in alone}) > 4  # the answers depend on the question: the check can fail


def test_compiled_decoding_compiles_once_and_answers_as_eager(ckpt, shapes, monkeypatch):
    """`eval.py --compile` (the default on a GPU) against its slow twin: the same answers, and one compilation
    of the one-token step for every batch of every prompt length, also for the short last batch (each new
    shape would cost a compilation and a CUDA graph: ~a minute at 3B). A counting backend stands in for
    inductor, which would take minutes to build on this CPU; the graph it gets is the one inductor compiles."""
    from torch._dynamo.testing import CompileCounter

    counter, compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile(fn, backend=counter, fullgraph=True,
                                                                        dynamic=options["dynamic"]))
    torch._dynamo.reset()
    model, tok = load(ckpt)
    splits = ev.splits_of(ev.argparse.Namespace(data=str(shapes), refs=None, split="", image_dir=None, task="rec"))
    records = [r for name in sorted(splits) for r in splits[name]][:16]
    assert len({len(r["expression"]) for r in records}) > 4 and len(records) % 6  # lengths vary; a short last batch
    compiled = ev.evaluate_rec(model, tok, records, batch_size=6, workers=0, compile=True)
    assert counter.frame_count == 1
    eager = ev.evaluate_rec(model, tok, records, batch_size=6, workers=0)
    assert [r["answer"] for r in compiled] == [r["answer"] for r in eager]
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_eval_records_cuda_graphs_and_answers_as_eager(ckpt, shapes):
    """`eval.py --compile` on a GPU, what the CPU test above cannot show: inductor and CUDA graphs (none
    skipped: the KV cache is written inside the graph), the shared image prefixes, the same answers as eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = ev.TinyGroundingGPT.from_pretrained(str(ckpt), dtype=torch.float32, device="cuda")
    tok = data.Tokenizer.from_file(os.path.join(str(ckpt), "tokenizer.json"))
    splits = ev.splits_of(ev.argparse.Namespace(data=str(shapes), refs=None, split="", image_dir=None, task="rec"))
    records = [r for name in sorted(splits) for r in splits[name]]
    records += [{**r, "expression": "the big one"} for r in records[:5]]  # a second question about 5 images
    compiled = ev.evaluate_rec(model, tok, records, batch_size=6, workers=0, compile=True)
    assert counters["inductor"]["cudagraph_skips"] == 0
    eager = ev.evaluate_rec(model, tok, records, batch_size=6, workers=0)
    assert [r["answer"] for r in compiled] == [r["answer"] for r in eager]
    torch._dynamo.reset()


def test_prompts_put_the_image_where_the_model_was_trained_to_see_it(ckpt, monkeypatch):
    model, tok = load(ckpt)
    photo = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "photos", "coffee.jpg")
    n_image, n_object = model.num_image_tokens, model.config.object_tokens
    asked = []
    monkeypatch.setattr(model, "generate", lambda prompts, **kw: asked.extend(prompts) or [[]] * len(prompts))
    ev.answer_all(model, tok, [{"image": photo}], ["Where is it?"], workers=0)
    assert asked == [data.encode_prompt(tok, "<image>\nWhere is it?", n_image, n_object)]


def test_torchrun_processes_get_whole_images():
    records = [{"image": f"{i % 5}.png"} for i in range(23)]  # 5 images, questions about each scattered
    parts = [ev.split_by_image(records, rank, 3) for rank in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(23))  # every question, once
    owners = {records[i]["image"]: {rank for rank, part in enumerate(parts) if i in part} for i in range(23)}
    assert all(len(ranks) == 1 for ranks in owners.values()) and all(parts)


def test_limit_and_a_single_jsonl_file_in_a_loader_worker(ckpt, shapes, tmp_path):
    out, alone = tmp_path / "val.jsonl", tmp_path / "alone.jsonl"
    args = ["--task", "rec", "--data", shapes / "rec_val.jsonl", "--limit", 3, "--batch-size", 2]
    results = run_eval(ckpt, *args, "--out", out, "--workers", 1)  # images read in a worker process
    assert list(results) == ["val"] and results["val"]["n"] == 3
    rows = read_jsonl(out)
    first = read_jsonl(shapes / "rec_val.jsonl")[:3]
    assert [r["expression"] for r in rows] == [r["expression"] for r in first]
    run_eval(ckpt, *args, "--out", alone)
    assert read_jsonl(alone) == rows


def test_bad_data_paths_exit_with_a_clear_message(ckpt, shapes, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --data .*nowhere does not exist"):
        run_eval(ckpt, "--task", "rec", "--data", tmp_path / "nowhere")
    only_pope = tmp_path / "only_pope"
    only_pope.mkdir()
    shutil.copy(shapes / "pope_random.jsonl", only_pope)
    with pytest.raises(SystemExit, match=r"^error: .*holds no rec_\*\.jsonl file .*shapes.py splits"):
        run_eval(ckpt, "--task", "rec", "--data", only_pope)
    # the pope file's images are not next to it: named before any model work
    with pytest.raises(SystemExit, match=r"^error: question 1: image .*pope_00000.png does not exist"):
        run_eval(ckpt, "--task", "pope", "--data", only_pope)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "rec_val.jsonl").write_text('{"img_path": "a.png", "expression": "x"}\n')
    with pytest.raises(SystemExit, match=r"^error: .*rec_val.jsonl:1: bad sample: missing keys"):
        run_eval(ckpt, "--task", "rec", "--data", bad)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(ckpt, name), no_weights)
    with pytest.raises(SystemExit, match=r"^error: .*no_weights has no model.safetensors: give a"):
        run_eval(no_weights, "--task", "rec", "--data", shapes)


def write_refcoco(root, shapes):
    """A tiny RefCOCO in its published format: COCO instances.json (xywh boxes) + a pickled refs list."""
    rec = read_jsonl(shapes / "rec_val.jsonl")[:3]
    images, annotations, refs = [], [], []
    for i, r in enumerate(rec):
        x1, y1, x2, y2 = r["bbox"]
        images.append({"id": 100 + i, "file_name": os.path.basename(r["img_path"]), "width": r["width"],
                       "height": r["height"]})
        annotations.append({"id": 200 + i, "image_id": 100 + i, "bbox": [x1, y1, x2 - x1, y2 - y1]})
        refs.append({"ref_id": i, "ann_id": 200 + i, "image_id": 100 + i, "split": "val" if i < 2 else "testA",
                     "sentences": [{"sent": r["expression"]}, {"sent": "the one " + r["expression"]}]})
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return rec


def test_refcoco_original_format(ckpt, shapes, tmp_path):
    rec = write_refcoco(tmp_path, shapes)
    args = ["--task", "rec", "--data", tmp_path / "instances.json", "--refs", tmp_path / "refs(unc).p",
            "--image-dir", shapes / "images"]
    out = tmp_path / "refcoco.jsonl"
    results = run_eval(ckpt, *args, "--split", "val", "--out", out, "--batch-size", 4)
    assert list(results) == ["val"] and results["val"]["n"] == 4  # 2 refs x 2 sentences, testA left out
    rows = read_jsonl(out)
    assert [r["gt_box"] for r in rows] == [rec[0]["bbox"]] * 2 + [rec[1]["bbox"]] * 2  # xywh -> xyxy
    assert rows[1]["expression"] == "the one " + rec[0]["expression"]
    assert all(set(r) == REC_FIELDS for r in rows) and "ref 0 sentence" in rows[0]["id"]
    assert len({r["id"] for r in rows}) == 4 and [r["index"] for r in rows] == [0, 1, 2, 3]  # one per expression
    with pytest.raises(SystemExit, match=r"^error: cannot read RefCOCO .*no refs in split 'testB'"):
        run_eval(ckpt, *args, "--split", "testB")
    with pytest.raises(SystemExit, match=r"^error: .*image .*val_00000.png does not exist; check --image-dir"):
        run_eval(ckpt, *args[:-2], "--split", "val")
