import pytest

# tests/helpers/ is imported by test modules and conftest.py, not collected: let pytest rewrite its asserts too.
pytest.register_assert_rewrite("tests.helpers")
