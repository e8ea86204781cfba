"""Self behaviour cloning: the buffer of the policy's own successes and the rules for the BC weight."""

from chunkmask.selfbc._bc_weights import (
    BCWeight,
    ConstantBCWeight,
    LossBalanceBCWeight,
    ProductBCWeight,
    SuccessRateBCWeight,
)
from chunkmask.selfbc._success_buffer import (
    AdmitSuccessful,
    EntryInfo,
    EvictOldest,
    EvictSlowest,
    SuccessBuffer,
)

__all__ = [
    "AdmitSuccessful",
    "BCWeight",
    "ConstantBCWeight",
    "EntryInfo",
    "EvictOldest",
    "EvictSlowest",
    "LossBalanceBCWeight",
    "ProductBCWeight",
    "SuccessBuffer",
    "SuccessRateBCWeight",
]
