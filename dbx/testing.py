"""Contract checks for plugin authors: run them in your own pytest.

Each ``check_*`` function exercises one kind of plugin the way dbx's training loop does and
raises ``ContractError`` listing *every* violation it found (not just the first), each with what
was expected and how to fix it::

    from dbx.testing import check_policy
    from my_package.policy import MyRule

    def test_myrule_keeps_the_dbx_contract():
        check_policy(MyRule, dataset_size=50_000, params={"max": 4096}, bounds=(1, 4096))

dbx runs the same checks on every registered built-in (``tests/test_contracts.py``). The helpers
``epoch_state``, ``diversity_estimate`` and ``simulate_policy`` build the inputs the loop passes,
for unit tests of a rule's arithmetic. ``check_policy`` imports nothing heavy; the others import
torch.

Public API (see ``dbx.protocols``): ``ContractError``, ``check_policy``, ``check_estimator``,
``check_model``, ``check_dataset``, ``epoch_state``, ``diversity_estimate``, ``simulate_policy``.
"""
from __future__ import annotations

import inspect
import math
import random
import typing
from typing import Any, Callable

from dbx.errors import UserError
from dbx.plugin_state import decode_state, encode_state, state_differences
from dbx.protocols import BatchSizePolicy, DataSplits, DiversityEstimate, DiversityEstimator, EpochState
from dbx.registry import INJECTED as _INJECTED
from dbx.registry import signature_problems, type_error

__all__ = [
    "ContractError",
    "check_policy",
    "check_estimator",
    "check_model",
    "check_dataset",
    "epoch_state",
    "diversity_estimate",
    "simulate_policy",
]



class ContractError(AssertionError):
    """A plugin breaks the dbx contract. ``problems`` lists each violation found."""

    def __init__(self, subject: str, problems: list[str]) -> None:
        self.subject = subject
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{subject} breaks the dbx plugin contract ({len(self.problems)} problem(s)):\n{lines}")


# --------------------------------------------------------------------------------------------------
# Inputs, as the training loop builds them
# --------------------------------------------------------------------------------------------------

def epoch_state(epoch: int = 1, batch_size: int = 128, *, dataset_size: int = 50_000, epochs: int = 100,
                lr: float = 0.1, train_loss: float = 1.0, test_loss: float = 1.0,
                train_accuracy: float | None = None, test_accuracy: float | None = None,
                step: int | None = None, samples_seen: int | None = None) -> EpochState:
    """The ``EpochState`` after epoch ``epoch`` trained with ``batch_size``.

    ``step`` and ``samples_seen`` default to what a run at this batch size from the start would
    have reached.
    """
    steps_per_epoch = math.ceil(dataset_size / batch_size)
    return EpochState(
        epoch=epoch, epochs=epochs, batch_size=batch_size, lr=lr, dataset_size=dataset_size,
        step=epoch * steps_per_epoch if step is None else step,
        samples_seen=epoch * dataset_size if samples_seen is None else samples_seen,
        train_loss=train_loss, test_loss=test_loss, train_accuracy=train_accuracy, test_accuracy=test_accuracy)


def diversity_estimate(noise_scale: float | None = None, *, samples: int = 50_000, value: float | None = None,
                       gradient_sq_norm: float = 1.0) -> DiversityEstimate:
    """A ``DiversityEstimate`` whose sums are the expected ones for a given noise scale.

    With true gradient G (``||G||^2 = gradient_sq_norm``) and per-sample covariance Sigma with
    ``tr(Sigma) = noise_scale * ||G||^2`` (so B_simple = ``noise_scale``), over m = ``samples``
    per-sample gradients: ``S1 = m (||G||^2 + tr Sigma)``, ``||S2||^2 = m^2 ||G||^2 + m tr Sigma``
    and ``value = S1 / ||S2||^2``, about ``(1 + noise_scale) / m``.

    Pass ``value`` instead (e.g. ``math.inf`` or ``math.nan``) for an estimate without sums, as an
    estimator that does not report them would give.
    """
    if (noise_scale is None) == (value is None):
        raise ValueError("give exactly one of noise_scale and value")
    if value is not None:
        return DiversityEstimate(value=float(value), samples=samples)
    m, g = samples, gradient_sq_norm
    trace = noise_scale * g
    s1 = m * (g + trace)
    q = m * m * g + m * trace
    return DiversityEstimate(value=s1 / q if q > 0 else math.inf, samples=m, sum_sq_norms=s1, sq_norm_of_sum=q)


