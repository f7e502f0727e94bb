"""The mutation check's own choice of lines (``Testing/mutation_check.py``): the README's example names a function,
so that it does not go stale when the file above it changes."""
import pytest

from mutation_check import function_lines, parse_lines

SOURCE = '''import os


def first():
    return 1


class Box:
    def first(self):
        x = 2
        return x


def second():
    return 3
'''


def test_a_function_name_selects_every_function_of_that_name_from_def_to_last_line():
    assert function_lines(SOURCE, "first") == {4, 5, 9, 10, 11}
    assert function_lines(SOURCE, "second") == {14, 15}
    with pytest.raises(ValueError, match="no function named"):
        function_lines(SOURCE, "third")


def test_line_ranges_are_inclusive():
    assert parse_lines("3-5,9") == {3, 4, 5, 9}
