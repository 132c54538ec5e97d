"""``craftfn train|eval|generate|export|configs``: gin-configured experiments from the command line (t5x conventions).

Usage::

    craftfn train --gin_file char_gpt.gin [--gin_file more.gin ...]
                  [--gin.NAME=VALUE ...] [--gin_bindings 'Trainer.max_steps = 100' ...]
                  [--run_dir runs/char_gpt] [--resume]
    craftfn eval  --run_dir runs/char_gpt [--gin_file FILE ...] [--checkpoint FILE]
    craftfn generate --run_dir runs/char_gpt --prompt 'def ' [--num_samples N --max_new_tokens N
                  --temperature T --top_k K --top_p P --num_beams B --seed S --checkpoint FILE --compile]
    craftfn export --format hf RUN_DIR OUT_DIR [--checkpoint FILE]
    craftfn configs
    craftfn --version

``--gin_file`` takes a path or the name of a shipped config (``craftfn configs`` lists them);
includes resolve relative to the including file, then the shipped configs (see
:mod:`craftfn.gin_files`). Files are read in order, then bindings in command-line order: later
ones win, and a binding on the command line also replaces the scoped bindings of the same
parameter that the files hold. ``--gin.NAME=VALUE`` is the binding ``NAME = VALUE``: a bare word
such as a path is taken as a string, and bare comma-separated words are a list
(``--gin.create_optimizer.no_decay=bias,ln_`` is ``['bias', 'ln_']``; so is ``[bias, ln_]``).
``craftfn eval`` without ``--gin_file`` replays the run's own ``config.gin``. A run directory
that already holds checkpoints is resumed automatically. User errors (a missing gin file, an unknown binding, an unset
``%gin.REQUIRED`` macro, a missing or empty data file) print one paragraph on
stderr and exit with status 2.

Example:
    >>> main(["train", "--gin_file", "gin/char_gpt.gin", "--gin.Trainer.max_steps=10"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "parse_gin_arguments", "UsageError"]

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line or the configuration: reported in one paragraph, exit status 2."""


def _gin_scalar(value: str) -> str:
    """Keep gin literals, references and macros; quote anything else (a bare path or word)."""
    v = value.strip()
    if not v or v[0] in "@%[({'\"" or v in ("True", "False", "None"):
        return v
    try:
        ast.literal_eval(v)
        return v
    except (ValueError, SyntaxError):
        return repr(v)


def _gin_value(value: str) -> str:
    """A command-line value as gin text: scalars as :func:`_gin_scalar`; bare comma-separated
    items (``a,b``) and brackets of bare items (``[a, b]``, ``(a, b)``) as a gin list/tuple of
    quoted items. Anything quoted, or a bracket gin parses as it is, is left alone."""
    v = value.strip()
    if v[:1] in "[(" and v[-1:] == {"[": "]", "(": ")"}[v[:1]]:
        from craftfn.gin_files import is_gin_value

        if is_gin_value(v):
            return v
        items = [i for i in v[1:-1].split(",") if i.strip()]
        joined = ", ".join(_gin_scalar(i) for i in items)
        return f"[{joined}]" if v[0] == "[" else f"({joined}{',' if len(items) == 1 else ''})"
    if "," in v and v[:1] not in "@%{'\"":
        return "[" + ", ".join(_gin_scalar(i) for i in v.split(",") if i.strip()) + "]"
    return _gin_scalar(v)