def simulate_policy(policy: Any, *, epochs: int, dataset_size: int,
                    estimates: Callable[[int], DiversityEstimate | None] = lambda epoch: None,
                    start: int | None = None, first_epoch: int = 1) -> list[int]:
    """Drive ``policy`` as the training loop does; return the batch size used in each epoch.

    ``estimates(epoch)`` gives the estimate of a measured epoch (asked only when the policy uses
    diversity and ``measures_in(epoch)`` is true). ``start`` is the batch size of the first
    simulated epoch (default ``policy.initial_batch_size()``); ``first_epoch`` lets a simulation
    continue where another stopped (after ``load_state_dict``).
    """
    last = first_epoch + epochs - 1
    batch = policy.initial_batch_size() if start is None else start
    used = []
    for epoch in range(first_epoch, last + 1):
        used.append(batch)
        measured = estimates(epoch) if policy.uses_diversity and policy.measures_in(epoch) else None
        batch = policy.next_batch_size(epoch_state(epoch, batch, dataset_size=dataset_size, epochs=last), measured)
    return used


# --------------------------------------------------------------------------------------------------
# The parameter schema (the factory's keyword-only signature)
# --------------------------------------------------------------------------------------------------

def _require_protocol(obj: Any, name: str, protocol: type, methods: tuple[str, ...], subject: str,
                      problems: list[str]) -> None:
    """Stop with every problem so far if ``obj`` lacks one of the protocol's ``methods``; note it if
    ``isinstance(obj, protocol)`` is false anyway (an attribute the protocol also names)."""
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        problems.append(f"missing method(s) {', '.join(missing)} of dbx.protocols.{protocol.__name__}")
        raise ContractError(subject, problems)
    if not isinstance(obj, protocol):
        problems.append(f"isinstance({name}, dbx.protocols.{protocol.__name__}) is false")


def _schema_problems(kind: str, factory: Any, params: dict[str, Any]) -> list[str]:
    """What keeps ``factory``'s signature from serving as dbx's parameter schema, and bad ``params``."""
    problems = signature_problems(kind, factory)
    try:
        signature = inspect.signature(factory)
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # noqa: BLE001 - signature_problems said why
        return problems
    injected = _INJECTED[kind]
    schema = {p.name for p in signature.parameters.values()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in injected}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in params.items():
        if key in injected:
            problems.append(f"params sets {key!r}, which dbx injects itself; a spec cannot set it")
        elif key not in schema and not takes_any:
            problems.append(f"params sets {key!r}, which the signature does not accept")
        elif key in hints:
            error = type_error(hints[key], value)
            if error:
                problems.append(f"params {key}={value!r} does not match its type hint: {error}")
    for p in signature.parameters.values():
        if (p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
                and p.name not in injected and p.name not in params):
            problems.append(f"parameter {p.name!r} is required but not in params; pass a value to the check")
    return problems


