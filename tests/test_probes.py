"""experiments/probes.py: the colour-and-shape probe's questions and score, and the attention shift."""

import json
import os
import random
import sys

import pytest

import shapes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import probes  # noqa: E402


def test_colour_and_shape_pairs_and_their_score(tmp_path):
    red_circle = {"shape": "circle", "color": "red", "size": "big", "bbox": [10, 10, 50, 50]}
    red_square = {"shape": "square", "color": "red", "size": "small", "bbox": [60, 10, 90, 40]}
    row = {"img_path": "images/a.png", "expression": "the circle", "bbox": red_circle["bbox"], "width": 100,
           "height": 60, "scene_objects": [red_circle, red_square]}
    twins = {**row, "scene_objects": [red_circle, {**red_circle, "bbox": [60, 10, 100, 50]}]}  # no pair
    lone = {**row, "scene_objects": [red_circle]}
    (tmp_path / "rec_testA.jsonl").write_text("\n".join(json.dumps(r) for r in (row, twins, lone, row)) + "\n")
    out = probes.write_pairs(str(tmp_path / "rec_testA.jsonl"))
    assert out == str(tmp_path / "pairs_testA.jsonl")
    pairs = [json.loads(line) for line in open(out)]
    assert [(p["expression"], p["bbox"]) for p in pairs] == 2 * [("the red circle", [10, 10, 50, 50]),
                                                                   ("the red square", [60, 10, 90, 40])]
    assert pairs[0]["img_path"] == "images/a.png" and pairs[0]["scene_objects"] == row["scene_objects"]
    box = [10, 10, 50, 50]  # scene 1: the same box for both (one right); scene 2: both right
    predictions = [{"pred_box": box, "correct": True}, {"pred_box": box, "correct": False},
                   {"pred_box": box, "correct": True}, {"pred_box": [60, 10, 90, 40], "correct": True}]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, predictions)) + "\n")
    assert probes.score_pairs(str(tmp_path / "p.jsonl")) == {"questions": 4, "right": 3, "scenes": 2,
                                                             "both right": 1, "same box": 1}


def test_attention_shift_pairs_the_questions_and_is_zero_for_the_same_question(ckpt, tmp_path):
    shapes.make_scene(random.Random(0)).draw().save(tmp_path / "a.png")
    row = lambda e: {"img_path": "a.png", "expression": e, "bbox": [0, 0, 9, 9], "width": 9, "height": 9}
    questions = ["the red circle", "the blue square", "the red circle", "the red circle"]  # scene 2: no change
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row(e)) + "\n" for e in questions))
    first = probes.attention_shift(ckpt, str(tmp_path / "pairs.jsonl"), limit=2)
    assert 0 < first <= 1  # a random model's look depends on its input
    assert probes.attention_shift(ckpt, str(tmp_path / "pairs.jsonl")) == pytest.approx(first / 2)
