"""The optax-parity problem and cases, shared by the reference generator (jax + optax) and the tests (torch).

Nothing here imports jax, optax or torch: ``ox`` is the optimizer namespace (``optax`` on the
generator's side, ``craftfn.optim`` on craftfn's), and the problem is plain numpy in float64.

The problem: a tree with matrices, a vector, a 3-D tensor and a scalar; at step ``t`` the loss is
``1 + sum(0.5 * h * (p - target)^2 + noise_t * p)`` with a fixed positive curvature ``h`` and a
deterministic drift ``noise_t = 0.1 sin(1.7 t + 0.37 k)`` (k the element's index in the flat tree).
Both sides compute it in float64 from float32 parameters and round the gradient to float32, so
they feed the rules the same numbers up to the parameters' own differences.
"""

from __future__ import annotations

import numpy as np

STEPS = 50
SNAPSHOTS = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50)  # steps whose parameters the reference keeps
SHAPES = {"matrix": (4, 3), "scalar": (), "tensor3": (2, 3, 4), "vector": (5,), "wide": (3, 5)}
MASK = {"matrix": True, "scalar": False, "tensor3": True, "vector": False, "wide": True}
NOT_SCALAR = {"matrix": "a", "scalar": "b", "tensor3": "a", "vector": "a", "wide": "a"}  # optax's sm3 rejects 0-d leaves
PER_EXAMPLE = 3  # batch size of the per-example gradients given to the differentially private cases


def _constants(seed: int = 0) -> tuple[dict, dict, dict, dict]:
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    target = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    curvature = {k: rng.uniform(0.5, 2.0, size=s) for k, s in SHAPES.items()}
    offset, index = {}, 0
    for k, s in SHAPES.items():
        n = int(np.prod(s))
        offset[k] = np.arange(index, index + n, dtype=np.float64).reshape(s)
        index += n
    return params, target, curvature, offset


_PARAMS, _TARGET, _CURV, _INDEX = _constants()


def initial_params() -> dict:
    """The starting parameters (float32 numpy arrays)."""
    return {k: v.copy() for k, v in _PARAMS.items()}


def value_and_grad(params: dict, step: int) -> tuple[float, dict]:
    """The loss (float) and its gradient (float32 arrays) at float32 ``params`` (numpy arrays)."""
    value, grads = 1.0, {}
    for k in SHAPES:
        p = np.asarray(params[k], dtype=np.float64)
        noise = 0.1 * np.sin(1.7 * step + 0.37 * _INDEX[k])
        d = p - _TARGET[k]
        value += float(np.sum(0.5 * _CURV[k] * d * d + noise * p))
        grads[k] = np.asarray(_CURV[k] * d + noise, dtype=np.float32)
    return value, grads


def flatten(params: dict) -> np.ndarray:
    """The leaves of a parameter tree, flattened and concatenated in SHAPES order (float32)."""
    return np.concatenate([np.asarray(params[k], dtype=np.float32).reshape(-1) for k in SHAPES])


def unflatten(row: np.ndarray) -> dict:
    """Inverse of :func:`flatten`."""
    out, i = {}, 0
    for k, s in SHAPES.items():
        n = int(np.prod(s))
        out[k] = row[i:i + n].reshape(s)
        i += n
    return out


def per_example(grads: dict) -> dict:
    """A batch of per-example gradients whose mean is ``grads`` (for the DP cases)."""
    weights = np.array([0.5, 1.0, 1.5], dtype=np.float32)  # mean 1
    return {k: np.stack([w * g for w in weights]).astype(np.float32) for k, g in grads.items()}