def _construct(kind: str, factory: Any, params: dict[str, Any], injected: dict[str, Any],
               problems: list[str]) -> Any:
    """Build the plugin as dbx's registry does: params plus whichever injected keywords it names."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    names = {p.name for p in parameters}
    extra = {k: v for k, v in injected.items() if takes_any or k in names}
    try:
        return factory(**params, **extra)
    except Exception as exc:  # noqa: BLE001 - reported as a contract problem
        problems.append(f"constructing it with params {params} and {extra} raised {type(exc).__name__}: {exc}")
        return None


def _describe(factory: Any) -> str:
    module = getattr(factory, "__module__", "?")
    return f"{module}:{getattr(factory, '__qualname__', repr(factory))}"


def _plain(value: Any, path: str = "state") -> list[str]:
    """Paths inside ``value`` that are not plain Python data (safe to checkpoint and resume)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return []
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _plain(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        out = [f"{path} has a non-str key {k!r}" for k in value if not isinstance(k, str)]
        return out + [p for k, v in value.items() for p in _plain(v, f"{path}[{k!r}]")]
    return [f"{path} is a {type(value).__name__}; save plain Python values only (int, float, str, bool, None, "
            f"lists, dicts)"]


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# --------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------

def _scenarios(dataset_size: int, seed: int, needs_sums: bool) -> dict[str, Callable[[int], DiversityEstimate]]:
    """Estimate sequences a policy must cope with, each a function of the epoch (deterministic)."""
    n = dataset_size

    def varied(epoch: int) -> DiversityEstimate:
        rng = random.Random(seed * 7919 + epoch)
        return diversity_estimate(10 ** rng.uniform(-1.0, math.log10(10 * n)), samples=n)

    def non_finite(epoch: int) -> DiversityEstimate:
        kinds = (DiversityEstimate(value=math.inf, samples=n, sum_sq_norms=1.0, sq_norm_of_sum=0.0),
                 DiversityEstimate(value=math.nan, samples=0, sum_sq_norms=0.0, sq_norm_of_sum=0.0),
                 diversity_estimate(50.0, samples=n))
        if not needs_sums:  # estimates from an estimator that reports no sums
            kinds += (diversity_estimate(value=math.inf, samples=n), diversity_estimate(value=math.nan, samples=n),
                      diversity_estimate(value=(1 + 50.0) / n, samples=n))
        return kinds[epoch % len(kinds)]

    def extremes(epoch: int) -> DiversityEstimate:
        # gradients that all agree (diversity 1/n), then ones that nearly cancel (diversity 1)
        return diversity_estimate(0.0 if epoch % 3 else 100.0 * n, samples=n)

    return {"varied": varied, "non-finite": non_finite, "extremes": extremes}


def check_policy(factory: Callable[..., Any], *, dataset_size: int = 50_000, params: dict[str, Any] | None = None,
                 epochs: int = 60, seed: int = 0, bounds: tuple[int, int | None] | None = None) -> dict[str, list[int]]:
    """Check a batch-size policy against ``dbx.protocols.BatchSizePolicy``; raise ``ContractError``.

    ``factory`` is what your entry point names; ``params`` the spec params to construct it with;
    ``bounds`` (``(low, high)``, ``high`` may be None) the range every batch size must stay in.
    Checked:

    - the signature works as the parameter schema: keyword-only parameters, each with a type hint
      that its default (and each of ``params``) satisfies;
    - it constructs with ``dataset_size`` and ``seed`` injected, and has ``uses_diversity`` (a
      bool) and every method of the protocol;
    - driven for ``epochs`` epochs through several estimate sequences (varied noise scales,
      ``inf``/``nan`` estimates and estimates without sums, extreme values), every batch size is a
      positive int within ``bounds``, ``measures_in`` answers a bool, ``lr_factor`` (if defined)
      a positive finite number, and nothing raises;
    - an estimate without ``sum_sq_norms``/``sq_norm_of_sum`` (from an estimator that does not
      report them) is either used, or refused with an error whose message names ``sum_sq_norms``
      (so the user learns to pick another estimator); a policy that refuses them is then driven
      with estimates that have the sums only;
    - ``state_dict()`` is plain Python data that survives the checkpoint's format (JSON, see
      ``dbx.plugin_state``), ``load_state_dict`` restores all of it, and a run in which the policy
      is saved and restored into a fresh one after *every* epoch chooses exactly the batch sizes
      of the run without restores (what ``dbx resume`` relies on); the first epoch where the
      two differ is named;
    - two policies built alike answer alike (deterministic under a seed).

    Returns the batch sizes used per epoch in each scenario, by scenario name, for inspection.
    """
    params = dict(params or {})
    subject = f"policy {_describe(factory)}"
    problems = _schema_problems("policy", factory, params)
    injected = {"dataset_size": dataset_size, "seed": seed}

    def build() -> Any:
        return _construct("policy", factory, params, injected, problems)

    policy = build()
    if policy is None:
        raise ContractError(subject, problems)
    uses = getattr(policy, "uses_diversity", None)
    if not isinstance(uses, bool):
        problems.append(f"uses_diversity must be a bool class attribute, got {uses!r}")
    _require_protocol(policy, "policy", BatchSizePolicy, ("initial_batch_size", "measures_in", "next_batch_size",
                                                          "state_dict", "load_state_dict"), subject, problems)
    low, high = bounds if bounds is not None else (1, None)

    def in_bounds(value: Any, what: str) -> bool:
        if not _is_positive_int(value):
            problems.append(f"{what} returned {value!r} ({type(value).__name__}); it must be a positive int")
            return False
        if value < low or (high is not None and value > high):
            problems.append(f"{what} returned {value}, outside the bounds [{low}, {high if high is not None else 'inf'}]")
            return False
        return True

    try:
        first = policy.initial_batch_size()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"initial_batch_size() raised {type(exc).__name__}: {exc}")
        raise ContractError(subject, problems) from exc
    if not in_bounds(first, "initial_batch_size()"):
        raise ContractError(subject, problems)

    needs_sums = _needs_sums(build(), dataset_size, problems)
    results: dict[str, list[int]] = {}
    for name, estimates in _scenarios(dataset_size, seed, needs_sums).items():
        trace = _run_policy(build(), epochs, dataset_size, estimates, problems, in_bounds, name)
        if trace is None:
            continue
        results[name] = [batch for batch, _, _ in trace]
        again = _run_policy(build(), epochs, dataset_size, estimates, problems, in_bounds, name)
        if again is not None and again != trace:
            problems.append(f"scenario {name!r}: two policies built alike chose different batch sizes "
                            f"({[b for b, _, _ in trace]} vs {[b for b, _, _ in again]}); a policy must be "
                            f"deterministic given its arguments and state (seed any randomness from `seed`)")
        _check_resume(build, epochs, dataset_size, estimates, problems, in_bounds, name, trace)
    if problems:
        raise ContractError(subject, problems)
    return results


