"""optax.contrib for craftfn: the research optimizers under optax's contrib names.

``from craftfn.optim import contrib`` then ``contrib.prodigy()``, ``contrib.sam(...)``,
``contrib.muon(...)`` ..., with optax's arguments and defaults.

Example:
    >>> import torch
    >>> from craftfn.optim import contrib
    >>> tx = contrib.schedule_free_adamw(1e-3, warmup_steps=100)
    >>> state = tx.init({"w": torch.zeros(3)})
"""

from craftfn.optim.contrib._adaptive import (
    MadgradState,
    ScaleByAdemamixState,
    ScaleBySimplifiedAdEMAMixState,
    acprop,
    ademamix,
    adopt,
    madgrad,
    scale_by_acprop,
    scale_by_ademamix,
    scale_by_adopt,
    scale_by_madgrad,
    scale_by_simplified_ademamix,
    simplified_ademamix,
)
from craftfn.optim.contrib._parameter_free import (
    COCOBState,
    DAdaptAdamWState,
    DoGState,
    DoWGState,
    MechanicState,
    MomoAdamState,
    MomoState,
    ProdigyState,
    cocob,
    dadapt_adamw,
    dog,
    dowg,
    mechanize,
    momo,
    momo_adam,
    prodigy,
    scale_by_cocob,
    scale_by_dog,
    scale_by_dowg,
)
from craftfn.optim.contrib._plateau import ReduceLROnPlateauState, reduce_on_plateau
from craftfn.optim.contrib._privacy import DifferentiallyPrivateAggregateState, differentially_private_aggregate, dpsgd
from craftfn.optim.contrib._sam import NormalizeState, SAMState, normalize, sam
from craftfn.optim.orthogonal import MuonDimensionNumbers, MuonState, muon, scale_by_muon, scale_by_shape
from craftfn.optim.schedulefree import (
    ScheduleFreeState,
    schedule_free,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
)

__all__ = [
    "MadgradState",
    "ScaleByAdemamixState",
    "ScaleBySimplifiedAdEMAMixState",
    "acprop",
    "ademamix",
    "adopt",
    "madgrad",
    "scale_by_acprop",
    "scale_by_ademamix",
    "scale_by_adopt",
    "scale_by_madgrad",
    "scale_by_simplified_ademamix",
    "simplified_ademamix",
    "COCOBState",
    "DAdaptAdamWState",
    "DoGState",
    "DoWGState",
    "MechanicState",
    "MomoAdamState",
    "MomoState",
    "ProdigyState",
    "cocob",
    "dadapt_adamw",
    "dog",
    "dowg",
    "mechanize",
    "momo",
    "momo_adam",
    "prodigy",
    "scale_by_cocob",
    "scale_by_dog",
    "scale_by_dowg",
    "ReduceLROnPlateauState",
    "reduce_on_plateau",
    "DifferentiallyPrivateAggregateState",
    "differentially_private_aggregate",
    "dpsgd",
    "NormalizeState",
    "SAMState",
    "normalize",
    "sam",
    "MuonDimensionNumbers",
    "MuonState",
    "muon",
    "scale_by_muon",
    "scale_by_shape",
    "ScheduleFreeState",
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
]
