"""Five programs written against optax's API, run unchanged by the generator (``optax``, ``jnp = jax.numpy``)
and by the port test (``optax = craftfn.optim``, ``jnp = torch``). Each leaves its outcome in ``result``."""

PROGRAMS = {
    "chain_clip_adamw_schedule_mask": '''
params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
target = {"w": jnp.full((3, 2), 0.5), "b": jnp.full((2,), -1.0)}

def grads_of(p):
    return {k: 2.0 * (p[k] - target[k]) for k in p}

schedule = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=0.1, warmup_steps=5, decay_steps=40)
tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(learning_rate=schedule, weight_decay=1e-2, mask={"w": True, "b": False}),
)
opt_state = tx.init(params)
for step in range(40):
    updates, opt_state = tx.update(grads_of(params), opt_state, params)
    params = optax.apply_updates(params, updates)
result = params
''',
    "multi_transform_two_rules": '''
params = {"encoder": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((3,)), "b": jnp.zeros((3,))}}

def grads_of(p):
    return {m: {k: v - 0.2 for k, v in sub.items()} for m, sub in p.items()}

tx = optax.multi_transform(
    {"train": optax.sgd(0.1, momentum=0.9), "slow": optax.adam(1e-2)},
    {"encoder": "slow", "head": "train"},
)
opt_state = tx.init(params)
for step in range(25):
    updates, opt_state = tx.update(grads_of(params), opt_state, params)
    params = optax.apply_updates(params, updates)
result = params
''',
    "multisteps_accumulation": '''
params = {"w": jnp.asarray([1.0, -2.0, 3.0])}
opt = optax.MultiSteps(optax.sgd(0.1, momentum=0.5), every_k_schedule=3)
opt_state = opt.init(params)
updated = []
for step in range(10):
    grads = {"w": params["w"] * (step % 3 + 1)}
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    updated.append(1.0 * opt.has_updated(opt_state))
result = {"params": params, "updated": jnp.asarray(updated)}
''',
    "inject_hyperparams_changed_lr": '''
params = {"w": jnp.asarray([0.5, -1.5]), "v": jnp.ones((2, 2))}
tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
opt_state = tx.init(params)
lrs = []
for step in range(12):
    if step == 6:
        opt_state.hyperparams["learning_rate"] = 0.01
    grads = {k: 2.0 * v for k, v in params.items()}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    lrs.append(1.0 * opt_state.hyperparams["learning_rate"])
result = {"params": params, "lrs": jnp.asarray(lrs)}
''',
    "incremental_update_ema": '''
params = {"w": jnp.asarray([1.0, 2.0, -3.0])}
ema_params = params
tx = optax.sgd(0.2)
opt_state = tx.init(params)
for step in range(20):
    grads = {"w": params["w"] - 0.5}
    updates, opt_state = tx.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
    ema_params = optax.incremental_update(params, ema_params, step_size=0.1)
result = {"params": params, "ema": ema_params}
''',
}


def flat_result(result, to_numpy) -> dict:
    """``{"a.b": array}`` for a nested dict of arrays."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k in sorted(node):
                walk(f"{prefix}.{k}" if prefix else k, node[k])
        else:
            out[prefix] = to_numpy(node)

    walk("", result)
    return out