def _needs_sums(policy: Any, dataset_size: int, problems: list[str]) -> bool:
    """Whether the policy refuses estimates without sums (with a clear error, or it is a problem)."""
    if policy is None or not policy.uses_diversity:
        return False
    epoch = next((e for e in range(1, 1001) if policy.measures_in(e)), None)
    if epoch is None:
        return False
    bare = diversity_estimate(value=0.01, samples=dataset_size)
    try:
        policy.next_batch_size(epoch_state(epoch, policy.initial_batch_size(), dataset_size=dataset_size), bare)
    except Exception as exc:  # noqa: BLE001 - a policy may need the sums, if it says so
        if "sum_sq_norms" not in str(exc):
            problems.append(f"given an estimate without sums (value 0.01, sum_sq_norms None) it raised "
                            f"{type(exc).__name__}: {exc}; if the policy needs the sums, the message should name "
                            f"sum_sq_norms and the estimators that report them")
        return True
    return False


def _run_policy(policy: Any, epochs: int, dataset_size: int, estimates: Callable[[int], DiversityEstimate],
                problems: list[str], in_bounds: Callable[[Any, str], bool], scenario: str,
                first_epoch: int = 1, start: int | None = None,
                total: int | None = None) -> list[tuple[int, bool, Any]] | None:
    """Run the loop's calls; return (batch size, measured, answer) per epoch, or None after a problem.

    ``total`` is the run's length as the policy sees it (``EpochState.epochs``), by default the
    last epoch simulated."""
    if policy is None:
        return None
    last = first_epoch + epochs - 1
    total = last if total is None else total
    batch = policy.initial_batch_size() if start is None else start
    trace = []
    for epoch in range(first_epoch, last + 1):
        where = f"scenario {scenario!r}, epoch {epoch}"
        measured, diversity = False, None
        try:
            if policy.uses_diversity:
                measured = policy.measures_in(epoch)
                if not isinstance(measured, bool):
                    problems.append(f"{where}: measures_in returned {measured!r}; it must return a bool")
                    return None
            diversity = estimates(epoch) if measured else None
            state = epoch_state(epoch, batch, dataset_size=dataset_size, epochs=total)
            answer = policy.next_batch_size(state, diversity)
            if not in_bounds(answer, f"{where}: next_batch_size"):
                return None
            if answer != batch and callable(getattr(policy, "lr_factor", None)):
                factor = policy.lr_factor(batch, answer)
                if not (isinstance(factor, (int, float)) and not isinstance(factor, bool)
                        and math.isfinite(factor) and factor > 0):
                    problems.append(f"{where}: lr_factor({batch}, {answer}) returned {factor!r}; "
                                    f"it must be a positive finite number")
                    return None
        except Exception as exc:  # noqa: BLE001 - reported with where it happened
            what = f"{diversity!r}" if measured else "no estimate"
            problems.append(f"{where} (given {what}): raised {type(exc).__name__}: {exc}")
            return None
        trace.append((batch, measured, answer))
        batch = answer
    return trace


def _check_resume(build: Callable[[], Any], epochs: int, dataset_size: int,
                  estimates: Callable[[int], DiversityEstimate], problems: list[str],
                  in_bounds: Callable[[Any, str], bool], scenario: str,
                  straight: list[tuple[int, bool, Any]]) -> None:
    """Save and restore the policy into a fresh one after every epoch, as ``dbx resume`` would
    after a kill there; the decisions must be those of the ``straight`` run, epoch by epoch."""
    policy = build()
    batch = policy.initial_batch_size() if policy is not None else 0
    for epoch in range(1, epochs + 1):
        if epoch > 1:
            policy = _restored(policy, build, problems, f"scenario {scenario!r}, after epoch {epoch - 1}")
            if policy is None:
                return
        step = _run_policy(policy, 1, dataset_size, estimates, problems, in_bounds, scenario,
                           first_epoch=epoch, start=batch, total=epochs)
        if step is None:
            return
        expected = straight[epoch - 1]
        if step[0] != expected:
            agreed = f" (epochs 1-{epoch - 1} agreed)" if epoch > 1 else ""
            what = (f"measures_in({epoch}) answered {step[0][1]} where the uninterrupted policy answered {expected[1]}"
                    if step[0][1] != expected[1] else
                    f"it chose batch size {step[0][2]} after epoch {epoch} where the uninterrupted policy chose "
                    f"{expected[2]}")
            problems.append(
                f"scenario {scenario!r}: restored from state_dict() after every epoch, {what}{agreed}; "
                f"state_dict must capture everything next_batch_size and measures_in depend on (a counter, a "
                f"smoothed value, a random generator), or a resumed run drifts from an uninterrupted one")
            return
        batch = step[0][2]


