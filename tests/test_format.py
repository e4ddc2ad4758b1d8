"""The formatter: parse(format(ast)) == ast for generated programs; comments are kept."""

from __future__ import annotations

from hypothesis import given, settings
from strategies import programs

from rnnc.format import format_program
from rnnc.parse import parse


@settings(max_examples=200)
@given(programs())
def test_format_round_trip(program):
    text = format_program(program)
    again = parse(text)
    assert again == program
    assert format_program(again) == text


def test_comments_survive_formatting():
    text = "# head\nmodel m {   # after header\n  dim H=4   # dims\n\n  # alone\n  input x[H]:sequence\n}\n# tail\n"
    out = format_program(parse(text))
    for c in ("# head", "# after header", "# dims", "# alone", "# tail"):
        assert c in out
    assert format_program(parse(out)) == out
    assert "dim H = 4" in out and "input x[H] : sequence" in out


def test_comment_paragraphs_before_an_item_stay_apart():
    from rnnc.format import format_program
    from rnnc.parse import parse

    text = "# a file's header\n# in two lines\n\n# the cell's own comment\ncell C(x[I]) -> h[I] {\n" \
           "  h = tanh(x + h[t-1])\n}\n"  # fmt: skip
    assert format_program(parse(text)) == text
