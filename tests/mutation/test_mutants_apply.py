"""The mutation check (tests/mutation/mutate.py) stays runnable: every planted bug still finds its line."""

import mutate
import pytest


def test_every_mutant_applies_to_the_current_code():
    assert mutate.check(mutate.MUTANTS) == []
    assert len({m.name for m in mutate.MUTANTS}) == len(mutate.MUTANTS) >= 15


def test_a_mutant_whose_line_is_gone_fails_loudly():
    stale = mutate.MUTANTS[0]._replace(old="no such line in the code\n")
    assert "occurs 0 times" in mutate.check([stale])[0]
    with pytest.raises(ValueError, match="occurs 2 times"):
        mutate.apply(stale, "no such line in the code\n" * 2)