def _restored(policy: Any, build: Callable[[], Any], problems: list[str], where: str) -> Any:
    """A fresh policy given ``policy``'s state through the checkpoint's format, or None after a problem."""
    try:
        state = policy.state_dict()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{where}: state_dict() raised {type(exc).__name__}: {exc}")
        return None
    if not isinstance(state, dict):
        problems.append(f"state_dict() returned a {type(state).__name__}; it must return a dict")
        return None
    not_plain = _plain(state)
    if not_plain:
        problems.extend(f"state_dict(): {p}" for p in not_plain)
        return None
    try:
        saved = encode_state(state)
    except TypeError as exc:
        problems.append(f"state_dict() cannot be saved in a checkpoint: {exc}")
        return None
    fresh = build()
    try:
        fresh.load_state_dict(decode_state(saved))
        again = encode_state(fresh.state_dict())
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{where}: load_state_dict(state_dict()) raised {type(exc).__name__}: {exc}")
        return None
    if again != saved:
        problems.append(f"{where}: after load_state_dict(state), state_dict() is not the state given "
                        f"({state_differences(saved, again)}); load_state_dict must restore everything")
        return None
    return fresh


# --------------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------------

def check_estimator(factory: Callable[..., Any], *, params: dict[str, Any] | None = None, seed: int = 0,
                    reference_rtol: float | None = 1e-3) -> DiversityEstimate:
    """Check a diversity estimator against ``dbx.protocols.DiversityEstimator``; raise ``ContractError``.

    On a small MLP (Linear-Tanh-Linear, 3 classes) and 48 samples, the estimator watches an epoch
    of 3 optimizer steps of 16 samples, each split into 2 micro-batches, exactly as the loop
    calls it, with the weights held fixed. Checked:

    - the signature works as the parameter schema (as in ``check_policy``);
    - ``attach``/``detach`` right after construction (dbx's early model check) work;
    - ``estimate`` returns a ``DiversityEstimate`` with a positive ``samples`` count, a finite
      ``seconds``, ``value == sum_sq_norms / sq_norm_of_sum`` when it reports both, and (unless
      ``reference_rtol`` is None, for an approximate estimator) a value within ``reference_rtol``
      of the diversity computed from explicit per-sample gradients;
    - the weights, their ``.grad`` and the model's train mode are as before ``estimate``;
    - ``detach`` leaves no hook on any module or parameter;
    - a second measuring epoch gives the same value (accumulators are reset);
    - ``state_dict()``, if defined, is plain Python data that survives the checkpoint's format,
      ``load_state_dict`` restores all of it, and a fresh estimator restored from the state saved
      after the first measuring epoch measures the second one exactly as the original did.

    Returns the first estimate.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    params = dict(params or {})
    subject = f"estimator {_describe(factory)}"
    problems = _schema_problems("estimator", factory, params)
    estimator = _construct("estimator", factory, params, {"seed": seed}, problems)
    if estimator is None:
        raise ContractError(subject, problems)
    _require_protocol(estimator, "estimator", DiversityEstimator, ("attach", "on_backward", "on_step", "estimate", "detach"),
                      subject, problems)

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    inputs = torch.randn(48, 6, generator=generator)
    targets = torch.randint(0, 3, (48,), generator=generator)
    loss_fn = F.cross_entropy
    reference = _reference_diversity(model, loss_fn, inputs, targets)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    try:
        estimator.attach(model)
        estimator.detach()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"attach(model) then detach() (dbx's check before a run) raised {type(exc).__name__}: {exc}")
        raise ContractError(subject, problems) from exc
    _check_no_hooks(model, problems, "after the first detach()")

    results = []
    saved: Any = None  # the state after the first measuring epoch, as a checkpoint holds it
    for attempt in ("first", "second"):
        if attempt == "second" and callable(getattr(estimator, "state_dict", None)):
            saved = _saved_estimator_state(estimator, problems)
        try:
            results.append(_measure(estimator, model, loss_fn, inputs, targets))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{attempt} measuring epoch raised {type(exc).__name__}: {exc}")
            raise ContractError(subject, problems) from exc
        _check_no_hooks(model, problems, f"after detach() in the {attempt} measuring epoch")
        if any(p.grad is not None for p in model.parameters()):
            problems.append("estimate() left .grad set on the model's parameters; leave them as they were (None)")
        if not model.training:
            problems.append("the model is in eval mode after estimate(); restore the mode it was in")
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
        if changed:
            problems.append(f"estimate() changed the weights/buffers {changed}; an estimator must not")

    first, second = results
    for est, attempt in ((first, "first"), (second, "second")):
        problems.extend(_estimate_problems(est, attempt))
    if isinstance(first, DiversityEstimate) and isinstance(second, DiversityEstimate):
        if not _close(first.value, second.value, 1e-4):
            problems.append(f"two measuring epochs over the same steps gave {first.value} and {second.value}; "
                            f"reset what is accumulated in attach() (or estimate())")
        if reference_rtol is not None and not _close(first.value, reference, reference_rtol):
            problems.append(f"value {first.value} differs from the diversity of the explicit per-sample gradients "
                            f"({reference}) by more than rtol={reference_rtol}")
    if saved is not None and isinstance(second, DiversityEstimate):
        _check_estimator_resume(factory, params, seed, saved, second, model, loss_fn, inputs, targets, problems)
    if problems:
        raise ContractError(subject, problems)
    return first


def _saved_estimator_state(estimator: Any, problems: list[str]) -> str | None:
    try:
        state = estimator.state_dict()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"state_dict() raised {type(exc).__name__}: {exc}")
        return None
    not_plain = _plain(state)
    if not_plain:
        problems.extend(f"state_dict(): {p}" for p in not_plain)
        return None
    try:
        return encode_state(state)
    except TypeError as exc:
        problems.append(f"state_dict() cannot be saved in a checkpoint: {exc}")
        return None


def _check_estimator_resume(factory: Any, params: dict[str, Any], seed: int, saved: str, expected: DiversityEstimate,
                            model: Any, loss_fn: Callable[..., Any], inputs: Any, targets: Any,
                            problems: list[str]) -> None:
    """A fresh estimator given the state saved after the first measuring epoch measures the second
    one exactly as the original did (what ``dbx resume`` relies on)."""
    twin = _construct("estimator", factory, params, {"seed": seed}, problems)
    if twin is None or not callable(getattr(twin, "load_state_dict", None)):
        problems.append("it has state_dict() but no load_state_dict(); dbx resume could not restore its state")
        return
    try:
        twin.load_state_dict(decode_state(saved))
        again = encode_state(twin.state_dict())
        resumed = _measure(twin, model, loss_fn, inputs, targets)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"restoring load_state_dict(state_dict()) and measuring raised {type(exc).__name__}: {exc}")
        return
    if again != saved:
        problems.append(f"after load_state_dict(state), state_dict() is not the state given "
                        f"({state_differences(saved, again)}); load_state_dict must restore everything")
    elif isinstance(resumed, DiversityEstimate) and not (
            resumed.value == expected.value or (math.isnan(resumed.value) and math.isnan(expected.value))):
        problems.append(f"restored from state_dict() after the first measuring epoch, it measured {resumed.value} in "
                        f"the second where the original measured {expected.value}; state_dict must capture "
                        f"everything estimate() depends on (e.g. a random generator's state)")


def _measure(estimator: Any, model: Any, loss_fn: Callable[..., Any], inputs: Any, targets: Any) -> Any:
    """One measuring epoch as the training loop runs it, with the optimizer step left out."""
    model.train()
    estimator.attach(model)
    try:
        for batch_x, batch_y in zip(inputs.split(16), targets.split(16), strict=True):
            loss_scale = 1.0 / batch_x.shape[0]
            for x, y in zip(batch_x.split(8), batch_y.split(8), strict=True):
                (loss_fn(model(x), y, reduction="sum") * loss_scale).backward()
                estimator.on_backward(loss_scale)
            estimator.on_step(loss_scale)
            for p in model.parameters():
                p.grad = None
        return estimator.estimate(model, loss_fn, (inputs, targets))
    finally:
        estimator.detach()


def _reference_diversity(model: Any, loss_fn: Callable[..., Any], inputs: Any, targets: Any) -> float:
    """sum_i ||g_i||^2 / ||sum_i g_i||^2 from one backward per sample (the slow, obvious way)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    sum_sq = 0.0
    for i in range(inputs.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(inputs[i:i + 1]), targets[i:i + 1], reduction="sum"), params)
        sum_sq += sum(float(g.double().square().sum()) for g in grads)
        for t, g in zip(total, grads, strict=True):
            t += g.double()
    return sum_sq / float(sum(t.square().sum() for t in total))


