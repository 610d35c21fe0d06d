from persviz.shapesworld import Obj, Scene
from persviz.shapesworld.oracle import check_attributes, scene_reading

SCENE = Scene(Obj("circle", "red", "striped", "large"), "navy", "left", Obj("square", "blue"))


def test_a_perfect_reading_confirms_every_named_attribute():
    named = {"shape": "circle", "color": "red", "texture": "striped", "size": "large", "position": "left",
             "second": ("blue", "square"), "background": "navy"}
    assert check_attributes(named, scene_reading(SCENE)) == {k: True for k in named}


def test_wrong_attributes_are_caught_one_by_one():
    reading = scene_reading(SCENE)
    assert check_attributes({"shape": "circle", "color": "green", "background": "gray"}, reading) == {
        "shape": True, "color": False, "background": False}
    assert check_attributes({"shape": "circle", "second": ("red", "square")}, reading)["second"] is False
    # the second object must stand in another slot than the main object
    assert check_attributes({"shape": "square", "color": "blue", "second": ("blue", "square")}, reading)["second"] is False


def test_main_object_is_the_best_match_and_empty_images_fail():
    reading = scene_reading(SCENE)
    assert check_attributes({"shape": "square", "color": "blue"}, reading) == {"shape": True, "color": True}
    assert check_attributes({"shape": "square", "position": "left"}, reading) == {"shape": False, "position": True}
    empty = {"background": "gray", "left": None, "center": None, "right": None}
    assert check_attributes({"shape": "circle", "second": ("blue", "square"), "background": "gray"}, empty) == {
        "background": True, "shape": False, "second": False}
