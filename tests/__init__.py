import pytest

# tests/helpers/ holds assertions too (the rollout flow two test files share): pytest rewrites
# them as in a test file, so a failure there shows the same values
pytest.register_assert_rewrite("tests.helpers")
