"""The fast tier's list of slow tests (tests/conftest.py SLOW) names only tests that exist: a renamed test would
otherwise drop out of the list silently and slow `make test-fast` down."""

from pathlib import Path

from conftest import SLOW

REPO = Path(__file__).resolve().parent.parent


def test_every_slow_entry_names_an_existing_file_or_test():
    for entry in SLOW:
        file, _, test = entry.partition("::")
        assert (REPO / file).is_file(), entry
        assert not test or f"def {test}(" in (REPO / file).read_text(), entry