def _check_no_hooks(model: Any, problems: list[str], when: str) -> None:
    left = []
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(module, attr, None):
                left.append(f"{name or '(root)'}.{attr}")
    for name, p in model.named_parameters():
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            if getattr(p, attr, None):
                left.append(f"parameter {name}.{attr}")
    if left:
        problems.append(f"hooks left {when}: {', '.join(left)}; detach() must remove every hook")


def _estimate_problems(est: Any, attempt: str) -> list[str]:
    if not isinstance(est, DiversityEstimate):
        return [f"the {attempt} estimate() returned {type(est).__name__}, not dbx.protocols.DiversityEstimate"]
    out = []
    if not isinstance(est.value, float):
        out.append(f"the {attempt} estimate's value is a {type(est.value).__name__}; use a Python float")
    if not _is_positive_int(est.samples):
        out.append(f"the {attempt} estimate's samples is {est.samples!r}; it must be a positive int")
    if not (isinstance(est.seconds, (int, float)) and math.isfinite(est.seconds) and est.seconds >= 0):
        out.append(f"the {attempt} estimate's seconds is {est.seconds!r}; it must be a finite number >= 0")
    if not isinstance(est.per_layer, dict):
        out.append(f"the {attempt} estimate's per_layer is a {type(est.per_layer).__name__}; it must be a dict")
    if est.sum_sq_norms is not None and est.sq_norm_of_sum is not None and est.sq_norm_of_sum > 0:
        if not _close(est.value, est.sum_sq_norms / est.sq_norm_of_sum, 1e-6):
            out.append(f"the {attempt} estimate's value {est.value} is not sum_sq_norms / sq_norm_of_sum "
                       f"({est.sum_sq_norms} / {est.sq_norm_of_sum})")
    return out


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b))


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def check_model(factory: Callable[..., Any], *, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10,
                params: dict[str, Any] | None = None, seed: int = 0, regression: bool = True) -> None:
    """Check a model factory against ``dbx.protocols.ModelFactory``; raise ``ContractError``.

    Checked: the signature works as the parameter schema; it builds a CPU ``torch.nn.Module``
    for ``num_classes`` (and, with ``regression``, for ``num_classes=None``); a batch of 2 inputs
    of ``input_shape`` gives outputs of shape ``(2, num_classes)`` (``(2, 1)``) in eval and train
    mode, and the backward reaches the parameters; two builds after ``torch.manual_seed(seed)``
    have the same weights (the factory must not seed torch itself); the weights, written to a
    checkpoint and read back (``torch.load(weights_only=True)``) into a model built with another
    seed, give the same outputs.
    """
    import torch
    from torch import nn

    params = dict(params or {})
    subject = f"model {_describe(factory)}"
    problems = _schema_problems("model", factory, params)
    cases = [num_classes, None] if regression else [num_classes]
    for classes in cases:
        label = f"num_classes={classes}"
        torch.manual_seed(seed)
        model = _construct("model", factory, params, {"num_classes": classes, "input_shape": tuple(input_shape)},
                           problems)
        if model is None:
            continue
        if not isinstance(model, nn.Module):
            problems.append(f"{label}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
            continue
        off_cpu = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()] if t.device.type != "cpu"})
        if off_cpu:
            problems.append(f"{label}: the model has tensors on {off_cpu}; build it on the CPU (dbx moves it)")
        expected = (2, classes if classes is not None else 1)
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(seed))
        try:
            model.eval()
            with torch.no_grad():
                out = model(x)
            if tuple(out.shape) != expected:
                problems.append(f"{label}: eval-mode output shape {tuple(out.shape)}, expected {expected}")
            model.train()
            out = model(x)
            if tuple(out.shape) != expected:
                problems.append(f"{label}: train-mode output shape {tuple(out.shape)}, expected {expected}")
            out.float().square().sum().backward()
            trainable = [p for p in model.parameters() if p.requires_grad]
            if not trainable or all(p.grad is None for p in trainable):
                problems.append(f"{label}: no parameter received a gradient; the model has nothing to train")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{label}: a forward/backward on a batch of shape {tuple(x.shape)} raised "
                            f"{type(exc).__name__}: {exc}")
            continue
        if classes is not None:
            torch.manual_seed(seed)
            twin = _construct("model", factory, params, {"num_classes": classes, "input_shape": tuple(input_shape)},
                              problems)
            first, second = model.state_dict(), twin.state_dict() if twin is not None else {}
            differing = [k for k, v in first.items() if k in second and v.dtype.is_floating_point
                         and not torch.equal(v, second[k]) and "running" not in k]
            if differing:
                problems.append(f"two builds after torch.manual_seed({seed}) differ in {differing[:3]}; "
                                f"let dbx seed torch (do not reseed or use another generator)")
            _check_model_resume(model, factory, params, classes, tuple(input_shape), x, seed, problems)
    if problems:
        raise ContractError(subject, problems)


