"""Import a trainer package or fail with an `ImportError` that says how to install it."""

import importlib
from types import ModuleType


def require(module: str, package: str) -> ModuleType:
    """Import `module`; on failure raise an `ImportError` naming the pip package to install.

    Raises:
        ImportError: if the module cannot be imported (the original error is chained).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"chunkmask.integrations needs `{module}` from the `{package}` package, which could "
            f"not be imported ({exc}). Install it (see docs/integrations.md for tested versions)."
        ) from exc
