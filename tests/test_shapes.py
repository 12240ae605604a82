"""shapes.py: deterministic scenes and stage data, the expression resolver, unambiguous eval splits in the real
formats, the baselines, and the committed shapes tokenizer."""

import json
import re

import pytest
from PIL import Image

import data
import shapes
from data import Tokenizer


def test_shapes_data_deterministic_per_seed_and_valid():
    for stage in ("stage1", "stage2", "stage3"):
        a, b, c = (shapes.ShapesStageData(stage, 50, seed=s) for s in (3, 3, 4))
        for i in range(0, 50, 7):
            sa, sb = a[i], b[i]
            assert sa["conversations"] == sb["conversations"] == a.conversations(i)
            assert sa["image"].tobytes() == sb["image"].tobytes()
            data.validate_sample(sa, f"{stage} {i}", check_file=False)
        assert [a.conversations(i) for i in range(10)] != [c.conversations(i) for i in range(10)]



def test_kind_mix_and_scene_settings_make_curricula():
    default = shapes.ShapesStageData("stage3", 30, seed=2)
    spelled_out = shapes.ShapesStageData("stage3", 30, seed=2, kinds=dict(shapes.STAGE3_KINDS))
    assert [default.conversations(i) for i in range(30)] == [spelled_out.conversations(i) for i in range(30)]
    pope = shapes.ShapesStageData("stage3", 30, seed=2, kinds={"pope": 1.0, "rec": 0})
    assert {pope.conversations(i)[1]["value"] for i in range(30)} == {"Yes.", "No."}
    two = shapes.SceneConfig(min_objects=2, max_objects=2, duplicate_prob=0)
    rec = shapes.ShapesStageData("stage2", 30, seed=2, scene=two, kinds={"rec": 1})
    made = [rec._make(i) for i in range(30)]
    assert sum(len(scene.objects) == 2 for scene, _ in made) >= 28  # placement may give up on one (20 tries)
    prompt = "<image>\n" + data.REC_PROMPT.format("the ")
    assert all(sample["conversations"][0]["value"].startswith(prompt) for _, sample in made)
    with pytest.raises(ValueError, match="stage2 samples are of the kinds rec, reg, object_to_box"):
        shapes.ShapesStageData("stage2", 4, kinds={"pope": 1})
    with pytest.raises(ValueError, match="positive sum"):
        shapes.ShapesStageData("stage3", 4, kinds={"pope": 0})
    with pytest.raises(ValueError, match="caption, and no other"):
        shapes.ShapesStageData("stage1", 4, kinds={"rec": 1})
    with pytest.raises(ValueError, match="1 <= min_objects <= max_objects"):
        shapes.SceneConfig(min_objects=3, max_objects=2)


def test_rec_relation_asks_by_relation_or_order_alone():
    asked = shapes.ShapesStageData("stage3", 40, seed=5, kinds={"rec_relation": 1})
    prompt = "<image>\n" + data.REC_PROMPT.format("")
    forms = set()
    for i in range(40):
        scene, sample = asked._make(i)
        question, answer = (turn["value"] for turn in sample["conversations"])
        expression = question.removeprefix(prompt)
        forms.add(next(form for form, regex in shapes.EXPRESSION_RES if regex.fullmatch(expression)))
        (target,) = shapes.resolve(expression, scene)  # unambiguous, and the answer is its box
        assert answer == data.format_box(scene.box(scene.objects[target]))
    assert forms == {"relation", "superlative", "ordinal"}  # never attributes alone ("np")
    with pytest.raises(ValueError, match="repeated shapes"):  # no scene could ever be asked: refused, not a hang
        shapes.ShapesStageData("stage3", 4, scene=shapes.SceneConfig(duplicate_prob=0), kinds={"rec_relation": 1})


def test_resolver_on_a_hand_made_scene():
    obj = lambda shape, color, size, x, y: shapes.ShapeObject(shape, color, size, (x, y, x + 40, y + 40), ())
    objects = [obj("circle", "red", "big", 10, 10), obj("circle", "blue", "small", 120, 10),
               obj("square", "blue", "big", 230, 130), obj("circle", "red", "small", 240, 20)]
    scene = shapes.Scene(300, 200, "grey", objects, (0, 0))
    assert shapes.resolve("the circle", scene) == [0, 1, 3]
    assert shapes.resolve("the square", scene) == [2]
    assert shapes.resolve("the big red circle", scene) == [0]
    assert shapes.resolve("the leftmost circle", scene) == [0]
    assert shapes.resolve("the second circle from the right", scene) == [1]
    assert shapes.resolve("the circle above the square", scene) == [0, 1, 3]
    assert shapes.resolve("the circle left of the blue circle", scene) == [0]
    assert shapes.resolve("the topmost circle", scene) == []  # all at the same height: no clear answer
    assert shapes.resolve("the topmost circle", scene, loose=True) == [0, 1, 3]
    assert shapes.unambiguous("the red circle left of the blue circle", scene, 0)
    with pytest.raises(ValueError, match="not an expression"):
        shapes.resolve("the red thing", scene)
    # far to the left and a little lower is "left of", not "below"
    pair = [obj("circle", "red", "big", 10, 60), obj("square", "red", "big", 240, 20)]
    far = shapes.Scene(300, 200, "grey", pair, ())
    assert shapes.resolve("the circle below the square", far, loose=True) == []
    assert shapes.resolve("the circle left of the square", far) == [0]


