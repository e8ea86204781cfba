"""A dispatch-mode recorder of the aten ops that read tensor contents on the host."""

import torch

_SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "is_nonzero", "equal")


class SyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op that reads tensor contents on the host.

    `.item()`, `int(t)`, `bool(t)` all dispatch `_local_scalar_dense`; `torch.unique`, `nonzero`
    and boolean-mask indexing have data-dependent output shapes (they sync on an accelerator).
    """

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(op in name for op in _SYNC_OPS):
            self.ops.append(name)
        if func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.ops.append("boolean-mask index")
        return func(*args, **(kwargs or {}))