def parse_gin_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--gin.NAME=VALUE`` arguments from the rest, in order.

    Returns:
        ``(other_arguments, bindings)`` where ``--gin.NAME=VALUE`` became ``"NAME = VALUE"``;
        ``--gin_bindings`` stay in ``other_arguments`` but keep their relative order via
        a marker so that later bindings win whichever form they use.

    Example:
        >>> parse_gin_arguments(["train", "--gin.Trainer.max_steps=5", "--gin.DATA_PATH=in.txt"])
        (['train'], ['Trainer.max_steps = 5', "DATA_PATH = 'in.txt'"])
    """
    rest: list[str] = []
    bindings: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg.startswith("--gin."):
            name, eq, value = arg[len("--gin.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{arg} needs a value: write --gin.{name}=VALUE")
                value = argv[i + 1]
                next(it)
            if not name:
                raise UsageError(f"{arg!r} names no binding: write --gin.NAME=VALUE, e.g. --gin.Trainer.max_steps=100")
            bindings.append(f"{name} = {_gin_value(value)}")
        elif arg == "--gin_bindings" or arg.startswith("--gin_bindings="):
            if "=" in arg:
                bindings.append(arg.split("=", 1)[1])
            else:
                if i + 1 >= len(argv):
                    raise UsageError("--gin_bindings needs a value, e.g. --gin_bindings 'Trainer.max_steps = 100'")
                bindings.append(argv[i + 1])
                next(it)
        else:
            rest.append(arg)
    return rest, bindings


def _parser() -> argparse.ArgumentParser:
    import craftfn

    parser = argparse.ArgumentParser(
        prog="craftfn",
        description="Train and evaluate gin-configured models with craftfn.",
        epilog="Bindings: --gin.NAME=VALUE or --gin_bindings 'NAME = VALUE' (repeatable; later ones win).",
    )
    parser.add_argument("--version", action="version", version=f"craftfn {craftfn.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train a model (default job: char_gpt.gin)"), ("eval", "evaluate a trained run")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--gin_file", action="append", default=[],
            help="a gin file: a path or a shipped config's name, e.g. char_gpt.gin (repeatable; later files win)"
            + ("" if name == "train" else "; default: the run's own config.gin"),
        )
        p.add_argument("--run_dir", default=None, help="the run directory (default runs/<first gin file's name>)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint (automatic when one exists)")
        else:
            p.add_argument("--checkpoint", default=None, help="model weights (default RUN_DIR/model.safetensors)")
    gen = sub.add_parser("generate", help="generate text from a trained run (craftfn.generation)")
    gen.add_argument("--run_dir", required=True, help="the run directory of craftfn train")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--num_samples", type=int, default=1, help="samples (with beams: best hypotheses) to print")
    gen.add_argument("--max_new_tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top_k", type=int, default=0, help="0: off")
    gen.add_argument("--top_p", type=float, default=1.0, help="1: off")
    gen.add_argument("--num_beams", type=int, default=1, help="> 1: beam search")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", default=None, help="model weights (default RUN_DIR/model.safetensors)")
    gen.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    gen.add_argument("--steps_per_call", type=int, default=None,
                     help="decode steps per call with the KV cache (default 8; 1 compiles fastest, same text)")
    exp = sub.add_parser("export", help="export a trained run's model in another format (hf: a Hugging Face GPT-2 directory)")
    exp.add_argument("--format", required=True, choices=["hf"], help="hf: a directory AutoModelForCausalLM.from_pretrained loads (needs the hf extra)")
    exp.add_argument("run_dir", help="the run directory of craftfn train")
    exp.add_argument("out_dir", help="the directory to create (must not exist, or be empty)")
    exp.add_argument("--checkpoint", default=None, help="model weights (default RUN_DIR/model.safetensors)")
    sub.add_parser("configs", help="list the gin configs craftfn ships (pass a name to --gin_file)")
    return parser


def _find_gin_file(name: str) -> Path:
    from craftfn.gin_files import GinFileNotFoundError, find_config

    try:
        return find_config(name)
    except GinFileNotFoundError as e:
        raise UsageError(str(e)) from None


def _one_paragraph(message: str) -> str:
    # gin appends "In call to configurable 'x' (<function ...>)" to errors raised inside a
    # configurable: the cause is what comes before.
    lines = [ln.strip() for ln in str(message).splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith("In call to configurable"))


def _gin_error(e: BaseException) -> str:
    text = _one_paragraph(str(e))
    m = re.match(r"^(\S+?)/macro\.value set to `%gin\.REQUIRED` but not subsequently overridden", text)
    if m:
        macro = m.group(1)
        return (
            f"the gin macro {macro} is required but not set (it is declared `{macro} = %gin.REQUIRED`). "
            f"Set it on the command line, e.g. --gin.{macro}=path/to/input.txt, or with --gin_bindings \"{macro} = 'path/to/input.txt'\"."
        )
    m = re.search(r"Required bindings for `(\S+)` not provided in config: \[(.*?)\]", text)
    if m:
        names = [n.strip().strip("'\"") for n in m.group(2).split(",") if n.strip()]
        example = names[0] if len(names) == 1 else "<name>"
        return (
            f"gin: {m.group(1)} needs a value for {', '.join(names)} (a gin.REQUIRED parameter); "
            f"bind it in a gin file or with --gin.{m.group(1)}.{example}=VALUE."
        )
    if text.startswith("No configurable matching") or "doesn't have a parameter named" in text:
        return f"unknown gin binding: {text}{_suggestion(text)} Check the spelling; configurable names are listed in the shipped configs (craftfn configs) and in craftfn/gin_training.py."
    m = re.match(r"^No bindings specified for '(\S+?)/gin\.macro'", text)
    if m:
        return f"unknown gin macro %{m.group(1)}: it is used but never set{_suggestion(text)} Set it in a gin file or with --gin.{m.group(1)}=VALUE."
    return f"gin configuration error: {text}"


def _close(name: str, candidates: Sequence[str]) -> Optional[str]:
    import difflib

    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return close[0] if close else None


def _suggestion(text: str) -> str:
    """'; did you mean X?' for gin's unknown-name errors (a parameter, a configurable or a macro), else '.'."""
    import gin.config as gc

    guess = None
    m = re.search(r"Configurable '(\S+)' doesn't have a parameter named '(\S+)'", text)
    if m:
        try:
            fn = gc._REGISTRY.get_match(m.group(1)).wrapped  # gin's registry: no public accessor
            guess = _close(m.group(2), list(_parameters(fn)))
        except (KeyError, ValueError, TypeError, AttributeError):
            guess = None
    m = m or re.search(r"No configurable matching (?:reference )?'@?([\w.]+)", text)
    if guess is None and m and "matching" in m.group(0):
        names = [sel.split(".")[-1] for sel in _registered_selectors()]
        guess = _close(m.group(1).split(".")[-1], names)
    m2 = re.search(r"No bindings specified for '(\S+?)/gin\.macro'", text)
    if guess is None and m2:
        guess = _close(m2.group(1), _defined_macros())
    return f"; did you mean {guess!r}?" if guess else "."


