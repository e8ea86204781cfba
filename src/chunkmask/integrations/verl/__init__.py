"""chunkmask for verl 0.9: the `chunkmask_pcm` policy loss and the driver-side selection.

Installing chunkmask registers a `verl.plugins` entry point (`chunkmask.integrations.verl._plugin`),
so `import verl` registers the loss in the driver and in every Ray worker; select it with
`actor_rollout_ref.actor.policy_loss.loss_mode=chunkmask_pcm`. Call `apply_selection` on the
driver between the advantage computation and `_update_actor`. Importing this module does not
import verl; `register` and `check_registered` do, and raise an `ImportError` naming it when it is
missing.
"""

from chunkmask.integrations.verl._loss import (
    LOSS_NAME,
    check_registered,
    pcm_policy_loss,
    register,
)
from chunkmask.integrations.verl._selection import apply_selection

__all__ = ["LOSS_NAME", "apply_selection", "check_registered", "pcm_policy_loss", "register"]
