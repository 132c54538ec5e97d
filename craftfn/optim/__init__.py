"""Gradient transformations: optax's model on PyTorch.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.chain(optim.trace(decay=0.9), optim.scale_by_learning_rate(1e-2))
    >>> state = tx.init({"w": torch.zeros(2)})
"""

from craftfn.optim.adaptive import (
    FactoredState,
    ScaleByAdaDeltaState,
    ScaleByAdamState,
    ScaleByAmsgradState,
    ScaleByLionState,
    ScaleByNadamState,
    ScaleByRmsState,
    ScaleByRmsWithCountState,
    ScaleByRssState,
    ScaleByRStdDevState,
    ScaleByRStdDevWithCountState,
    scale_by_adadelta,
    scale_by_adam,
    scale_by_adamax,
    scale_by_amsgrad,
    scale_by_factored_rms,
    scale_by_lion,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
)
from craftfn.optim.aliases import (
    adabelief,
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamaxw,
    adamw,
    adan,
    amsgrad,
    fromage,
    lamb,
    lars,
    lbfgs,
    lion,
    nadam,
    nadamw,
    noisy_sgd,
    novograd,
    optimistic_adam,
    optimistic_adam_v2,
    optimistic_gradient_descent,
    polyak_sgd,
    radam,
    rmsprop,
    rprop,
    sgd,
    sign_sgd,
    signum,
    sm3,
    with_fused_adam,
    yogi,
)
from craftfn.optim.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Schedule,
    Updates,
    apply_updates,
    apply_updates_,
    chain,
    check_hyperparameter,
    check_updates_match,
    identity,
)
from craftfn.optim.clipping import (
    AdaptiveGradClipState,
    CentralizeState,
    ClipByBlockRMSState,
    ClipByGlobalNormState,
    ClipState,
    NonNegativeParamsState,
    ZeroNansState,
    adaptive_grad_clip,
    centralize,
    clip,
    clip_by_block_rms,
    clip_by_global_norm,
    keep_params_nonnegative,
    unitwise_norm,
    zero_nans,
)
from craftfn.optim.combine import MaskedState, PartitionState, freeze, masked, named_chain, partition
from craftfn.optim.factory import create_optimizer, no_decay_mask, optimizer_names
from craftfn.optim.fused import (
    fused_adam_step_,
    fused_supported,
)
from craftfn.optim.numerics import safe_increment, safe_int32_increment, safe_norm, safe_root_mean_squares
from craftfn.optim.orthogonal import (
    TORCH_LAYOUT,
    MuonDimensionNumbers,
    MuonState,
    muon,
    orthogonalize_via_newton_schulz,
    scale_by_muon,
    scale_by_shape,
)
from craftfn.optim.rules import (
    ScaleByAdanState,
    ScaleByBeliefState,
    ScaleByDistanceOverGradientsState,
    ScaleByLBFGSState,
    ScaleByNovogradState,
    ScaleByOptimisticGradientState,
    ScaleByRpropState,
    ScaleBySM3State,
    normalize_by_update_norm,
    scale_by_adan,
    scale_by_belief,
    scale_by_distance_over_gradients,
    scale_by_lbfgs,
    scale_by_novograd,
    scale_by_optimistic_gradient,
    scale_by_param_block_norm,
    scale_by_polyak,
    scale_by_rprop,
    scale_by_sm3,
    scale_by_yogi,
)
from craftfn.optim.schedulefree import (
    ScheduleFreeState,
    schedule_free,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
)
from craftfn.optim.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    cosine_onecycle_schedule,
    exponential_decay,
    join_schedules,
    linear_onecycle_schedule,
    linear_schedule,
    piecewise_constant_schedule,
    piecewise_interpolate_schedule,
    polynomial_schedule,
    sgdr_schedule,
    warmup_constant_schedule,
    warmup_cosine_decay_schedule,
    warmup_exponential_decay_schedule,
)
from craftfn.optim.sharding import Sharding, ShardingError, current_sharding, refuse_sharded, sharded, whole_leaves
from craftfn.optim.transforms import (
    AddDecayedWeightsState,
    AddNoiseState,
    EmaState,
    MaskOrFn,
    ScaleByParamBlockRMSState,
    ScaleByScheduleState,
    ScaleBySignState,
    ScaleByTrustRatioState,
    ScaleState,
    TraceState,
    WeightDecayScheduleState,
    add_decayed_weights,
    add_noise,
    ema,
    foreach_groups,
    foreach_map,
    scale,
    scale_by_learning_rate,
    scale_by_param_block_rms,
    scale_by_schedule,
    scale_by_sign,
    scale_by_trust_ratio,
    set_to_zero,
    stateless,
    stateless_with_tree_map,
    trace,
)
from craftfn.optim.tree_utils import (
    tree_bias_correction as bias_correction,
)
from craftfn.optim.tree_utils import (
    tree_update_infinity_moment as update_infinity_moment,
)
from craftfn.optim.tree_utils import (
    tree_update_moment as update_moment,
)
from craftfn.optim.tree_utils import (
    tree_update_moment_per_elem_norm as update_moment_per_elem_norm,
)
from craftfn.optim.update import incremental_update, periodic_update
from craftfn.optim.wrappers import (
    ApplyIfFiniteState,
    InjectHyperparamsState,
    LookaheadState,
    MultiSteps,
    MultiStepsState,
    apply_if_finite,
    inject_hyperparams,
    lookahead,
    skip_not_finite,
    tree_get,
    tree_set,
)