def _registered_selectors() -> list[str]:
    import gin.config as gc

    try:
        return [selector for selector, _ in gc._REGISTRY.items()]  # gin's registry: no public accessor
    except AttributeError:  # pragma: no cover - another gin version
        return []


def _parameters(fn: object) -> dict[str, inspect.Parameter]:
    target = fn.__init__ if inspect.isclass(fn) else fn  # type: ignore[misc]
    return {n: p for n, p in inspect.signature(target).parameters.items() if n != "self"}


def _defined_macros() -> list[str]:
    import gin.config as gc

    return [scope for scope, selector in gc._CONFIG if selector == "gin.macro"]


def _macro_value(value: object, seen: tuple[str, ...] = ()) -> tuple[object, tuple[str, ...]]:
    """Follow ``%MACRO`` references to the literal they stand for; also return the macros passed."""
    import gin
    import gin.config as gc

    macro = gin.get_configurable(gc.macro)
    while isinstance(value, gc.ConfigurableReference) and value.configurable.wrapper == macro and value.evaluate:
        name = "/".join(value.scopes)
        if name in seen:
            break
        seen = (*seen, name)
        value = gc._CONFIG.get((name, "gin.macro"), {}).get("value")
    return value, seen


def _type_problem(value: object, annotation: object) -> Optional[str]:
    """What ``annotation`` wants when the literal ``value`` does not fit it (simple types only), else None."""
    import types
    import typing

    if annotation is typing.Any or isinstance(annotation, (str, typing.TypeVar)):
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        arms = typing.get_args(annotation)
        wants = [_type_problem(value, arm) for arm in arms]
        if any(w is None for w in wants):
            return None
        return " or ".join(w for w in wants if w)
    simple = {int: "an int", float: "a number", str: "a string", bool: "True or False", type(None): "None"}
    if annotation not in simple:
        return None  # callables, sequences, classes: the code checks those itself
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is type(None):
        ok = value is None
    else:
        ok = isinstance(value, annotation)  # type: ignore[arg-type]
    return None if ok else simple[annotation]  # type: ignore[index]


