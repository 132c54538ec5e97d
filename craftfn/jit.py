"""``craftfn.jit``: compile a pure function of pytrees, JAX's ``jit`` for PyTorch.

``jit(fn, donate_argnums=..., static_argnums=...)`` compiles ``fn`` with ``torch.compile``
(``fullgraph=True``: one graph or an error, never a silent fallback to eager code) and takes care of
what a functional step needs and a plain ``torch.compile`` does not give:

* **the engine's configuration**: ``craftfn.value_and_grad`` calls ``torch.autograd.grad``, which
  dynamo traces only with a configuration flag. ``jit`` sets it for its own calls (a scoped patch,
  nothing changes globally), so a hand-written step compiles without any torch flag;
* **donation**: arguments named in ``donate_argnums`` may be updated in place inside the graph
  (``state.apply_gradients(grads, donate=True)``); after the call, outside the graph, every
  ``TrainState`` in them is marked donated, so reusing one raises ``DonatedStateError``;
* **static arguments**: arguments named in ``static_argnums`` are Python values (ints, strings,
  configs, callables; hashable) that the function is specialised on: each distinct value gets its
  own graph, and a value is never turned into a symbolic input;
* **keyed randomness**: module dropout drawn from a key (``TrainState.apply(..., rng=key)``,
  :func:`craftfn.random.module_rng`) traces, so compiled and eager runs give the same masks.

``make_train_step(compile=...)``, ``make_eval_step(compile=...)`` and the compiled generation loops
all compile through this function: there is one way to compile in craftfn.

The default backend is inductor (generated kernels; the first call takes tens of seconds on a
CPU). The examples pass ``backend="eager"``, which traces and checks the graph but runs it
as is, so they run in a moment.

Example:
    >>> import torch, craftfn
    >>> from craftfn import TrainState, optim, random, value_and_grad
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    >>> def step(state, batch):
    ...     rng = random.fold_in(state.rng, state.step)
    ...     def loss(params):
    ...         pred = state.apply(params, batch["x"], rng=rng, training=True)
    ...         return torch.mean((pred - batch["y"]) ** 2)
    ...     value, grads = value_and_grad(loss)(state.params)
    ...     return state.apply_gradients(grads, donate=True), value
    >>> fast_step = craftfn.jit(step, donate_argnums=0, backend="eager")
    >>> state = TrainState.create(model=model, tx=optim.adamw(1e-2))
    >>> batch = {"x": torch.ones(8, 4), "y": torch.zeros(8, 1)}
    >>> new_state, loss = fast_step(state, batch)
    >>> int(new_state.step)
    1
    >>> state.params  # doctest: +ELLIPSIS
    <donated params>
"""

from __future__ import annotations

import functools
import itertools
import time
import types
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from craftfn import _context, tree
from craftfn.state import TrainState, _mark_donated, check_live

__all__ = ["jit", "Jitted", "engine_config"]

ArgNums = Union[int, Sequence[int]]

# Dynamo configuration the functional engine needs, applied only around craftfn.jit calls:
# - torch.autograd.grad (value_and_grad, make_train_step) is traced only with
#   trace_autograd_ops (torch 2.13); without it fullgraph=True raises on the first backward.
# - Keyed module randomness advances a Python counter (random.module_rng) as it draws. Inside an
#   activation-checkpointed block that is a side effect dynamo refuses unless told not to replay
#   it in the backward; the compiled backward recomputes the masks from the graph itself (same
#   key tensor, same counters), so there is nothing to replay.
_ENGINE_CONFIG = {"trace_autograd_ops": True, "skip_fwd_side_effects_in_bwd_under_checkpoint": True}

_code_ids = itertools.count()


def engine_config() -> Any:
    """The dynamo configuration craftfn's functional engine needs, as a context manager.

    ``craftfn.jit`` applies it around each of its calls; use it yourself only where you call
    ``torch.compile`` or ``torch._dynamo.explain`` on a craftfn step directly (``value_and_grad``
    calls ``torch.autograd.grad``, which dynamo traces only with it). Nothing changes globally.

    Example:
        >>> from craftfn.jit import engine_config
        >>> with engine_config():
        ...     pass  # torch.compile(my_step, fullgraph=True)(state, batch) traces value_and_grad here
    """
    return torch._dynamo.config.patch(**_ENGINE_CONFIG)


