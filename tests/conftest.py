"""Test configuration.

The suite runs twice in CI:

- plainly (`pytest`), exercising the library's own argument checks exactly as users meet them;
- under jaxtyping's runtime shape and dtype checking
  (`pytest --jaxtyping-packages=chunkmask,beartype.beartype`), which verifies every tensor
  annotation in `src/chunkmask` on every call. In that run a wrongly typed argument is stopped by
  the annotation checker before the library's own check can word its error, so tests that assert
  error messages (their source contains `pytest.raises(`, or calls the bad-input drivers
  `check_rejects(` / `run_bad(`) are skipped there, and so are tests of
  `torch.compile` (jaxtyping's wrappers are not traceable by dynamo, pytorch#122093); both run in
  the plain pass.
"""

import inspect

import pytest
from hypothesis import settings

# Hypothesis draws the same examples on every run and machine: a property test can never be flaky,
# and a failure seen once is seen again.
settings.register_profile("chunkmask", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("chunkmask")


def _typed_run(config: pytest.Config) -> bool:
    try:
        return bool(config.getoption("jaxtyping_packages"))
    except ValueError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _typed_run(config):
        return
    skip = pytest.mark.skip(reason="asserts an error message; runs in the plain (unchecked) pass")
    skip_compile = pytest.mark.skip(
        reason="torch.compile cannot trace jaxtyping wrappers; runs in the plain pass"
    )
    for item in items:
        function = getattr(item, "function", None)
        if function is None:
            continue
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            continue
        if any(marker in source for marker in ("pytest.raises(", "check_rejects(", "run_bad(")):
            item.add_marker(skip)
        elif "torch.compile(" in source:
            item.add_marker(skip_compile)