__all__ = [
    # combine.py / wrappers.py
    "MaskedState",
    "PartitionState",
    "freeze",
    "masked",
    "named_chain",
    "partition",
    "ApplyIfFiniteState",
    "InjectHyperparamsState",
    "LookaheadState",
    "MultiSteps",
    "MultiStepsState",
    "apply_if_finite",
    "inject_hyperparams",
    "lookahead",
    "skip_not_finite",
    "tree_get",
    "tree_set",
    "EmptyState",
    "GradientTransformation",
    "OptState",
    "Params",
    "ScalarOrSchedule",
    "Schedule",
    "Updates",
    "apply_updates",
    "apply_updates_",
    "chain",
    "check_hyperparameter",
    "check_updates_match",
    "identity",
    "ScaleByScheduleState",
    "ScaleState",
    "TraceState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "trace",
    "sgd",
]

# Primitives and aliases (transforms, clipping, aliases, orthogonal, schedulefree, fused).
__all__ += [
    "EmaState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByNadamState",
    "ScaleByRmsState",
    "ScaleByRmsWithCountState",
    "ScaleByRStdDevState",
    "ScaleByRStdDevWithCountState",
    "ScaleByRssState",
    "ScaleByLionState",
    "ScaleByAdaDeltaState",
    "FactoredState",
    "AddNoiseState",
    "AddDecayedWeightsState",
    "ScaleByTrustRatioState",
    "ScaleBySignState",
    "ScaleByParamBlockRMSState",
    "MaskOrFn",
    "ema",
    "scale_by_adam",
    "scale_by_amsgrad",
    "scale_by_nadam",
    "scale_by_adamax",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_stddev",
    "scale_by_rss",
    "scale_by_lion",
    "scale_by_adadelta",
    "scale_by_factored_rms",
    "scale_by_param_block_rms",
    "scale_by_trust_ratio",
    "scale_by_sign",
    "add_decayed_weights",
    "add_noise",
    "set_to_zero",
    "stateless",
    "foreach_groups",
    "foreach_map",
    "ClipState",
    "ClipByGlobalNormState",
    "ClipByBlockRMSState",
    "AdaptiveGradClipState",
    "ZeroNansState",
    "CentralizeState",
    "NonNegativeParamsState",
    "clip",
    "clip_by_global_norm",
    "clip_by_block_rms",
    "adaptive_grad_clip",
    "unitwise_norm",
    "zero_nans",
    "centralize",
    "keep_params_nonnegative",
    "adam",
    "adamw",
    "nadam",
    "nadamw",
    "radam",
    "adamax",
    "amsgrad",
    "lion",
    "rmsprop",
    "adagrad",
    "adadelta",
    "adafactor",
    "lamb",
    "lars",
    "sign_sgd",
    "MuonState",
    "orthogonalize_via_newton_schulz",
    "scale_by_muon",
    "muon",
    "ScheduleFreeState",
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "fused_adam_step_",
    "fused_supported",
]

# factory.py
__all__ += ["create_optimizer", "optimizer_names", "no_decay_mask"]
__all__ += ["Sharding", "ShardingError", "sharded", "current_sharding", "refuse_sharded", "whole_leaves"]