def _check_configuration(bindings: Sequence[str]) -> None:
    """After parsing, before finalizing: macros set on the command line that nothing uses, and
    bound values of the wrong type, are user errors; the optimizer learns the run's length."""
    import typing

    import gin
    import gin.config as gc

    config = gc._CONFIG  # gin keeps the parsed bindings here; it has no public structured view
    used = {"/".join(ref.scopes) for ref in gc.iterate_references(config, to=gin.get_configurable(gc.macro))}
    from craftfn.gin_files import _split_bindings

    for b in _split_bindings(bindings):
        name = b.selector  # a macro binding is an unscoped selector with no parameter; include/import have none
        if name and not b.arg_name and not b.scope and name not in used:
            guess = _close(name, sorted(used))
            hint = f"did you mean {guess}? " if guess else ""
            raise UsageError(
                f"the gin macro {name} set by `{b.text}` is not used by the configuration (nothing refers to "
                f"%{name}); {hint}macros it uses: {', '.join(sorted(used)) or 'none'}"
            )
    for (scope, selector), params in list(config.items()):
        if selector == "gin.macro":
            continue
        try:
            fn = gc._REGISTRY.get_match(selector).wrapped
            target = fn.__init__ if inspect.isclass(fn) else fn
            hints = typing.get_type_hints(target)
        except Exception:  # noqa: BLE001 - no usable annotations: nothing to check
            continue
        for param, raw in params.items():
            if param not in hints:
                continue
            value, via = _macro_value(raw)
            if isinstance(value, gc.ConfigurableReference) or not isinstance(value, (int, float, str, bool, type(None))):
                continue
            want = _type_problem(value, hints[param])
            if want is None:
                continue
            binding = f"{scope + '/' if scope else ''}{selector.split('.')[-1]}.{param}"
            through = f" (through the macro {' -> '.join(via)})" if via else ""
            fix = f"--gin.{via[-1]}=..." if via else f"--gin.{binding}=..."
            raise UsageError(
                f"gin binding {binding}{through} is the {type(value).__name__} {value!r}; it must be {want}. Fix it with {fix}"
            )
    _bind_run_length(config)


def _bind_run_length(config: dict) -> None:
    """Give create_optimizer the run's length (Trainer.max_steps), so its learning-rate schedule is
    checked over the whole run before step 1 (unless the configuration binds run_steps itself)."""
    import gin

    max_steps, _ = _macro_value(config.get(("", "craftfn.training.Trainer"), {}).get("max_steps"))
    optimizer = config.get(("", "craftfn.optim.create_optimizer"))
    if optimizer is not None and "run_steps" not in optimizer and isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0:
        gin.bind_parameter("craftfn.optim.create_optimizer.run_steps", max_steps)


