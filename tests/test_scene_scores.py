"""The scene scorer reads hand-written captions back into scenes and scores them."""

import pytest

from lensjax.data.synthetic import Scene, Shape, describe
from lensjax.scene_scores import read_caption, score_scenes, triple_f1

BOX = (0, 0, 10, 10)


def scene(name: str, background: str, *shapes: tuple[str, str, str]) -> Scene:
    return Scene(name, background, tuple(Shape(k, c, s, BOX) for s, c, k in shapes))


TWO = scene("two.png", "white", ("large", "red", "circle"), ("small", "blue", "square"))
THREE = scene("three.png", "black", ("small", "green", "star"), ("small", "green", "star"),
              ("large", "yellow", "triangle"))


@pytest.mark.parametrize("caption", describe(TWO))
def test_every_template_of_a_scene_reads_back_to_it(caption):
    said = read_caption(caption)
    assert sorted(said.triples) == [("large", "red", "circle"), ("small", "blue", "square")]
    assert said.count == 2
    assert said.background in ("white", None)  # the mirrored template names no background


def test_plural_with_a_number_counts_that_many_shapes():
    said = read_caption("two small green stars and a large yellow triangle on a black "
                        "background .")
    assert sorted(said.triples) == [("large", "yellow", "triangle"),
                                    ("small", "green", "star"), ("small", "green", "star")]
    assert said.count == 3 and said.background == "black"
    assert score_scenes({"three.png": "two small green stars and a large yellow triangle ."},
                        {"three.png": THREE}).exact_sets == 1.0


def test_grey_is_gray_and_attribute_order_does_not_matter():
    said = read_caption("a red large circle on a grey background")
    assert said.triples == (("large", "red", "circle"),) and said.background == "gray"


def test_a_shape_without_its_size_counts_but_matches_no_triple():
    said = read_caption("a red circle to the left of a small blue square .")
    assert said.count == 2
    assert triple_f1(said.triples, {("large", "red", "circle"): 1,
                                    ("small", "blue", "square"): 1}) == pytest.approx(0.5)


def test_stated_number_gives_the_count_when_no_shape_is_named():
    assert read_caption("three shapes on a white background .").count == 3
    assert read_caption("a white background .").count == 0


def test_scores_of_hand_written_captions():
    scenes = {"two.png": TWO, "three.png": THREE}
    predictions = {
        # right shapes, no background named
        "two.png": "a small blue square to the right of a large red circle .",
        # one extra shape, one wrong colour, wrong background
        "three.png": "a small green star , a small red star , a large yellow triangle and a "
                     "large yellow triangle on a white background .",
    }
    scores = score_scenes(predictions, scenes)
    # three.png: named {green star, red star, 2 yellow triangles} vs {2 green stars, triangle}:
    # 2 hits, precision 2/4, recall 2/3 -> F1 4/7.
    assert scores.triple_f1 == pytest.approx((1.0 + 4 / 7) / 2)
    assert scores.exact_sets == 0.5
    assert scores.count == 0.5  # 2 right, 4 named for 3
    assert scores.background == 0.0 and scores.background_named == 0.5
    assert score_scenes({"two.png": "nothing at all"}, scenes).triple_f1 == 0.0


def test_captions_of_images_without_a_scene_are_refused():
    with pytest.raises(ValueError, match="no scene"):
        score_scenes({"other.png": "a red circle"}, {"two.png": TWO})