def _as_argnums(value: ArgNums, argname: str) -> tuple[int, ...]:
    items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        nums = tuple(items)
    except TypeError:
        raise TypeError(f"{argname} must be an int or a sequence of ints, got {value!r}") from None
    for n in nums:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{argname} must hold non-negative ints (positions of arguments), got {value!r}")
    if len(set(nums)) != len(nums):
        raise ValueError(f"{argname} names a position twice: {value!r}")
    return tuple(sorted(nums))


def _train_states(value: Any) -> Iterator[TrainState]:
    """Every ``TrainState`` in ``value`` and its tuples, lists and dicts (not inside other states)."""
    if isinstance(value, TrainState):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _train_states(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _train_states(item)


def _merge(dynamic: Sequence[Any], statics: tuple[Any, ...], static_positions: tuple[int, ...]) -> list[Any]:
    """The full argument list from the dynamic arguments and the static ones at their positions."""
    args = list(dynamic)
    for pos, value in zip(static_positions, statics):
        args.insert(pos, value)
    return args


class Jitted:
    """A function compiled by :func:`jit`; call it like the function itself.

    Attributes:
        fn: the original function (call it for the eager result).
        donate_argnums, static_argnums: as given to :func:`jit`, as sorted tuples.
        compile_options: the ``torch.compile`` options used (``fullgraph=True`` unless overridden).
        compile_seconds: wall time of the first call (tracing, compiling and one run); ``None`` before.
    """

    def __init__(self, fn: Callable[..., Any], donate_argnums: ArgNums, static_argnums: ArgNums, compile_options: dict[str, Any]) -> None:
        if not callable(fn):
            raise TypeError(f"craftfn.jit: fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.donate_argnums = _as_argnums(donate_argnums, "donate_argnums")
        self.static_argnums = _as_argnums(static_argnums, "static_argnums")
        both = sorted(set(self.donate_argnums) & set(self.static_argnums))
        if both:
            raise ValueError(f"craftfn.jit: argument(s) {both} cannot be both donated and static (a static value has no buffers)")
        self.compile_options = {"fullgraph": True, **compile_options}
        self.compile_seconds: Optional[float] = None
        self._compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"craftfn.jit({getattr(self.fn, '__qualname__', self.fn)!r}, donate_argnums={self.donate_argnums}, static_argnums={self.static_argnums})"

    def _check_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        needed = max(self.donate_argnums + self.static_argnums, default=-1) + 1
        if len(args) < needed:
            raise TypeError(
                f"{self!r} was called with {len(args)} positional argument(s), but donate_argnums/static_argnums "
                f"name position {needed - 1}; pass those arguments positionally"
            )
        for i, arg in enumerate(args):
            for state in _train_states(arg):
                check_live(state, f"argument {i}")
        statics = tuple(args[i] for i in self.static_argnums)
        for i, value in zip(self.static_argnums, statics):
            try:
                hash(value)
            except TypeError:
                raise TypeError(
                    f"static argument {i} of {self!r} must be hashable (it keys the compiled graph), got {type(value).__name__}; "
                    "pass tensors and pytrees of tensors as ordinary arguments"
                ) from None
        return statics

    def _compiled_for(self, statics: tuple[Any, ...]) -> Callable[..., Any]:
        compiled = self._compiled.get(statics)
        if compiled is None:
            fn, positions = self.fn, self.static_argnums

            def call(*dynamic: Any, **kwargs: Any) -> Any:
                return fn(*_merge(dynamic, statics, positions), **kwargs)

            # Dynamo keeps its cache, its recompile limit and its record of which inputs vary per
            # code object. A code object of its own for every jit and every static value keeps
            # jits apart and makes static ints constants, never symbolic inputs.
            code = call.__code__.replace(co_name=f"craftfn_jit_{getattr(fn, '__name__', 'fn')}_{next(_code_ids)}")
            call = types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)
            compiled = self._compiled[statics] = torch.compile(call, **self.compile_options)
        return compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        statics = self._check_args(args)
        compiled = self._compiled_for(statics)
        dynamic = [a for i, a in enumerate(args) if i not in self.static_argnums]
        first = self.compile_seconds is None
        t0 = time.perf_counter()
        try:
            with engine_config(), _context.jit_context(donating=bool(self.donate_argnums)):
                out = compiled(*dynamic, **kwargs)
        except torch._dynamo.exc.Unsupported as e:
            if isinstance(e.__cause__, torch._dynamo.exc.ObservedException):
                self._raise_user_error(args, kwargs)
            raise
        if first:
            self.compile_seconds = time.perf_counter() - t0
        self._mark_donated(args, out)
        return out

    def _raise_user_error(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The function raised while being traced (a bad argument, a misuse): raise that error itself.

        Dynamo reports it wrapped in a graph-break error; running the function eagerly on copies of
        the donated arguments (nothing the caller holds changes) raises the user's own exception.
        Returns if the eager run succeeds (the trace failed for another reason).
        """
        args = tuple(tree.clone(a) if i in self.donate_argnums else a for i, a in enumerate(args))
        try:
            with _context.jit_context(donating=bool(self.donate_argnums)):
                self.fn(*args, **kwargs)
        except Exception as user_error:
            raise user_error from None

    def _mark_donated(self, args: tuple[Any, ...], out: Any) -> None:
        if not self.donate_argnums:
            return
        returned = {id(s) for s in _train_states(out)}
        for i in self.donate_argnums:
            for state in _train_states(args[i]):
                # A state returned as it came in stays usable: it is the result.
                if id(state) not in returned:
                    _mark_donated(state)

    def explain(self, *args: Any, **kwargs: Any) -> Any:
        """``torch._dynamo.explain`` of this function on these arguments, under the jit's configuration.

        Returns the explanation (``graph_count``, ``graph_break_count``, ``break_reasons``); runs
        the function once on copies of the donated arguments, so nothing the caller holds changes.

        Example:
            >>> f = craftfn.jit(lambda x: torch.sin(x) * 2)
            >>> f.explain(torch.ones(3)).graph_break_count
            0
        """
        statics = self._check_args(args)
        args = tuple(tree.clone(a) if i in self.donate_argnums else a for i, a in enumerate(args))
        fn, positions = self.fn, self.static_argnums
        dynamic = [a for i, a in enumerate(args) if i not in positions]
        with engine_config(), _context.jit_context(donating=bool(self.donate_argnums)):
            return torch._dynamo.explain(lambda *d, **kw: fn(*_merge(d, statics, positions), **kw))(*dynamic, **kwargs)


def jit(
    fn: Optional[Callable[..., Any]] = None,
    *,
    donate_argnums: ArgNums = (),
    static_argnums: ArgNums = (),
    **compile_options: Any,
) -> Any:
    """Compile ``fn``, a pure function of pytrees, into one graph (JAX's ``jax.jit``).

    Args:
        fn: the function; its arguments are pytrees of tensors (``TrainState``, batches, keys),
            Python values, and whatever ``torch.compile`` accepts. Used as ``@craftfn.jit`` or
            ``@craftfn.jit(donate_argnums=0)`` too.
        donate_argnums: positions of arguments the function may update in place
            (``state.apply_gradients(grads, donate=True)`` inside it). After the call every
            ``TrainState`` in them is marked donated: using one again raises
            ``DonatedStateError``. ``apply_gradients(donate=True)`` inside a jit without
            ``donate_argnums`` raises a ``ValueError``.
        static_argnums: positions of hashable Python arguments to specialise on: the function is
            traced once per distinct value (compared with ``==``), and the value is a constant
            in the graph.
        compile_options: passed to ``torch.compile`` (``backend=``, ``mode=``, ``dynamic=``,
            ``options=``); ``fullgraph`` defaults to ``True``; ``backend`` to inductor (the
            example uses ``"eager"``, which traces without generating kernels, to run fast).

    Returns:
        A :class:`Jitted` callable with the signature of ``fn``; ``.explain(*args)`` reports its
        graphs and graph breaks, ``.compile_seconds`` the cost of the first call.

    Example:
        >>> @craftfn.jit(static_argnums=1, backend="eager")
        ... def power(x, n):
        ...     for _ in range(n - 1):
        ...         x = x * x
        ...     return x
        >>> power(torch.tensor(2.0), 3)
        tensor(16.)
    """
    if fn is None:
        return functools.partial(jit, donate_argnums=donate_argnums, static_argnums=static_argnums, **compile_options)
    return Jitted(fn, donate_argnums, static_argnums, compile_options)