def _configure(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    import gin

    # Importing these registers every configurable before parsing. Optimizers and schedules
    # come from craftfn.gin_config (a real import error inside it must surface).
    if importlib.util.find_spec("craftfn.gin_config") is not None:
        importlib.import_module("craftfn.gin_config")
    from craftfn import gin_training

    gin_training.ensure_optimizer_configurables()
    if not gin_files:
        raise UsageError("no --gin_file given: name a job, e.g. craftfn train --gin_file char_gpt.gin (craftfn configs lists the shipped ones)")
    paths = [_find_gin_file(f) for f in gin_files]
    gin.clear_config()
    from craftfn import gin_files as files

    try:
        files.parse_config(paths, list(bindings), finalize=False)
        _check_configuration(bindings)
        gin.finalize()
    except (ValueError, SyntaxError, OSError, TypeError, KeyError, AttributeError, ImportError) as e:
        raise UsageError(_gin_error(e)) from None


def _has_checkpoints(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and any(re.fullmatch(r"step_\d+", p.name) for p in ckpt.iterdir())


def _train(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    from craftfn import distributed

    # Under torchrun (WORLD_SIZE > 1) join the process group: data parallel training, the main
    # rank logs and writes. A no-op in one process.
    distributed.init()
    status = _train_configured(args, bindings)
    distributed.shutdown()  # not reached after an error: a failed group is not waited on
    return status


def _train_configured(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    from craftfn import distributed

    _configure(args.gin_file, bindings)
    from craftfn import gin_training

    run_dir = Path(args.run_dir or Path("runs") / Path(args.gin_file[0]).stem)
    # The main rank's files decide, so every rank resumes (or not) alike.
    has_checkpoints = distributed.broadcast_object(_has_checkpoints(run_dir) if distributed.is_main() else None)
    resume = bool(args.resume) or has_checkpoints
    if not distributed.is_main():
        pass
    elif resume and has_checkpoints:
        print(f"craftfn: resuming from the checkpoints in {run_dir / 'checkpoints'}", flush=True)
    elif args.resume:
        print(f"craftfn: --resume: no checkpoints in {run_dir / 'checkpoints'} yet, starting fresh", flush=True)
    try:
        summary = gin_training.train_language_model(str(run_dir), resume=resume)
    except gin_training.ConfigError as e:
        raise UsageError(_one_paragraph(str(e))) from None
    except (ValueError, TypeError, RuntimeError) as e:
        # gin reports missing REQUIRED parameters of a configurable (RuntimeError) when it is called.
        if "Required bindings" in str(e) or "gin.REQUIRED" in str(e):
            raise UsageError(_gin_error(e)) from None
        if isinstance(e, ValueError) and "In call to configurable" in str(e):
            # A configured value that the code rejected (craftfn's ValueErrors name the argument,
            # the value and what is allowed), e.g. warmup_steps longer than the schedule.
            raise UsageError(_one_paragraph(gin_training._clean_gin_message(e))) from None
        raise
    return 0 if summary.get("stop_reason") is None or "EarlyStopping" in str(summary.get("stop_reason")) else 1


def _run_config_files(args: argparse.Namespace) -> list[str]:
    """The gin files of ``craftfn eval``: those given, else the run's own operative config."""
    if args.gin_file:
        return list(args.gin_file)
    if not args.run_dir:
        raise UsageError("give --run_dir (its config.gin is replayed) or --gin_file, e.g. craftfn eval --run_dir runs/char_gpt")
    config = Path(args.run_dir) / "config.gin"
    if not config.is_file():
        raise UsageError(f"no --gin_file given and no config.gin in {args.run_dir!r}: train first (craftfn train --run_dir {args.run_dir}) or pass --gin_file")
    return [str(config)]


def _eval(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    args.gin_file = _run_config_files(args)
    _configure(args.gin_file, bindings)
    from craftfn import gin_training

    run_dir = Path(args.run_dir or Path("runs") / Path(args.gin_file[0]).stem)
    try:
        gin_training.evaluate_language_model(str(run_dir), checkpoint=args.checkpoint)
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(_one_paragraph(str(e))) from None
    except RuntimeError as e:
        if "Required bindings" in str(e):
            raise UsageError(_gin_error(e)) from None
        raise
    return 0


def _generate(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    if bindings:
        raise UsageError(f"generate takes no gin bindings, got {list(bindings)}")
    from craftfn.generation.run import generate_from_run_dir

    try:
        texts = generate_from_run_dir(
            args.run_dir, args.prompt, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
            seed=args.seed, checkpoint=args.checkpoint, compile=args.compile, steps_per_call=args.steps_per_call,
        )
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(_one_paragraph(str(e))) from None
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


def _interrupted(e: KeyboardInterrupt) -> int:
    """Exit status 130 (SIGINT) or 143 (SIGTERM); a trainer that stopped on the signal has saved the run."""
    code = getattr(e, "exit_code", None)  # craftfn.training.TrainingInterrupted
    if code is None:
        print("craftfn: interrupted", file=sys.stderr)
        return 130
    print(
        f"craftfn: {e}: the state after step {e.step} is in the run directory's checkpoints (unless "  # type: ignore[attr-defined]
        "train.save_checkpoints = False) and its weights in model.safetensors; run the same command again to resume",
        file=sys.stderr,
    )
    return int(code)


def _export(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    if bindings:
        raise UsageError(f"export takes no gin bindings, got {list(bindings)}")
    from craftfn.generation.run import load_model, load_run

    try:
        from craftfn.models.gpt import to_hf_gpt2

        # The run's tokenizer goes along when there is one (load_run checks it fits the weights).
        if (Path(args.run_dir) / "tokenizer.json").is_file():
            model, tokenizer = load_run(args.run_dir, args.checkpoint)
        else:
            model, tokenizer = load_model(args.run_dir, args.checkpoint), None
        hf_model = to_hf_gpt2(model)
    except ImportError as e:
        raise UsageError(f"--format hf needs transformers (pip install 'craftfn[hf]'): {e}") from None
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(_one_paragraph(str(e))) from None
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{str(out)!r} exists and is not an empty directory: export into a new directory")
    _save_pretrained_atomically(hf_model, out, tokenizer)
    print(f"craftfn: wrote a Hugging Face GPT-2 ({model.num_params():,} parameters){' and its tokenizer' if tokenizer else ''} "
          f"to {out}; load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
          + (" and AutoTokenizer.from_pretrained" if tokenizer else ""))
    return 0


def _save_pretrained_atomically(hf_model: object, out: Path, tokenizer: object = None) -> None:
    """``save_pretrained`` (model, and tokenizer if given) into a hidden sibling, then rename it to
    ``out``: no half-written directory."""
    import shutil
    import uuid

    from craftfn._files import fsync_path

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex}"
    tmp.mkdir()  # mode 0o777 less the umask, like any directory the user makes
    try:
        hf_model.save_pretrained(tmp)  # type: ignore[attr-defined]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        mask = os.umask(0)
        os.umask(mask)
        for f in tmp.iterdir():  # the safetensors writer makes its file 0600; the others follow the umask
            f.chmod(0o666 & ~mask)
            fsync_path(f)  # on disk before the rename makes them visible (as every craftfn writer does)
        fsync_path(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(out.parent)


def _configs(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    from craftfn.gin_files import list_configs, shipped_config_dir

    if bindings:
        raise UsageError(f"configs takes no gin bindings, got {list(bindings)}")
    configs = list_configs()
    if not configs:
        raise UsageError(f"no gin configs in {shipped_config_dir()}: this craftfn installation is incomplete; reinstall it")
    width = max(len(name) for name, _ in configs)
    print(f"gin configs shipped with craftfn (in {shipped_config_dir()}); pass a name to --gin_file:")
    for name, summary in configs:
        print(f"  {name:<{width}}  {summary}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (2 for user errors, with one paragraph on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, bindings = parse_gin_arguments(argv)
        args = _parser().parse_args(rest)
        if args.command == "train":
            return _train(args, bindings)
        if args.command == "generate":
            return _generate(args, bindings)
        if args.command == "export":
            return _export(args, bindings)
        if args.command == "configs":
            return _configs(args, bindings)
        return _eval(args, bindings)
    except UsageError as e:
        command = f"craftfn {argv[0]}" if argv and argv[0] in ("train", "eval", "generate", "export", "configs") else "craftfn"
        print(textwrap.fill(f"{command}: error: {e}", width=100, break_on_hyphens=False, break_long_words=False), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        return _interrupted(e)
    finally:
        # The config was parsed with finalize_config=True (locked); leave gin clean for a caller
        # that runs main() in-process and uses gin afterwards.
        if "gin" in sys.modules:
            sys.modules["gin"].clear_config()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
