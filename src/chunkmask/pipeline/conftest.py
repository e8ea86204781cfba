"""Pytest: collect the pipeline's doctests only where Ray is installed.

`pytest` collects `src/` with `--doctest-modules`, which imports every module here. Without the
`ray` extra nothing here is collected; `tests/test_pipeline.py` skips itself with
`pytest.importorskip`.
"""

from importlib.util import find_spec

collect_ignore_glob = [] if find_spec("ray") is not None else ["*.py"]