# case id -> (builder(ox) -> transformation, extras) where extras lists what update needs:
# "value" (the loss as value=...), "per_example" (gradients with a batch axis).
def _cases() -> dict:
    c: dict = {}

    def add(name, build, *extras):
        c[name] = (build, extras)

    # ---- optax core aliases: the defaults (only the required arguments), then another setting.
    add("adabelief", lambda ox: ox.adabelief(1e-2))
    add("adabelief/nesterov", lambda ox: ox.adabelief(1e-2, b1=0.8, eps=1e-8, nesterov=True))
    add("adadelta", lambda ox: ox.adadelta(0.5))
    add("adadelta/wd", lambda ox: ox.adadelta(0.5, rho=0.8, eps=1e-4, weight_decay=0.1))
    add("adafactor", lambda ox: ox.adafactor(1e-2))
    add("adafactor/factored", lambda ox: ox.adafactor(1e-2, min_dim_size_to_factor=3, momentum=0.9, weight_decay_rate=0.01, decay_rate=0.7))
    add("adagrad", lambda ox: ox.adagrad(0.1))
    add("adagrad/init0", lambda ox: ox.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-4))
    add("adam", lambda ox: ox.adam(1e-2))
    add("adam/nesterov", lambda ox: ox.adam(1e-2, b1=0.5, b2=0.99, eps=1e-4, eps_root=1e-8, nesterov=True))
    add("adamax", lambda ox: ox.adamax(1e-2))
    add("adamax/b1", lambda ox: ox.adamax(1e-2, b1=0.5, eps=1e-3))
    add("adamaxw", lambda ox: ox.adamaxw(1e-2))
    add("adamaxw/mask", lambda ox: ox.adamaxw(1e-2, weight_decay=0.1, mask=dict(MASK)))
    add("adamw", lambda ox: ox.adamw(1e-2))
    add("adamw/mask", lambda ox: ox.adamw(1e-2, weight_decay=0.1, mask=dict(MASK), nesterov=True))
    add("adan", lambda ox: ox.adan(1e-2))
    add("adan/wd", lambda ox: ox.adan(1e-2, b1=0.9, eps_root=0.0, weight_decay=0.01))
    add("amsgrad", lambda ox: ox.amsgrad(1e-2))
    add("amsgrad/b2", lambda ox: ox.amsgrad(1e-2, b1=0.5, b2=0.9))
    add("fromage", lambda ox: ox.fromage(1e-2))
    add("fromage/schedule", lambda ox: ox.fromage(ox.exponential_decay(1e-2, 10, 0.5), min_norm=1e-3))
    add("lamb", lambda ox: ox.lamb(1e-2))
    add("lamb/wd", lambda ox: ox.lamb(1e-2, weight_decay=0.1, eps_root=1e-8, mask=dict(MASK)))
    add("lars", lambda ox: ox.lars(0.1))
    add("lars/nesterov", lambda ox: ox.lars(0.1, weight_decay=0.01, trust_coefficient=0.01, nesterov=True))
    add("lbfgs", lambda ox: ox.lbfgs(linesearch=None))
    add("lbfgs/memory", lambda ox: ox.lbfgs(memory_size=5, scale_init_precond=False, linesearch=None))
    add("lion", lambda ox: ox.lion(1e-3))
    add("lion/wd", lambda ox: ox.lion(1e-3, b1=0.5, weight_decay=0.1))
    add("nadam", lambda ox: ox.nadam(1e-2))
    add("nadam/eps_root", lambda ox: ox.nadam(1e-2, b1=0.8, eps_root=1e-8))
    add("nadamw", lambda ox: ox.nadamw(1e-2))
    add("nadamw/wd", lambda ox: ox.nadamw(1e-2, weight_decay=0.1, mask=dict(MASK)))
    # noisy_sgd draws its noise from the backend's generator (jax's threefry vs craftfn's keys):
    # the deterministic part is compared here, the noise's law in test_optax_parity.
    add("noisy_sgd/eta0", lambda ox: ox.noisy_sgd(1e-2, eta=0.0))
    add("noisy_sgd/eta0_gamma", lambda ox: ox.noisy_sgd(1e-1, eta=0.0, gamma=0.3))
    add("novograd", lambda ox: ox.novograd(1e-2))
    add("novograd/wd", lambda ox: ox.novograd(1e-2, b1=0.5, weight_decay=0.01))
    add("optimistic_adam", lambda ox: ox.optimistic_adam(1e-2))
    add("optimistic_adam/optimism", lambda ox: ox.optimistic_adam(1e-2, optimism=0.1, nesterov=False))
    add("optimistic_adam_v2", lambda ox: ox.optimistic_adam_v2(1e-2))
    add("optimistic_adam_v2/alpha", lambda ox: ox.optimistic_adam_v2(1e-2, alpha=0.5, beta=0.5))
    add("optimistic_gradient_descent", lambda ox: ox.optimistic_gradient_descent(1e-2))
    add("optimistic_gradient_descent/alpha", lambda ox: ox.optimistic_gradient_descent(1e-2, alpha=0.5, beta=2.0))
    add("polyak_sgd", lambda ox: ox.polyak_sgd(), "value")
    add("polyak_sgd/sps+", lambda ox: ox.polyak_sgd(max_learning_rate=0.1, f_min=0.5, variant="sps+"), "value")
    add("radam", lambda ox: ox.radam(1e-2))
    add("radam/nesterov", lambda ox: ox.radam(1e-2, threshold=6.0, nesterov=True))
    add("rmsprop", lambda ox: ox.rmsprop(1e-2))
    add("rmsprop/centered", lambda ox: ox.rmsprop(1e-2, centered=True, momentum=0.9, nesterov=True))
    add("rprop", lambda ox: ox.rprop(1e-2))
    add("rprop/eta", lambda ox: ox.rprop(1e-2, eta_minus=0.3, max_step_size=0.05))
    add("sgd", lambda ox: ox.sgd(0.1))
    add("sgd/nesterov", lambda ox: ox.sgd(0.1, momentum=0.9, nesterov=True))
    add("sign_sgd", lambda ox: ox.sign_sgd(1e-2))
    add("sign_sgd/schedule", lambda ox: ox.sign_sgd(ox.exponential_decay(1e-2, 10, 0.5)))
    add("signum", lambda ox: ox.signum(1e-2))
    add("signum/beta", lambda ox: ox.signum(1e-2, beta=0.5))
    add("sm3", lambda ox: ox.partition({"a": ox.sm3(0.1), "b": ox.sgd(0.1)}, dict(NOT_SCALAR)))
    add("sm3/momentum", lambda ox: ox.partition({"a": ox.sm3(0.1, momentum=0.5), "b": ox.sgd(0.1)}, dict(NOT_SCALAR)))
    add("yogi", lambda ox: ox.yogi(1e-2))
    add("yogi/b1", lambda ox: ox.yogi(1e-2, b1=0.5, eps=1e-4))
    # ---- optax.contrib
    add("contrib.acprop", lambda ox: ox.contrib.acprop(1e-2))
    add("contrib.acprop/wd", lambda ox: ox.contrib.acprop(1e-2, b1=0.8, weight_decay=0.01))
    add("contrib.ademamix", lambda ox: ox.contrib.ademamix(1e-2))
    add("contrib.ademamix/alpha", lambda ox: ox.contrib.ademamix(1e-2, alpha=2.0, b3=0.999, weight_decay=0.01))
    add("contrib.adopt", lambda ox: ox.contrib.adopt(1e-2))
    add("contrib.adopt/nesterov", lambda ox: ox.contrib.adopt(1e-2, nesterov=True, use_clipping=False))
    add("contrib.cocob", lambda ox: ox.contrib.cocob())
    add("contrib.cocob/alpha", lambda ox: ox.contrib.cocob(alpha=10.0, weight_decay=0.01))
    add("contrib.dadapt_adamw", lambda ox: ox.contrib.dadapt_adamw())
    add("contrib.dadapt_adamw/wd", lambda ox: ox.contrib.dadapt_adamw(learning_rate=0.5, estim_lr0=1e-4, weight_decay=0.01))
    add("contrib.dog", lambda ox: ox.contrib.dog())
    add("contrib.dog/lr", lambda ox: ox.contrib.dog(init_step=("learning_rate", 1e-2), weight_decay=0.01))
    add("contrib.dowg", lambda ox: ox.contrib.dowg())
    add("contrib.dowg/init", lambda ox: ox.contrib.dowg(init_estim_sq_dist=1e-3))
    add("contrib.dpsgd/noise0", lambda ox: ox.contrib.dpsgd(0.1, l2_norm_clip=1.0, noise_multiplier=0.0, seed=0), "per_example")
    add("contrib.dpsgd/momentum", lambda ox: ox.contrib.dpsgd(0.1, l2_norm_clip=0.5, noise_multiplier=0.0, seed=0, momentum=0.9), "per_example")
    add("contrib.madgrad", lambda ox: ox.contrib.madgrad(1e-2))
    add("contrib.madgrad/momentum", lambda ox: ox.contrib.madgrad(1e-2, momentum=0.5, weight_decay=0.01))
    add("contrib.mechanize", lambda ox: ox.contrib.mechanize(ox.adam(1e-2)))
    add("contrib.mechanize/sgd", lambda ox: ox.contrib.mechanize(ox.sgd(1e-2), weight_decay=0.0, num_betas=3))
    add("contrib.momo", lambda ox: ox.contrib.momo(), "value")
    add("contrib.momo/adapt", lambda ox: ox.contrib.momo(learning_rate=0.1, beta=0.5, adapt_lower_bound=True, weight_decay=0.01), "value")
    add("contrib.momo_adam", lambda ox: ox.contrib.momo_adam(), "value")
    add("contrib.momo_adam/adapt", lambda ox: ox.contrib.momo_adam(learning_rate=0.1, adapt_lower_bound=True, weight_decay=0.01), "value")
    add("contrib.muon", lambda ox: ox.contrib.muon(1e-2))
    add("contrib.muon/plain", lambda ox: ox.contrib.muon(1e-2, nesterov=False, weight_decay=0.01, ns_steps=3, adam_b1=0.5))
    add("contrib.prodigy", lambda ox: ox.contrib.prodigy())
    add("contrib.prodigy/safeguard", lambda ox: ox.contrib.prodigy(learning_rate=0.5, safeguard_warmup=True, weight_decay=0.01))
    add("contrib.reduce_on_plateau", lambda ox: ox.chain(ox.sgd(0.1), ox.contrib.reduce_on_plateau()), "value")
    add("contrib.reduce_on_plateau/patience", lambda ox: ox.chain(ox.sgd(0.3), ox.contrib.reduce_on_plateau(factor=0.5, patience=2, rtol=0.05, cooldown=2, accumulation_size=2)), "value")
    add("contrib.sam", lambda ox: ox.contrib.sam(ox.sgd(0.1), ox.sgd(0.05)))
    add("contrib.sam/normalized", lambda ox: ox.contrib.sam(ox.adam(1e-2), ox.chain(ox.contrib.normalize(), ox.sgd(0.05)), sync_period=3, reset_state=False))
    add("contrib.schedule_free_adamw", lambda ox: ox.contrib.schedule_free_adamw())
    add("contrib.schedule_free_adamw/warmup", lambda ox: ox.contrib.schedule_free_adamw(1e-2, warmup_steps=5, b1=0.8, weight_decay=0.01))
    add("contrib.schedule_free_sgd", lambda ox: ox.contrib.schedule_free_sgd())
    add("contrib.schedule_free_sgd/warmup", lambda ox: ox.contrib.schedule_free_sgd(0.1, warmup_steps=5, weight_decay=0.01))
    add("contrib.simplified_ademamix", lambda ox: ox.contrib.simplified_ademamix(1e-2))
    add("contrib.simplified_ademamix/alpha", lambda ox: ox.contrib.simplified_ademamix(1e-2, b1=0.9, alpha=1.0))
    return c


CASES = _cases()


def optimizer_name(case: str) -> str:
    """``"contrib.muon/plain"`` -> ``"contrib.muon"``."""
    return case.split("/")[0]
