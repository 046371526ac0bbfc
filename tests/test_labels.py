import pytest

from runner.labels import LabelSet, readable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("card_arrival", "card arrival"),
        ("Refund_not_showing_up", "refund not showing up"),
        ("GET_EVENT", "get event"),
        ("academia.stackexchange.com", "academia"),
        ("askubuntu.com", "askubuntu"),
        ("alarm", "alarm"),
    ],
)
def test_readable_labels(raw, shown):
    assert readable(raw) == shown


def test_descriptions_replace_the_shown_text():
    labels = LabelSet.build(["iot", "qa"], {"qa": "question answering"})
    assert labels.shown == ("iot", "question answering")
    assert labels.parse("question answering") == "qa"


def test_labels_that_read_alike_keep_their_raw_names():
    labels = LabelSet.build(["card_arrival", "card-arrival"])
    assert labels.shown == ("card_arrival", "card-arrival")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("card arrival", "card_arrival"),
        ("card_arrival", "card_arrival"),
        ("  Card Arrival. ", "card_arrival"),
        ('"card arrival"', "card_arrival"),
        ("The answer is: card arrival", "card_arrival"),
        ("lost or stolen card", "lost_or_stolen_card"),
        ("card", None),  # a prefix of two labels is ambiguous
        ("lost or", "lost_or_stolen_card"),
        ("pizza", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_maps_answers_back_to_labels(answer, expected):
    labels = LabelSet.build(["card_arrival", "card_linking", "lost_or_stolen_card"])
    assert labels.parse(answer) == expected


def test_parse_respects_the_allowed_subset():
    labels = LabelSet.build(["card_arrival", "card_linking", "lost_or_stolen_card"])
    assert labels.parse("card arrival", allowed=["card_linking"]) is None
    assert labels.parse("card", allowed=["card_linking", "lost_or_stolen_card"]) == "card_linking"


def test_parse_prefers_the_longest_contained_label():
    labels = LabelSet.build(["card", "card_arrival"])
    assert labels.parse("I think card arrival") == "card_arrival"


def test_an_exact_answer_means_the_first_label_shown_or_named_so_among_all_or_some():
    # label "a" is shown as "b", the raw name of the next label: the first rule takes labels in order
    labels = LabelSet.build(["a", "b"], {"a": "b", "b": "c"})
    assert labels.parse("b") == "a"
    assert labels.parse("b", labels.labels) == "a"
    assert labels.parse("b", ["b"]) == "b"  # among "b" alone, its raw name
    assert labels.parse("c", ["a", "b"]) == "b"