# optax's names: the optimizers and primitives added for parity, its aliases of craftfn names, and
# the submodules (contrib, losses, schedules, tree_utils) under optax's module names.
from craftfn.optim import contrib, losses, schedules, tree_utils  # noqa: E402
from craftfn.optim.base import TransformInitFn, TransformUpdateFn  # noqa: E402
from craftfn.optim.contrib._privacy import per_example_global_norm_clip  # noqa: E402
from craftfn.optim.losses import (  # noqa: E402  (optax re-exports its losses at the top level too)
    convex_kl_divergence,
    cosine_distance,
    cosine_similarity,
    ctc_loss,
    generalized_kl_divergence,
    hinge_loss,
    huber_loss,
    kl_divergence,
    l2_loss,
    log_cosh,
    safe_softmax_cross_entropy,
    sigmoid_binary_cross_entropy,
    sigmoid_focal_loss,
    smooth_labels,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
    squared_error,
)
from craftfn.optim.wrappers import ShouldSkipUpdateFunction, skip_large_updates  # noqa: E402
from craftfn.tree import global_norm  # noqa: E402

TransformUpdateExtraArgsFn = TransformUpdateFn  # every craftfn update takes **extra
multi_transform = partition  # optax's older name
MultiTransformState = PartitionState
GradientTransformationExtraArgs = GradientTransformation  # every craftfn rule takes **extra
init_empty_state = lambda params: EmptyState()  # noqa: E731


def with_extra_args_support(tx: GradientTransformation) -> GradientTransformation:
    """``tx`` itself: every craftfn transformation already accepts extra keyword arguments (optax compatibility).

    Example:
        >>> tx = optim.sgd(0.1)
        >>> optim.with_extra_args_support(tx) is tx
        True
    """
    return tx


__all__ += [
    "adabelief", "adamaxw", "adan", "fromage", "lbfgs", "noisy_sgd", "novograd", "optimistic_adam", "optimistic_adam_v2",
    "optimistic_gradient_descent", "polyak_sgd", "rprop", "signum", "sm3", "yogi", "with_fused_adam",
    "ScaleByAdanState", "ScaleByBeliefState", "ScaleByDistanceOverGradientsState", "ScaleByLBFGSState", "ScaleByNovogradState",
    "ScaleByOptimisticGradientState", "ScaleByRpropState", "ScaleBySM3State", "WeightDecayScheduleState",
    "normalize_by_update_norm", "scale_by_adan", "scale_by_belief", "scale_by_distance_over_gradients", "scale_by_lbfgs",
    "scale_by_novograd", "scale_by_optimistic_gradient", "scale_by_param_block_norm", "scale_by_polyak", "scale_by_rprop",
    "scale_by_sm3", "scale_by_yogi", "scale_by_shape", "MuonDimensionNumbers", "TORCH_LAYOUT", "schedule_free_sgd",
    "stateless_with_tree_map", "incremental_update", "periodic_update", "global_norm", "multi_transform", "MultiTransformState",
    "GradientTransformationExtraArgs", "init_empty_state", "with_extra_args_support",
    "safe_norm", "safe_root_mean_squares", "safe_increment", "safe_int32_increment",
    "bias_correction", "update_moment", "update_moment_per_elem_norm", "update_infinity_moment",
    "constant_schedule", "cosine_decay_schedule", "cosine_onecycle_schedule", "exponential_decay", "join_schedules",
    "linear_onecycle_schedule", "linear_schedule", "piecewise_constant_schedule", "piecewise_interpolate_schedule",
    "polynomial_schedule", "sgdr_schedule", "warmup_constant_schedule", "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule", "contrib", "losses", "schedules", "tree_utils",
    "TransformInitFn", "TransformUpdateFn", "TransformUpdateExtraArgsFn", "per_example_global_norm_clip",
    "skip_large_updates", "ShouldSkipUpdateFunction",
    "convex_kl_divergence", "cosine_distance", "cosine_similarity", "ctc_loss", "generalized_kl_divergence", "hinge_loss",
    "huber_loss", "kl_divergence", "l2_loss", "log_cosh", "safe_softmax_cross_entropy", "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss", "smooth_labels", "softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels", "squared_error",
]
