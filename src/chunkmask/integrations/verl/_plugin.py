"""The `verl.plugins` entry point: registers `chunkmask_pcm` when verl is imported.

verl 0.9 loads every `verl.plugins` entry point inside `import verl` and logs a failure at DEBUG
only, so a broken install would surface much later as "Unsupported loss mode". This module logs
the failure at ERROR (printed to stderr even without logging configured), warns, and re-raises.
"""

import importlib.util
import logging
import warnings


def _load() -> None:
    """Register the loss; on failure log at ERROR, warn and re-raise."""
    try:
        from chunkmask.integrations.verl._loss import register

        register()
    except Exception as exc:
        message = (
            f"chunkmask could not register its verl policy loss `chunkmask_pcm`: "
            f"{type(exc).__name__}: {exc}"
        )
        logging.getLogger("chunkmask.integrations.verl").error(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        raise


# Only verl loads this module; without verl (e.g. a doctest collection) there is nothing to do.
if importlib.util.find_spec("verl") is not None:
    _load()
