"""Bad input, as a new user would give it, across the API and the CLI: every case must raise (or exit 2
with one paragraph) with an error that names what is wrong and what is allowed.

Each API case is ``(id, call, exception type, words)``: ``call()`` must raise exactly that type (or a
subclass) and its message must contain every word. CLI cases run ``craftfn.cli.main`` in-process (no
interpreter start-up); the ones that need exit codes of signals live in tests/training/test_interruption.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import torch

from craftfn import TrainState, make_eval_step, make_train_step, optim, schedules, tree
from craftfn.cli import main
from craftfn.generation import batch_generate, beam_search_generate, generate_text_sampling
from craftfn.generation.run import generate_from_run_dir
from craftfn.models import GPT, GPTConfig
from craftfn.models.gpt import lm_loss
from craftfn.optim.fused import fused_adam_step_
from craftfn.training import (
    Callback,
    CheckpointManager,
    CheckpointMismatchError,
    EarlyStopping,
    NanGuard,
    RunDirLock,
    RunDirLockedError,
    SampleText,
    Trainer,
    generate_tokens,
)

NAN, INF = float("nan"), float("inf")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_GIN = str(REPO / "gin" / "char_gpt.gin")
TEXT_GIN = str(REPO / "gin" / "text_file_gpt.gin")


class Case(NamedTuple):
    id: str
    call: Callable[[], Any]
    error: type
    words: tuple[str, ...]


def _params() -> dict[str, torch.Tensor]:
    return {"fc": {"weight": torch.ones(1, 4), "bias": torch.zeros(4)}}


def _grads(**leaves: torch.Tensor) -> dict[str, Any]:
    g = {"fc": {"weight": torch.ones(1, 4), "bias": torch.ones(4)}}
    g["fc"].update(leaves)
    return g


def _state(tx: Any = None) -> TrainState:
    return TrainState.create(apply_fn=lambda p, x: x @ p["fc"]["weight"].T, params=_params(), tx=tx or optim.sgd(0.1))


def _update(tx: Any, grads: Any, donate: bool = False) -> Any:
    return _state(tx).apply_gradients(grads, donate=donate)


def _tx_update(tx: Any, grads: Any) -> Any:
    params = _params()
    return tx.update(grads, tx.init(params), params)


def _mse(state: Any, params: Any, batch: Any, rng: Any) -> torch.Tensor:
    return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)


def _linear_state() -> TrainState:
    return TrainState.create(model=torch.nn.Linear(3, 1), tx=optim.sgd(0.1))


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    return {"x": torch.ones(n, 3), "y": torch.zeros(n, 1)}


def _step_with_aux(name: str) -> Any:
    step = make_train_step(lambda s, p, b, r: (_mse(s, p, b, r), {name: torch.tensor(1.0)}))
    return step(_linear_state(), _batch())


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8)).eval()


def _trainer(**kwargs: Any) -> Trainer:
    step = make_train_step(_mse)
    return Trainer(step, lambda i: _batch(), **{"max_steps": 2, **kwargs})


def _fit_with(callback: Any) -> Any:
    return _trainer(callbacks=[callback]).fit(_linear_state())


def _restore_mismatch(tmp: Path) -> Any:
    with CheckpointManager(tmp, async_save=False) as ckpt:
        ckpt.save(1, {"w": torch.ones(3)})
        return ckpt.restore({"w": torch.ones(4)})


def _locked_twice(tmp: Path) -> Any:
    with RunDirLock(tmp):
        RunDirLock(tmp).acquire()


def _fused(**overrides: Any) -> Any:
    lists = {"params": [torch.ones(3)], "grads": [torch.ones(3)], "mu": [torch.zeros(3)], "nu": [torch.zeros(3)]}
    lists.update(overrides)
    return fused_adam_step_(lists["params"], lists["grads"], lists["mu"], lists["nu"], None, torch.tensor(1), lr=0.1, b1=0.9, b2=0.999, eps=1e-8)


# ----------------------------------------------------------------------------- the API table

UPDATES = [
    Case("apply_updates transposed", lambda: optim.apply_updates(_params(), _grads(weight=torch.ones(4, 1))), ValueError, ("fc.weight", "(4, 1)", "(1, 4)")),
    Case("apply_updates_ transposed", lambda: optim.apply_updates_(_params(), _grads(weight=torch.ones(4, 1))), ValueError, ("fc.weight", "(4, 1)", "(1, 4)")),
    Case("apply_updates missing leaf", lambda: optim.apply_updates(_params(), {"fc": {"weight": torch.ones(1, 4)}}), ValueError, ("same tree structure", "missing", "fc.bias")),
    Case("apply_updates extra leaf", lambda: optim.apply_updates(_params(), {"fc": {**_grads()["fc"], "extra": torch.ones(1)}}), ValueError, ("unexpected", "fc.extra")),
    Case("apply_updates int dtype", lambda: optim.apply_updates(_params(), _grads(bias=torch.ones(4, dtype=torch.int64))), ValueError, ("fc.bias", "torch.int64", "floating dtype")),
    Case("apply_updates python float leaf", lambda: optim.apply_updates(_params(), _grads(bias=1.0)), ValueError, ("fc.bias", "type float", "tensor (4,)")),
    Case("apply_updates meta device", lambda: optim.apply_updates(_params(), _grads(bias=torch.ones(4, device="meta"))), ValueError, ("fc.bias", "device meta", "device cpu")),
    Case("sgd pure short grad", lambda: _update(optim.sgd(0.1), _grads(bias=torch.ones(3))), ValueError, ("grads", "fc.bias", "(3,)", "(4,)")),
    Case("sgd donated short grad", lambda: _update(optim.sgd(0.1), _grads(bias=torch.ones(3)), donate=True), ValueError, ("fc.bias", "(3,)", "(4,)")),
    Case("adamw pure short grad", lambda: _update(optim.adamw(0.1), _grads(bias=torch.ones(2))), ValueError, ("fc.bias", "(2,)", "(4,)")),
    Case("adamw donated (fused) short grad", lambda: _update(optim.adamw(0.1), _grads(bias=torch.ones(2)), donate=True), ValueError, ("fc.bias", "(2,)", "(4,)")),
    Case("adamw tx.update transposed", lambda: _tx_update(optim.adamw(0.1), _grads(weight=torch.ones(4, 1))), ValueError, ("adamw: updates", "fc.weight", "(4, 1)", "(1, 4)")),
    Case("chain tx.update transposed", lambda: _tx_update(optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1)), _grads(weight=torch.ones(4, 1))), ValueError, ("fc.weight", "(4, 1)", "(1, 4)")),
    Case("lion tx.update long grad", lambda: _tx_update(optim.lion(0.1), _grads(bias=torch.ones(5))), ValueError, ("fc.bias", "(5,)", "(4,)")),
    Case("adam moments from another model", lambda: optim.adam(0.1).donated_update(_grads(), optim.adam(0.1).init({"fc": {"weight": torch.ones(2, 2), "bias": torch.zeros(4)}}), _params()), ValueError, ("opt_state moments", "fc.weight", "(2, 2)", "(1, 4)")),
    Case("fused_adam_step_ short grad", lambda: _fused(grads=[torch.ones(2)]), ValueError, ("fused_adam_step_: grads", "(2,)", "(3,)")),
    Case("fused_adam_step_ short moment", lambda: _fused(nu=[torch.zeros(2)]), ValueError, ("fused_adam_step_: moments", "nu.0", "(2,)", "(3,)")),
    Case("fused_adam_step_ lengths", lambda: _fused(grads=[]), ValueError, ("same length", "1, 0")),
    Case("MultiSteps transposed", lambda: _tx_update(optim.MultiSteps(optim.sgd(0.1), 2), _grads(weight=torch.ones(4, 1))), ValueError, ("MultiSteps: updates", "fc.weight", "(4, 1)")),
    Case("lookahead transposed", lambda: _tx_update(optim.lookahead(optim.sgd(0.1), 2, 0.5), _grads(weight=torch.ones(4, 1))), ValueError, ("lookahead: updates", "fc.weight")),
    Case("check_match unknown dtype rule", lambda: tree.check_match(_params(), _params(), dtype="same"), ValueError, ("dtype must be one of", "floating")),
]

# Every rule and schedule rejects non-finite hyperparameters by name (and says they must be finite).
_NONFINITE = [
    ("sgd learning_rate nan", lambda: optim.sgd(NAN), "learning_rate"),
    ("sgd learning_rate inf", lambda: optim.sgd(INF), "learning_rate"),
    ("sgd momentum nan", lambda: optim.sgd(0.1, momentum=NAN), "momentum"),
    ("adam learning_rate -inf", lambda: optim.adam(-INF), "learning_rate"),
    ("adam b1 nan", lambda: optim.adam(0.1, b1=NAN), "b1"),
    ("adam b2 inf", lambda: optim.adam(0.1, b2=INF), "b2"),
    ("adam eps nan", lambda: optim.adam(0.1, eps=NAN), "eps"),
    ("adamw weight_decay inf", lambda: optim.adamw(0.1, weight_decay=INF), "weight_decay"),
    ("adamw weight_decay nan", lambda: optim.adamw(0.1, weight_decay=NAN), "weight_decay"),
    ("amsgrad b2 nan", lambda: optim.amsgrad(0.1, b2=NAN), "b2"),
    ("nadam momentum_decay nan", lambda: optim.nadam(0.1, momentum_decay=NAN), "momentum_decay"),
    ("radam threshold inf", lambda: optim.radam(0.1, threshold=INF), "threshold"),
    ("adamax eps inf", lambda: optim.adamax(0.1, eps=INF), "eps"),
    ("lion b1 nan", lambda: optim.lion(0.1, b1=NAN), "b1"),
    ("rmsprop decay nan", lambda: optim.rmsprop(0.1, decay=NAN), "decay"),
    ("adagrad eps nan", lambda: optim.adagrad(0.1, eps=NAN), "eps"),
    ("adadelta rho nan", lambda: optim.adadelta(0.1, rho=NAN), "rho"),
    ("adafactor clipping_threshold inf", lambda: optim.adafactor(0.1, clipping_threshold=INF), "clipping_threshold"),
    ("lamb weight_decay nan", lambda: optim.lamb(0.1, weight_decay=NAN), "weight_decay"),
    ("lars momentum nan", lambda: optim.lars(0.1, momentum=NAN), "momentum"),
    ("muon adam_b1 nan", lambda: optim.muon(0.1, adam_b1=NAN), "adam_b1"),
    ("schedule_free_adamw learning_rate nan", lambda: optim.schedule_free_adamw(NAN), "learning_rate"),
    ("scale step_size nan", lambda: optim.scale(NAN), "step_size"),
    ("trace decay inf", lambda: optim.trace(INF), "decay"),
    ("ema decay nan", lambda: optim.ema(NAN), "decay"),
    ("clip max_delta inf", lambda: optim.clip(INF), "max_delta"),
    ("clip_by_global_norm nan", lambda: optim.clip_by_global_norm(NAN), "max_norm"),
    ("add_decayed_weights nan", lambda: optim.add_decayed_weights(NAN), "weight_decay"),
    ("add_noise eta nan", lambda: optim.add_noise(NAN, 0.5, 0), "eta"),
    ("lookahead slow_step_size nan", lambda: optim.lookahead(optim.sgd(0.1), 2, NAN), "slow_step_size"),
    ("inject_hyperparams learning_rate nan", lambda: optim.inject_hyperparams(optim.adamw)(learning_rate=NAN), "learning_rate"),
    ("create_optimizer learning_rate nan", lambda: optim.create_optimizer("adamw", learning_rate=NAN), "learning_rate"),
    ("create_optimizer clip_norm inf", lambda: optim.create_optimizer("adamw", learning_rate=0.1, clip_norm=INF), "clip_norm"),
    ("create_optimizer b1 nan", lambda: optim.create_optimizer("adamw", learning_rate=0.1, b1=NAN), "b1"),
    ("check_hyperparameter nan", lambda: optim.check_hyperparameter("my_rate", NAN), "my_rate"),
]
HYPERPARAMETERS = [Case(i, f, ValueError, (name, "finite")) for i, f, name in _NONFINITE]
HYPERPARAMETERS += [
    Case("schedule constant nan", lambda: schedules.constant(NAN), ValueError, ("value", "finite")),
    Case("schedule cosine_decay inf", lambda: schedules.cosine_decay(INF, 100), ValueError, ("init_value", "finite")),
    Case("create_scheduler learning_rate nan", lambda: schedules.create_scheduler("cosine_annealing", learning_rate=NAN, T_max=10), ValueError, ("learning_rate", "finite")),
    Case("sgd negative learning_rate", lambda: optim.sgd(-0.1), ValueError, ("learning_rate", ">= 0.0", "-0.1")),
    Case("adam b1 = 1", lambda: optim.adam(0.1, b1=1.0), ValueError, ("b1", "< 1.0")),
    Case("sgd learning_rate string", lambda: optim.sgd("0.1"), TypeError, ("learning_rate", "a number", "'0.1'")),
    Case("create_optimizer unknown name", lambda: optim.create_optimizer("adamww", learning_rate=0.1), ValueError, ("unknown optimizer name", "did you mean 'adamw'", "Known names")),
    Case("create_optimizer unknown argument", lambda: optim.create_optimizer("adamw", learning_rate=0.1, beta1=0.9), TypeError, ("unexpected argument 'beta1'", "adamw takes", "'b1'")),
]

SCHEDULES = [
    Case("check_schedule negative", lambda: schedules.check_schedule(schedules.linear(1e-3, -1e-3, 100), 100), ValueError, ("negative at step 51", "100-step run", ">= 0")),
    Case("check_schedule not finite", lambda: schedules.check_schedule(lambda s: 1.0 / (10 - s), 20), ValueError, ("not finite at step 10", "finite")),
    Case("check_schedule int-only nan", lambda: schedules.check_schedule(lambda s: NAN if s >= 3 else 0.1, 5, "weight_decay"), ValueError, ("weight_decay schedule", "step 3")),
    Case("check_schedule run_steps 0", lambda: schedules.check_schedule(schedules.constant(0.1), 0), ValueError, ("run_steps", ">= 1", "0")),
    Case("check_schedule not callable", lambda: schedules.check_schedule(0.1, 10), TypeError, ("schedule must be callable",)),
    Case("create_scheduler run_steps negative", lambda: schedules.create_scheduler("linear", init_value=1.0, end_value=-1.0, transition_steps=10, run_steps=20), ValueError, ("create_scheduler('linear')", "negative at step 6", ">= 0")),
    Case("create_optimizer run_steps negative", lambda: optim.create_optimizer("sgd", learning_rate=schedules.linear(0.1, -0.1, 10), run_steps=10), ValueError, ("learning_rate schedule", "negative at step 6")),
    Case("create_optimizer run_steps nan", lambda: optim.create_optimizer("adamw", learning_rate=lambda n: 0.1 / (5 - n), run_steps=10), ValueError, ("learning_rate schedule", "not finite at step 5")),
    Case("warmup longer than decay", lambda: schedules.warmup_cosine_decay(0.0, 1.0, warmup_steps=100, decay_steps=60), ValueError, ("warmup_steps=100", "decay_steps=60")),
    Case("create_scheduler unknown", lambda: schedules.create_scheduler("cosine_anealing", learning_rate=0.1, T_max=3), ValueError, ("unknown schedule name", "did you mean 'cosine_annealing'")),
]

STEPS = [
    Case("empty batch", lambda: make_train_step(_mse)(_linear_state(), _batch(0)), ValueError, ("batch is empty", "at least one example")),
    Case("eval step empty batch", lambda: make_eval_step(_mse)(_linear_state(), _batch(0)), ValueError, ("batch is empty",)),
    Case("aux named loss", lambda: _step_with_aux("loss"), ValueError, ("reserved metric name", "'loss'", "rename")),
    Case("aux named grad_norm", lambda: _step_with_aux("grad_norm"), ValueError, ("reserved metric name", "'grad_norm'")),
    Case("aux named lr", lambda: _step_with_aux("lr"), ValueError, ("reserved metric name", "'lr'")),
    Case("batch leaves disagree", lambda: make_train_step(_mse)(_linear_state(), {"x": torch.ones(4, 3), "y": torch.zeros(3, 1)}), ValueError, ("disagree in leading (batch) size", "'x': 4", "'y': 3")),
    Case("batch 0-d leaf", lambda: make_train_step(_mse)(_linear_state(), {"x": torch.ones(4, 3), "y": torch.tensor(0.0)}), ValueError, ("'y'", "0-d", "leading batch dimension")),
    Case("accum_steps 0", lambda: make_train_step(_mse, accum_steps=0), ValueError, ("accum_steps", "positive int", "0")),
    Case("accum_steps does not divide", lambda: make_train_step(_mse, accum_steps=3)(_linear_state(), _batch(4)), ValueError, ("accum_steps=3", "batch size 4", "multiple of 3")),
    Case("loss not scalar", lambda: make_train_step(lambda s, p, b, r: (s.apply(p, b["x"]) - b["y"]) ** 2)(_linear_state(), _batch()), ValueError, ("scalar", "shape (4, 1)", "loss.mean()")),
    Case("loss not a tensor", lambda: make_train_step(lambda s, p, b, r: 1.0)(_linear_state(), _batch()), TypeError, ("0-d tensor", "float")),
    Case("state without tx", lambda: make_train_step(_mse)(_linear_state().replace(tx=None), _batch()), ValueError, ("no tx", "optim.sgd")),
    Case("loss_fn not callable", lambda: make_train_step("mse"), TypeError, ("loss_fn must be callable", "str")),
    Case("policy unknown", lambda: make_train_step(_mse, policy="fp12"), ValueError, ("fp12",)),
    Case("apply_gradients on no tx", lambda: _linear_state().replace(tx=None).apply_gradients({}), ValueError, ("no tx", "TrainState.create")),
    Case("TrainState tx not a transformation", lambda: TrainState.create(model=torch.nn.Linear(2, 1), tx="adamw"), TypeError, ("tx must be a craftfn.optim.GradientTransformation", "str")),
]

TRAINING = [
    Case("Trainer max_steps 0", lambda: _trainer(max_steps=0), ValueError, ("max_steps", "positive int", "0")),
    Case("Trainer log_every None", lambda: _trainer(log_every=None), ValueError, ("log_every", "positive int")),
    Case("Trainer no limit", lambda: Trainer(make_train_step(_mse), lambda i: _batch()), ValueError, ("max_steps=", "epochs=")),
    Case("Trainer data not callable", lambda: Trainer(make_train_step(_mse), 5, max_steps=1), TypeError, ("train_data", "step -> batch", "int")),
    Case("Trainer warmup_steps -1", lambda: _trainer(warmup_steps=-1), ValueError, ("warmup_steps", ">= 0", "-1")),
    Case("SampleText prompt not encodable", lambda: _fit_with(SampleText(lambda s: [{"a": 1}[c] for c in s], str, prompt="z")), ValueError, ("sample prompt 'z'", "cannot be encoded", "''")),
    Case("SampleText negative temperature", lambda: SampleText(list, str, temperature=-1.0), ValueError, ("temperature", "finite number >= 0", "-1.0")),
    Case("SampleText nan temperature", lambda: SampleText(list, str, temperature=NAN), ValueError, ("temperature", "finite")),
    Case("SampleText top_k 0", lambda: SampleText(list, str, top_k=0), ValueError, ("top_k", "positive int or None", "0")),
    Case("SampleText prompt not a str", lambda: SampleText(list, str, prompt=[1, 2]), TypeError, ("prompt must be a str", "list")),
    Case("SampleText max_new_tokens -1", lambda: SampleText(list, str, max_new_tokens=-1), ValueError, ("max_new_tokens", ">= 0", "-1")),
    Case("generate_tokens float prompt", lambda: generate_tokens(_linear_state(), torch.ones(1, 3), 2), ValueError, ("prompt must be integer token ids", "float32")),
    Case("NanGuard action", lambda: NanGuard(action="ignore"), ValueError, ("action", "'stop' or 'skip'", "'ignore'")),
    Case("EarlyStopping monitor", lambda: EarlyStopping(monitor="loss"), ValueError, ("monitor", "'eval/<metric>'", "'loss'")),
    Case("Callback every -1", lambda: Callback(every=-1), ValueError, ("every", ">= 0", "-1")),
    Case("run dir locked", lambda: _locked_twice(Path(pytest.tmp_path_for_cases) / "locked"), RunDirLockedError, ("in use by another craftfn trainer", "pid", "--run_dir")),
]

CHECKPOINTS = [
    Case("restore shape mismatch", lambda: _restore_mismatch(Path(pytest.tmp_path_for_cases) / "ckpt"), CheckpointMismatchError, ("w: checkpoint shape (3,), template shape (4,)",)),
    Case("CheckpointManager keep_last 0", lambda: CheckpointManager(Path(pytest.tmp_path_for_cases) / "k", keep_last=0), ValueError, ("keep_last", "int >= 1", "None")),
    Case("CheckpointManager mode", lambda: CheckpointManager(Path(pytest.tmp_path_for_cases) / "m", mode="best"), ValueError, ("mode", "'min' or 'max'", "'best'")),
    Case("CheckpointManager keep_best without metric", lambda: CheckpointManager(Path(pytest.tmp_path_for_cases) / "b", keep_best=1), ValueError, ("keep_best=1", "best_metric")),
    Case("save negative step", lambda: CheckpointManager(Path(pytest.tmp_path_for_cases) / "s", async_save=False).save(-1, {"w": torch.ones(1)}), ValueError, ("step", "non-negative int", "-1")),
]

_IDS = torch.tensor([[1, 2, 3]])
GENERATION = [
    Case("GPT forward id out of vocab", lambda: _gpt()(torch.tensor([[1, 12]])), ValueError, ("token ids from 1 to 12", "[0, 11)", "vocab_size")),
    Case("train step id out of vocab", lambda: make_train_step(lm_loss)(TrainState.create(model=_gpt(), tx=optim.sgd(0.1)), {"input_ids": torch.tensor([[3, 40]]), "labels": torch.tensor([[4, 5]])}), ValueError, ("token ids from 3 to 40", "[0, 11)")),
    Case("sampling id out of vocab", lambda: generate_text_sampling(_gpt(), torch.tensor([[1, 11]]), max_new_tokens=2), ValueError, ("prompt_ids", "token id 11", "[0, 11)")),
    Case("sampling negative id", lambda: generate_text_sampling(_gpt(), torch.tensor([[-1, 2]]), max_new_tokens=2), ValueError, ("prompt_ids", "token id -1", "[0, 11)")),
    Case("beam id out of vocab", lambda: beam_search_generate(_gpt(), torch.tensor([[50]]), num_beams=2, max_new_tokens=2), ValueError, ("token id 50", "[0, 11)")),
    Case("mask values 2", lambda: generate_text_sampling(_gpt(), _IDS, max_new_tokens=2, attention_mask=torch.tensor([[0, 2, 1]])), ValueError, ("attention_mask", "only 0 (padding) and 1 (token)", "2")),
    Case("mask all zero", lambda: generate_text_sampling(_gpt(), _IDS, max_new_tokens=2, attention_mask=torch.zeros(1, 3, dtype=torch.long)), ValueError, ("attention_mask rows [0]", "all 0", "at least one token")),
    Case("mask right padded", lambda: generate_text_sampling(_gpt(), _IDS, max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 0]])), ValueError, ("right padding", "pad on the left", "zeros first")),
    Case("beam mask right padded", lambda: beam_search_generate(_gpt(), _IDS, num_beams=2, max_new_tokens=2, attention_mask=torch.tensor([[1, 0, 1]])), ValueError, ("right padding", "pad on the left")),
    Case("mask wrong shape", lambda: generate_text_sampling(_gpt(), _IDS, max_new_tokens=2, attention_mask=torch.ones(1, 2)), ValueError, ("attention_mask", "(1, 3)", "(1, 2)")),
    Case("beam num_beams 0", lambda: beam_search_generate(_gpt(), _IDS, num_beams=0, max_new_tokens=2), ValueError, ("num_beams", "positive int", "0")),
    Case("batch_generate num_beams 0", lambda: batch_generate(_gpt(), [[1, 2]], max_new_tokens=2, num_beams=0), ValueError, ("num_beams", "positive int", "0")),
    Case("batch_generate num_beams -2", lambda: batch_generate(_gpt(), [[1, 2]], max_new_tokens=2, num_beams=-2), ValueError, ("num_beams", "positive int", "-2")),
    Case("sampling negative temperature", lambda: generate_text_sampling(_gpt(), _IDS, max_new_tokens=2, temperature=-0.5), ValueError, ("temperature", ">= 0", "-0.5")),
    Case("sampling top_p 0", lambda: generate_text_sampling(_gpt(), _IDS, max_new_tokens=2, top_p=0.0), ValueError, ("top_p", "(0, 1]", "0.0")),
    Case("sampling float prompt", lambda: generate_text_sampling(_gpt(), torch.ones(1, 3), max_new_tokens=2), ValueError, ("prompt_ids", "int64", "float32")),
    Case("sampling prompt too long", lambda: generate_text_sampling(_gpt(), torch.ones(1, 17, dtype=torch.long), max_new_tokens=0), ValueError, ("17 tokens", "context of 16")),
    Case("run dir num_beams 0", lambda: generate_from_run_dir("no/such/run", "a", num_beams=0), ValueError, ("num_beams", "int >= 1", "0")),
    Case("run dir num_samples 0", lambda: generate_from_run_dir("no/such/run", "a", num_samples=0), ValueError, ("num_samples", "int >= 1", "0")),
    Case("run dir empty prompt", lambda: generate_from_run_dir("no/such/run", ""), ValueError, ("prompt must be a non-empty string",)),
    Case("run dir missing", lambda: generate_from_run_dir("no/such/run", "a"), ValueError, ("no/such/run", "not a directory", "craftfn train")),
]

API_CASES = UPDATES + HYPERPARAMETERS + SCHEDULES + STEPS + TRAINING + CHECKPOINTS + GENERATION


@pytest.fixture(autouse=True)
def _case_dir(tmp_path):
    # Cases are built at import time; the ones that write files look up this test's folder.
    pytest.tmp_path_for_cases = tmp_path
    yield
    del pytest.tmp_path_for_cases


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_bad_api_input_is_named(case):
    with pytest.raises(case.error) as info:
        case.call()
    message = str(info.value)
    for word in case.words:
        assert word in message, f"{word!r} not in: {message}"


def _float_hyperparameters(module: Any) -> list[tuple[str, Callable[..., Any], dict[str, Any], str]]:
    """(builder name, builder, minimal arguments, parameter) for every float parameter of every public
    builder of ``module`` that can be built from a learning rate alone (new optimizers join by themselves)."""
    import inspect

    found = []
    for name in sorted(module.__all__):
        fn = getattr(module, name)
        if not inspect.isfunction(fn) or name.startswith("check_"):
            continue
        params = inspect.signature(fn).parameters.values()
        required = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind is not p.KEYWORD_ONLY]
        if any(r != "learning_rate" for r in required):
            continue
        base = {r: 0.1 for r in required}
        try:
            fn(**base)
        except Exception:  # noqa: BLE001 - not a hyperparameter builder (needs more than a learning rate)
            continue
        found += [(name, fn, base, p) for p in [*required, *(p.name for p in params if type(p.default) is float)]]
    return found


def test_every_optimizer_rejects_non_finite_hyperparameters_by_name():
    # optim and optim.contrib, the ones added later included: NaN in any float hyperparameter raises
    # at construction, naming that parameter (never a parameter of an inner rule).
    cases = _float_hyperparameters(optim) + _float_hyperparameters(optim.contrib)
    assert len(cases) > 300  # the sweep found the builders (330 parameters today)
    accepted = []
    for name, fn, base, param in cases:
        try:
            fn(**{**base, param: NAN})
        except (ValueError, TypeError) as e:
            if param not in str(e):
                accepted.append(f"{name}({param}=nan): {e}")
        else:
            accepted.append(f"{name}({param}=nan) was accepted")
    assert not accepted, "\n".join(accepted)


def test_a_rejected_update_leaves_the_parameters_alone():
    # The check runs before any kernel, donated paths included: nothing was half-updated.
    for tx in (optim.sgd(0.1), optim.adamw(0.1), optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.1, weight_decay=0.1))):
        for donate in (False, True):
            state = _state(tx)
            before = tree.clone(state.params), tree.clone(state.opt_state)
            with pytest.raises(ValueError, match="fc.bias"):
                state.apply_gradients(_grads(bias=torch.ones(3)), donate=donate)
            assert tree.equal(state.params, before[0]) and tree.equal(state.opt_state, before[1])


# ----------------------------------------------------------------------------- the CLI table

TINY = [
    "--gin.MAX_STEPS=2", "--gin.warmup_cosine_decay.warmup_steps=1", "--gin.Trainer.eval_every=2",
    "--gin.Trainer.save_every=2", "--gin.GPTConfig.n_layer=1", "--gin.GPTConfig.n_head=2", "--gin.GPTConfig.n_embd=8",
    "--gin.BLOCK_SIZE=8", "--gin.lm_task.batch_size=4", "--gin.lm_task.eval_windows=8",
    "--gin.stdlib_corpus.max_bytes=5000", "--gin.train.sample_tokens=4", "--gin.train.num_threads=1",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny run (2 steps) for the eval and generate cases."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run), *TINY]) == 0
    damaged = run.parent / "damaged.safetensors"
    damaged.write_bytes((run / "model.safetensors").read_bytes()[:100])
    return run


def _train(*args: str) -> list[str]:
    return ["train", "--gin_file", DEFAULT_GIN, "--run_dir", "{tmp}/run", *args]


CLI_CASES = [
    ("misspelled macro", _train("--gin.MAX_STEP=5"), ("gin macro MAX_STEP", "not used", "did you mean MAX_STEPS")),
    ("misspelled macro in bindings", _train("--gin_bindings", "BLOCK_SIZ = 8"), ("gin macro BLOCK_SIZ", "did you mean BLOCK_SIZE")),
    ("undefined macro reference", _train("--gin_bindings", "Trainer.max_steps = %MAX_STEP"), ("unknown gin macro %MAX_STEP", "did you mean 'MAX_STEPS'")),
    ("string for an int macro", _train("--gin.MAX_STEPS=abc"), ("through the macro MAX_STEPS", "str 'abc'", "must be an int", "--gin.MAX_STEPS=")),
    ("float for an int", _train("--gin.GPTConfig.n_layer=2.5"), ("GPTConfig.n_layer", "float 2.5", "must be an int")),
    ("int for a bool", _train("--gin.train.donate=1"), ("train.donate", "int 1", "True or False")),
    ("int for a str", _train("--gin.lm_task.tokenizer=7"), ("lm_task.tokenizer", "int 7", "a string")),
    ("string for a float", _train("--gin.GPTConfig.dropout=high"), ("GPTConfig.dropout", "str 'high'", "a number")),
    ("string for optional int", _train("--gin.Trainer.eval_every=often"), ("Trainer.eval_every", "str 'often'", "an int or None")),
    ("misspelled parameter", _train("--gin.Trainer.max_stepz=3"), ("unknown gin binding", "max_stepz", "did you mean 'max_steps'")),
    ("misspelled configurable", _train("--gin.Trainr.max_steps=3"), ("unknown gin binding", "Trainr", "did you mean 'Trainer'")),
    ("misspelled reference", _train("--gin_bindings", "train.optimizer = @create_optimzer()"), ("unknown gin binding", "create_optimzer", "did you mean 'create_optimizer'")),
    ("negative schedule over the run", _train("--gin.warmup_cosine_decay.end_value=-0.01"), ("learning_rate schedule is negative at step", "2000-step run", ">= 0")),
    ("nan learning rate", _train("--gin_bindings", "warmup_cosine_decay.peak_value = 1e999"), ("peak_value", "finite")),
    ("unknown optimizer", _train("--gin.create_optimizer.name=adamww"), ("unknown optimizer name 'adamww'", "did you mean 'adamw'")),
    ("bad sample prompt", ["train", "--gin_file", TEXT_GIN, "--gin.DATA_PATH={tmp}/data.txt", "--gin.train.sample_prompt=zzz", "--run_dir", "{tmp}/run", *TINY], ("sample prompt 'zzz'", "cannot be encoded", "''")),
    ("missing data file", ["train", "--gin_file", TEXT_GIN, "--gin.DATA_PATH={tmp}/nope.txt", "--run_dir", "{tmp}/run"], ("nope.txt", "does not exist")),
    ("required macro unset", ["train", "--gin_file", TEXT_GIN, "--run_dir", "{tmp}/run"], ("DATA_PATH", "required", "--gin.DATA_PATH=")),
    ("no gin file", ["train", "--run_dir", "{tmp}/run"], ("no --gin_file given", "--gin_file char_gpt.gin")),
    ("gin file not found", ["train", "--gin_file", "no/such.gin"], ("no/such.gin", "not found")),
    ("empty binding name", ["train", "--gin_file", DEFAULT_GIN, "--gin.=3"], ("names no binding", "--gin.NAME=VALUE")),
    ("binding without value", ["train", "--gin_file", DEFAULT_GIN, "--gin.MAX_STEPS"], ("needs a value", "--gin.MAX_STEPS=VALUE")),
    ("warmup longer than the run", _train("--gin.MAX_STEPS=60", "--gin.WARMUP_STEPS=100"), ("warmup_steps=100", "decay_steps=60")),
    ("eval without weights", ["eval", "--gin_file", DEFAULT_GIN, "--run_dir", "{tmp}/nothing", *TINY], ("no model weights", "craftfn train")),
    ("eval damaged weights", ["eval", "--gin_file", DEFAULT_GIN, "--run_dir", "{run}", "--checkpoint", "{run}/../damaged.safetensors", *TINY], ("cannot read the weights", "damaged.safetensors")),
    ("eval weights of another model", ["eval", "--gin_file", DEFAULT_GIN, "--run_dir", "{run}", *TINY, "--gin.GPTConfig.n_layer=2"], ("do not fit the model", "missing keys", "transformer.h.1")),
    ("eval misspelled macro", ["eval", "--gin_file", DEFAULT_GIN, "--run_dir", "{run}", *TINY, "--gin.MAX_STEPZ=3"], ("gin macro MAX_STEPZ", "did you mean MAX_STEPS")),
    ("generate num_beams 0", ["generate", "--run_dir", "{run}", "--prompt", "def", "--num_beams", "0"], ("num_beams", "int >= 1", "0")),
    ("generate num_samples 0", ["generate", "--run_dir", "{run}", "--prompt", "def", "--num_samples", "0"], ("num_samples", "int >= 1", "0")),
    ("generate negative max_new_tokens", ["generate", "--run_dir", "{run}", "--prompt", "def", "--max_new_tokens", "-3"], ("max_new_tokens", "int >= 0", "-3")),
    ("generate negative temperature", ["generate", "--run_dir", "{run}", "--prompt", "def", "--temperature", "-1"], ("temperature", ">= 0")),
    ("generate top_p 2", ["generate", "--run_dir", "{run}", "--prompt", "def", "--top_p", "2"], ("top_p", "(0, 1]")),
    ("generate unknown characters", ["generate", "--run_dir", "{run}", "--prompt", "\u00e9\u00e9"], ("'\u00e9'", "not in this CharTokenizer's vocabulary")),
    ("generate missing run dir", ["generate", "--run_dir", "{tmp}/nothing", "--prompt", "a"], ("not a directory", "craftfn train")),
    ("generate damaged weights", ["generate", "--run_dir", "{run}", "--prompt", "def", "--checkpoint", "{run}/../damaged.safetensors"], ("cannot read the weights", "damaged.safetensors")),
    ("generate with bindings", ["generate", "--run_dir", "{run}", "--prompt", "a", "--gin.MAX_STEPS=3"], ("generate takes no gin bindings",)),
]


@pytest.mark.parametrize("case_id, argv, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_is_one_paragraph_exit_2(case_id, argv, words, trained_run, tmp_path, capsys):
    (tmp_path / "data.txt").write_text("abc abc abc " * 200)
    status = main([a.format(tmp=tmp_path, run=trained_run) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    # A progress bar (tqdm redraws its line with \r, on stderr) may precede the error paragraph.
    text = err.rsplit("\r", 1)[-1].strip()
    assert "Traceback" not in err and text.startswith("craftfn") and "error:" in text
    assert "\n\n" not in text and len(text.splitlines()) <= 8, text
    flat = " ".join(text.split())
    for word in words:
        assert word in flat, f"{word!r} not in: {flat}"
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))  # rejected before step 1


def test_the_table_is_large():
    # The issue asks for at least 120 bad inputs across the API and the CLI.
    assert len(API_CASES) + len(CLI_CASES) >= 120, len(API_CASES) + len(CLI_CASES)
    assert len({c.id for c in API_CASES}) == len(API_CASES) and len({c[0] for c in CLI_CASES}) == len(CLI_CASES)
