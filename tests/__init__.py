"""The test suite. A package, so that `tests.support` imports the same way however pytest is started
(`python -m pytest` from the repository root, or `pytest`): pytest puts the repository root on sys.path."""
