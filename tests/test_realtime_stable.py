"""Local agreement, on its own: only words two passes agree on go out, and none is ever taken back."""

from __future__ import annotations

from appliance.realtime.stable import StablePrefix


def test_words_go_out_once_two_passes_agree_and_the_last_word_waits():
    stable = StablePrefix()
    assert stable.update("Plants ne") == ""  # one pass proves nothing
    assert stable.update("Plants need sun") == "Plants"  # "ne" / "sun": each pass's last word waits
    assert stable.update("Plants need sunlight and") == " need"
    assert stable.update("Plants need sunlight and water") == " sunlight"
    assert stable.text == "Plants need sunlight"
    assert stable.finish("Plants need sunlight and water to grow.") == " and water to grow."


def test_punctuation_that_changes_holds_a_word_back():
    stable = StablePrefix()
    stable.update("I like cats dogs")
    assert stable.update("I like cats, dogs and") == "I like"  # "cats" vs "cats,": not yet
    assert stable.update("I like cats, dogs and birds") == " cats, dogs"


def test_a_pass_that_leaves_the_sent_text_sends_nothing_and_nothing_is_taken_back():
    stable = StablePrefix()
    stable.update("The cat sat on")
    assert stable.update("The cat sat on the") == "The cat sat"
    assert stable.update("The hat sat on the mat") == ""
    assert stable.update("The hat sat on the mat.") == ""
    assert stable.text == "The cat sat"
    assert stable.finish("The hat sat on the mat.") is None  # the completed text is the one to show
    assert stable.finish("The cat sat on the mat.") == " on the mat."
