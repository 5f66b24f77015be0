# A package, so that tests/e2e/conftest.py is imported as "e2e.conftest" and never shadows
# tests/conftest.py (which other test modules import as "conftest").
