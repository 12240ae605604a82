"""Scorers of eval.py on hand-computed cases: coordinate frames, clipping, degenerate and missing boxes, POPE."""

import pytest

import eval as ev


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