def test_patch_targets_by_hand():
    # 200 x 100 pads to a 200-px square with 50 px on top; the square's box on it is [0, 0.25, 0.5, 0.5]
    square = shapes.ShapeObject("square", "red", "big", (0, 0, 100, 50), ())
    circle = shapes.ShapeObject("circle", "blue", "small", (150, 50, 200, 100), ())  # [0.75, 0.5, 1, 0.75]
    scene = shapes.Scene(200, 100, "grey", [square, circle], (0, 0))
    classes, boxes = shapes.patch_targets(scene, grid=4)  # patch centres at 0.125, 0.375, 0.625, 0.875
    expected = [0] * 16
    expected[4] = expected[5] = 1 + shapes.CATEGORIES.index("red square")  # row 1, columns 0-1
    expected[11] = 1 + shapes.CATEGORIES.index("blue circle")  # row 2, column 3
    assert classes.tolist() == expected
    assert boxes[4].tolist() == boxes[5].tolist() == [0.0, 0.25, 0.5, 0.5]
    assert boxes[11].tolist() == [0.75, 0.5, 1.0, 0.75]
    assert boxes[classes == 0].abs().sum() == 0
    pixels, c, b = shapes.TowerData(3, lambda img: img.size, grid=4, seed=5)[2]  # deterministic per (seed, i)
    again = shapes.TowerData(3, lambda img: img.size, grid=4, seed=5)[2]
    assert pixels == again[0] and c.equal(again[1]) and b.equal(again[2])


def test_eval_splits_are_unambiguous_and_in_the_real_layouts(tmp_path):
    shapes.write_shapes_splits(str(tmp_path), n=24, seed=5)
    for split in ("val", "testA", "testB"):
        rows = [json.loads(line) for line in open(tmp_path / f"rec_{split}.jsonl")]
        assert len(rows) == 24
        for row in rows:
            with Image.open(tmp_path / row["img_path"]) as img:
                assert img.size == (row["width"], row["height"])
            objects = [shapes.ShapeObject(o["shape"], o["color"], o["size"], tuple(o["bbox"]), (0, 0, 0))
                       for o in row["scene_objects"]]
            scene = shapes.Scene(row["width"], row["height"], "grey", objects, (0, 0))
            target = [o["bbox"] for o in row["scene_objects"]].index(row["bbox"])
            assert shapes.unambiguous(row["expression"], scene, target), row
        relational = (" of ", "above", "below", "most ", " from the ")
        kinds = {any(w in r["expression"] for w in relational) for r in rows}
        assert kinds == ({False} if split == "testA" else {True} if split == "testB" else {False, True})
    pope = {s: [json.loads(line) for line in open(tmp_path / f"pope_{s}.jsonl")]
            for s in ("random", "popular", "adversarial")}
    for rows in pope.values():
        assert len(rows) == 24 and sum(r["label"] == "yes" for r in rows) == 12
        assert set(rows[0]) == {"question_id", "image", "text", "label"}
        question = rf"Is there an? ({'|'.join(shapes.COLORS)}) ({'|'.join(shapes.SHAPES)}) in the image\?"
        assert all(re.fullmatch(question, r["text"]) for r in rows)
    assert [r["text"] for r in pope["random"]] != [r["text"] for r in pope["popular"]]


def test_baselines(tmp_path):
    one = {"shape": "circle", "color": "red", "size": "big", "bbox": [10, 10, 50, 50]}
    other = {"shape": "square", "color": "red", "size": "big", "bbox": [60, 10, 90, 40]}
    rows = [{"img_path": "a.png", "expression": "the red circle", "bbox": one["bbox"], "width": 100,
             "height": 60, "scene_objects": [one, other]}] * 10
    (tmp_path / "split.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    scores = shapes.baselines(str(tmp_path / "split.jsonl"))
    assert scores["right shape"] == 1.0 and 0.0 < scores["random object"] < 1.0
    assert scores["random box"] < 0.5 and scores["centre box"] == 0.0  # centre box [30,10,70,50]: IoU 0.33



def test_commands_print_help_and_refuse_unknown_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, shown in ((["-h"], "python shapes.py splits"), (["splits", "-h"], "questions per split")):
        with pytest.raises(SystemExit) as stop:
            shapes.main(argv)
        assert stop.value.code == 0 and shown in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # help writes nothing
    for argv, message in ((["splits", "--nn", "5"], "unrecognized arguments: --nn"),
                          (["splits", "--n"], "expected one argument"), (["split"], "invalid choice: 'split'"),
                          ([], "required: command")):
        with pytest.raises(SystemExit) as stop:
            shapes.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err

def test_shapes_tokenizer_committed_and_deterministic():
    tok = Tokenizer.from_file(shapes.SHAPES_TOKENIZER)
    assert tok.encode("[0.125,1.000]") == [tok.tok.token_to_id(c) for c in "[0.125,1.000]"]  # digit by digit
    assert tok.decode(tok.encode(data.DEFAULT_SYSTEM)) == data.DEFAULT_SYSTEM
    assert tok.sampleable_size == tok.tok.get_vocab_size() and tok.pad_id == tok.sampleable_size - 22
    small = [shapes.train_shapes_tokenizer(300, samples_per_stage=30).to_str() for _ in range(2)]
    assert small[0] == small[1]


# ----------------------------------------------------------------------------- batching