def _check_model_resume(model: Any, factory: Any, params: dict[str, Any], classes: int, input_shape: tuple[int, ...],
                        x: Any, seed: int, problems: list[str]) -> None:
    """The weights go through the checkpoint's format into a model built with another seed, which
    must then compute the same outputs (what ``dbx resume`` relies on)."""
    import torch

    from dbx.train.checkpoint import round_trip

    label = f"num_classes={classes}"
    try:
        saved = round_trip(model.state_dict())
    except UserError as exc:
        problems.append(f"{label}: its state_dict() cannot be read back from a checkpoint: {exc}")
        return
    torch.manual_seed(seed + 1)
    other = _construct("model", factory, params, {"num_classes": classes, "input_shape": input_shape}, problems)
    if other is None:
        return
    try:
        other.load_state_dict(saved)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{label}: load_state_dict(state_dict() read back from a checkpoint) raised "
                        f"{type(exc).__name__}: {exc}")
        return
    model.eval()
    other.eval()
    with torch.no_grad():
        same = torch.equal(model(x), other(x))
    if not same:
        problems.append(f"{label}: a model restored from the checkpoint of another computes other outputs; keep "
                        f"everything the forward pass uses in parameters or buffers (or get_extra_state)")


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------

def check_dataset(factory: Callable[..., Any], *, root: str, params: dict[str, Any] | None = None, seed: int = 0,
                  allow_missing: bool = False) -> DataSplits | None:
    """Check a dataset factory against ``dbx.protocols.DatasetFactory``; raise ``ContractError``.

    Checked: the signature works as the parameter schema; called with ``root`` and ``seed``
    injected it returns ``DataSplits`` whose splits are tensor pairs of matching lengths (or
    Datasets yielding ``(input, target)``) with inputs of ``input_shape``, integer targets in
    ``[0, num_classes)`` (float targets when ``num_classes`` is None); ``augment``, if given,
    keeps the batch shape; a second call with the same seed gives the same training data.

    With ``allow_missing``, a ``dbx.errors.UserError`` (files not found under ``root``) is
    accepted, provided its message names ``root``; the function then returns None.
    """
    import torch

    params = dict(params or {})
    subject = f"dataset {_describe(factory)}"
    problems = _schema_problems("dataset", factory, params)
    injected = {"root": str(root), "seed": seed}
    try:
        splits = _call_dataset(factory, params, injected)
    except UserError as exc:
        if not allow_missing:
            problems.append(f"it raised UserError: {exc}")
        elif str(root) not in str(exc):
            problems.append(f"its missing-data error does not say where it looked (the root {root}): {exc}")
        if problems:
            raise ContractError(subject, problems) from exc
        return None
    except Exception as exc:  # noqa: BLE001
        problems.append(f"called with params {params} it raised {type(exc).__name__}: {exc} (missing files "
                        f"must raise dbx.errors.UserError saying where it looked and how to get them)")
        raise ContractError(subject, problems) from exc
    if not isinstance(splits, DataSplits):
        problems.append(f"it returned a {type(splits).__name__}, not dbx.protocols.DataSplits")
        raise ContractError(subject, problems)
    classes = splits.num_classes
    if classes is not None and not (_is_positive_int(classes) and classes >= 2):
        problems.append(f"num_classes is {classes!r}; it must be an int >= 2, or None for regression")
        classes = None
    shape = tuple(splits.input_shape)
    for name in ("train", "test"):
        problems.extend(_split_problems(name, getattr(splits, name), shape, classes))
    if splits.augment is not None and _is_tensor_pair(splits.train):
        try:
            batch = splits.train[0][:4]
            out = splits.augment(batch, torch.Generator(device=batch.device).manual_seed(0))
            if tuple(out.shape) != tuple(batch.shape):
                problems.append(f"augment changed the batch shape {tuple(batch.shape)} to {tuple(out.shape)}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"augment(inputs, generator) raised {type(exc).__name__}: {exc}")
    if _is_tensor_pair(splits.train):
        again = _call_dataset(factory, params, injected)
        if not (_is_tensor_pair(again.train) and torch.equal(again.train[0], splits.train[0])
                and torch.equal(again.train[1], splits.train[1])):
            problems.append(f"two calls with seed={seed} gave different training data; derive all randomness from seed")
    if problems:
        raise ContractError(subject, problems)
    return splits


def _call_dataset(factory: Any, params: dict[str, Any], injected: dict[str, Any]) -> Any:
    parameters = inspect.signature(factory).parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    names = {p.name for p in parameters}
    return factory(**params, **{k: v for k, v in injected.items() if takes_any or k in names})


def _is_tensor_pair(split: Any) -> bool:
    import torch

    return (isinstance(split, (tuple, list)) and len(split) == 2
            and all(isinstance(t, torch.Tensor) for t in split))


def _split_problems(name: str, split: Any, shape: tuple[int, ...], classes: int | None) -> list[str]:
    import torch

    if _is_tensor_pair(split):
        inputs, targets = split
        if inputs.shape[0] == 0 or inputs.shape[0] != targets.shape[0]:
            return [f"{name}: {inputs.shape[0]} inputs and {targets.shape[0]} targets; both must be the same, > 0"]
        samples = [(inputs[0], targets)]
    else:
        try:
            size = len(split)
            samples = [split[i] for i in range(min(size, 3))]
        except Exception as exc:  # noqa: BLE001
            return [f"{name}: neither a pair of tensors nor a Dataset with len() and indexing ({exc})"]
        if size == 0:
            return [f"{name}: the split is empty"]
        samples = [(s[0], torch.as_tensor(s[1]).reshape(1)) for s in samples]
    out = []
    first_input = samples[0][0]
    if tuple(first_input.shape) != shape:
        out.append(f"{name}: an input has shape {tuple(first_input.shape)}, but input_shape is {shape}")
    targets = torch.cat([t.reshape(-1) for _, t in samples])
    if classes is not None:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            out.append(f"{name}: classification targets have dtype {targets.dtype}; use int64 class indices")
        elif targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            out.append(f"{name}: targets span [{int(targets.min())}, {int(targets.max())}], outside [0, {classes})")
    elif not targets.dtype.is_floating_point:
        out.append(f"{name}: regression targets (num_classes None) have dtype {targets.dtype}; use floats")
    return out
