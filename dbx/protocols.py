"""The plugin contracts: what dbx calls on a policy, an estimator, a model or a dataset factory.

This module is the plugin author's manual. It holds no logic and imports nothing heavy (not even
torch); a plugin may import from it freely, and what it names is kept stable across dbx releases.
The step-by-step guide, from ``dbx plugins new policy NAME`` to a run in MLflow, is
``docs/plugins.md``.

What a plugin may import from dbx
---------------------------------
Only these names are public; they keep their meaning across releases (a change is announced and
goes through a deprecation period):

=====================  ======================================================================
``dbx.protocols``      ``EpochState``, ``DiversityEstimate``, ``DataSplits`` (the records dbx
                       passes and expects), ``BatchSizePolicy``, ``DiversityEstimator``,
                       ``ModelFactory``, ``DatasetFactory`` (the contracts, for type hints and
                       ``isinstance`` checks; a plugin never needs to inherit from them)
``dbx.errors``         ``UserError``: raise it when the *user's input* is wrong (a missing data
                       file, a parameter combination that cannot work); dbx prints its message
                       without a traceback and exits with code 2
``dbx`` (top level)    measuring and adapting in a loop of your own (docs/your-loop.md):
                       ``DiversityMeter``, ``MeterError``, ``per_sample_sq_norms``,
                       ``PerSampleSqNorms``, ``build_policy``, ``AdaptiveBatchSize``, ``Resize``,
                       ``PolicyError``, ``log_diversity``; and ``dbx.integrations.lightning`` /
                       ``dbx.integrations.transformers`` (``DiversityCallback``)
``dbx.testing``        contract checks for the plugin's own tests: ``check_policy``,
                       ``check_estimator``, ``check_model``, ``check_dataset``, ``ContractError``,
                       and helpers to drive a policy by hand (``epoch_state``,
                       ``diversity_estimate``, ``simulate_policy``)
=====================  ======================================================================

Everything else in dbx (``dbx.registry``, ``dbx.train``, ``dbx.policies``, the estimators' kernels,
any name with a leading underscore) is private: read it, but do not import it from a plugin, since
it may change in any release.

How a plugin is found
---------------------
Each kind is an entry-point group; an entry point names a class or factory function::

    # setup.cfg of your distribution
    [options.entry_points]
    dbx.policies =
        myrule = my_package.policy:MyRule

After ``pip install`` of that distribution, ``dbx plugins`` lists ``myrule`` with your
distribution's name and version, and a spec can say ``policy: {name: myrule}``. dbx's own
built-ins are registered the same way in dbx's ``setup.cfg``: a third-party plugin is their peer.

- Listing reads package metadata only; your module is imported when a spec names your plugin
  (or by ``dbx plugins --check``). Do no work at import time beyond defining things.
- A module that fails to import is a hard error naming the plugin, the entry point, your
  distribution and its version, with the original exception chained (``--debug`` shows it).
- Two distributions that register one name in one group are an error naming both; pick a name
  that says what your rule is (``gns``, ``normtest``), not ``custom``.

How a plugin is configured
--------------------------
The factory's keyword-only parameters, with type hints and defaults, *are* its parameter schema.
``dbx validate`` (and ``dbx run``, before it starts anything) checks a spec's ``params:`` against
them: unknown names (with a did-you-mean), missing required ones, wrong types (``"3"`` is not an
``int``; ``3`` is a fine ``float``), each reported with the spec's file and line. So:

- make every parameter keyword-only (``def __init__(self, *, initial: int = 128, ...)``);
- give each one a type hint that pydantic understands (``int``, ``float``, ``bool``, ``str``,
  ``int | None``, ``Literal["a", "b"]``, ``list[int]``, ``Sequence[str]``) and, usually, a default;
- check values (ranges, relations between parameters) in the factory and raise ``ValueError``
  with a message that names the parameter; dbx reports it as an input error before any run starts.

dbx also passes some keywords of its own ("injected" below) when the factory's signature names
them (or takes ``**kwargs``); they are not settable from the spec.

What dbx injects, per kind:

==================  ====================================================================
``dbx.policies``     ``dataset_size`` (int, training samples), ``seed`` (int)
``dbx.estimators``   ``seed`` (int)
``dbx.models``       ``num_classes`` (int or None for regression), ``input_shape`` (tuple)
``dbx.datasets``     ``root`` (str: the spec's data root, ``~`` and ``$VARS`` expanded), ``seed``
==================  ====================================================================

Resume
------
After every epoch dbx checkpoints the run. A policy's ``state_dict()`` (and an estimator's, if it
has one) is saved with it. ``dbx resume RUN_ID`` builds every part again from the same spec, with
the same parameters and injected keywords, then calls ``load_state_dict(saved)`` before the first
resumed epoch; the resumed run must then choose exactly the batch sizes the uninterrupted run
would have. Save plain Python values only (int, float, str, bool, None, lists, dicts with str
keys): the checkpoint keeps them as JSON text (tuples come back as lists; NaN and infinities
survive), never pickled, so that reading a checkpoint can run no code. ``dbx.testing`` restores
a policy after every epoch of a scripted run and names the first epoch where it decides otherwise;
``dbx resume`` replays the last decision from the saved state and warns when it differs.

Testing a plugin
----------------
``dbx.testing.check_policy(MyRule, dataset_size=50_000)`` (and ``check_estimator``,
``check_model``, ``check_dataset``) exercises the contract below the way dbx's training loop does
and raises ``ContractError`` listing every violation at once. Call it from your own pytest; dbx
runs the same checks on its own built-ins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is never imported by this module at run time
    import torch

__all__ = [
    "EpochState",
    "DiversityEstimate",
    "DataSplits",
    "BatchSizePolicy",
    "DiversityEstimator",
    "ModelFactory",
    "DatasetFactory",
]


@dataclass(frozen=True)
class EpochState:
    """What a policy may read about the epoch that just ended (passed to ``next_batch_size``).

    ``epoch`` counts from 1: the state after the first epoch has ``epoch == 1``; ``epochs`` is
    the run's total. ``step`` is the number of optimizer steps taken so far (all epochs).
    ``batch_size`` is the batch size the epoch was trained with and ``lr`` its learning rate
    (after the schedule and any rescaling). ``samples_seen`` counts training samples over all
    epochs so far; ``dataset_size`` is the number of training samples (the same ``n`` the policy
    was constructed with). Losses are means over samples; accuracies are fractions in [0, 1],
    None for regression tasks.

    Anything a policy needs beyond this is a sign that this record should grow, in dbx: open an
    issue rather than reaching into the training loop.
    """

    epoch: int
    epochs: int
    step: int
    batch_size: int
    lr: float
    samples_seen: int
    dataset_size: int
    train_loss: float
    test_loss: float
    train_accuracy: float | None = None
    test_accuracy: float | None = None


@dataclass(frozen=True)
class DiversityEstimate:
    """The gradient diversity measured over one epoch (or one sample of it).

    For per-sample loss gradients g_1 .. g_m (m = ``samples``)::

        sum_sq_norms  = S1     = sum_i ||g_i||^2
        sq_norm_of_sum = ||S2||^2 = ||sum_i g_i||^2
        value         = S1 / ||S2||^2                       (gradient diversity, Yin et al. 2018)

    ``value`` is at least 1/m when the sums are exact (all gradients equal) and grows without
    bound when they cancel; it is ``inf`` or ``nan`` when the summed gradient vanishes, and
    policies must handle that (dbx's ``divebatch`` jumps to its maximum; ignoring the estimate is
    also reasonable). ``sum_sq_norms`` and ``sq_norm_of_sum`` are None for an estimator that does
    not report them; a policy that needs them should say so in its error message.

    Statistics a policy can derive (see ``docs/plugins.md`` and ``docs/algorithm.md``): with the true gradient
    G = E[g] and per-sample covariance Sigma,

    - gradient noise scale (McCandlish et al. 2018), B_simple = tr(Sigma) / ||G||^2: to first
      order ``m * value - 1``; unbiased from the sums, ``(m S1 - ||S2||^2) / (||S2||^2 - S1)``;
    - the sample variance of the gradient (Byrd et al. 2012), trace form:
      ``(S1 - ||S2||^2 / m) / (m - 1)``, and the squared norm of the mean gradient
      ``||S2||^2 / m^2``.

    ``per_layer`` maps a module path (``"layers.0"``) to the same ratio restricted to that layer's
    parameters (empty when the estimator does not compute it). ``seconds`` is the time the
    estimator itself spent, as far as it can tell.
    """

    value: float
    samples: int
    seconds: float = 0.0
    per_layer: dict[str, float] = field(default_factory=dict)
    sum_sq_norms: float | None = None
    sq_norm_of_sum: float | None = None


@dataclass
class DataSplits:
    """What a dataset factory returns.

    ``train`` and ``test`` are either a pair ``(inputs, targets)`` of tensors (small data: dbx keeps
    it on the training device and batches it by index, with no DataLoader) or a
    ``torch.utils.data.Dataset`` yielding ``(input, target)`` (large data: dbx wraps it in a
    DataLoader whose batch size it changes between epochs).

    Targets are int64 class indices in ``[0, num_classes)`` for classification, float for
    regression. ``input_shape`` is the shape of one input (``inputs.shape[1:]``); dbx passes it to
    the model factory.

    ``num_classes`` is None for a regression task (dbx then uses mean squared error and reports no
    accuracy). ``augment`` is an optional batch-wise training augmentation for tensor data, called
    as ``augment(inputs, generator)`` on the training device; it must not change the batch size.
    ``description`` is one line for the run's log (what the data is, its size).
    """

    train: Any
    test: Any
    num_classes: int | None
    input_shape: tuple[int, ...]
    augment: Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"] | None = None
    description: str = ""


@runtime_checkable
class BatchSizePolicy(Protocol):
    """Decides the batch size of every epoch. Pure Python: numbers in, a number out.

    Constructed once per run as ``Factory(dataset_size=n, **params)`` (``dataset_size`` and
    ``seed`` only if the signature names them). The training loop then:

    1. calls ``initial_batch_size()`` once, before the first epoch (not on resume);
    2. before each epoch ``e`` (1-based), calls ``measures_in(e)`` if ``uses_diversity`` is true;
       when it answers True the estimator watches that epoch's training steps (which costs some
       time: measure only the epochs whose estimate you will use);
    3. after each epoch calls ``next_batch_size(state, diversity)``, where ``state`` is the
       ``EpochState`` of the epoch that just ended and ``diversity`` the ``DiversityEstimate``
       gathered during it (None when the epoch was not measured, and always None when
       ``uses_diversity`` is false). The answer is the batch size of the next epoch;
    4. when the answer differs from the current batch size, rescales the learning rate by the
       spec's ``lr_scaling`` rule times ``lr_factor(old, new)`` (if the policy defines that
       optional method; it returns a positive float);
    5. after each epoch, saves ``state_dict()`` in the run's checkpoint; on resume, builds the
       policy again with the same arguments and calls ``load_state_dict(saved)``.

    What a policy may return: a positive ``int`` (not a float, not a bool), normally within the
    bounds its parameters state. Returning something else fails the run with reason
    ``bad_policy_output``. It may return the current size (no change) at any epoch, and may
    grow or shrink the batch.

    What a policy must not do: touch tensors, the model, the optimizer, the data loader or MLflow
    (dbx logs ``batch_size``, ``lr`` and ``diversity`` itself); print per epoch (dbx prints the
    batch size whenever it changes); keep state that ``state_dict`` does not capture. It should be
    deterministic: the same constructor arguments, state and inputs give the same answers (draw
    any randomness from a ``random.Random(seed)`` kept in the state).

    Attributes and methods:

    - ``uses_diversity``: a class attribute; true if the policy reads the estimate (dbx then
      builds the spec's estimator, ``exact`` by default).
    - ``measures_in(epoch)``: whether the estimator should watch epoch ``epoch``; asked only when
      ``uses_diversity`` is true (define it anyway, returning False).
    - ``state_dict()`` / ``load_state_dict(state)``: everything needed to continue after a resume,
      as plain Python values (an empty dict for a stateless policy).
    - ``metrics()`` (optional): a dict of the policy's own numbers after ``next_batch_size``
      (e.g. a smoothed noise scale); dbx logs each as ``policy/<key>`` at that epoch.
    """

    uses_diversity: bool

    def initial_batch_size(self) -> int: ...

    def measures_in(self, epoch: int) -> bool: ...

    def next_batch_size(self, state: EpochState, diversity: DiversityEstimate | None) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class DiversityEstimator(Protocol):
    """Measures gradient diversity during the epochs a policy asks for.

    Constructed once per run as ``Factory(**params)`` (plus ``seed`` if the signature names it),
    and only when the policy's ``uses_diversity`` is true. Right after construction dbx calls
    ``attach(model)`` and ``detach()`` once, so that a model the estimator cannot handle is
    reported before the run starts: raise ``UserError`` (or ``ValueError``) naming the module.

    For a measuring epoch the loop calls:

    1. ``attach(model)`` before the first step (register hooks here, not at construction);
    2. after every micro-batch's ``loss.backward()``, ``on_backward(loss_scale)``, where the loss
       that was back-propagated equals ``loss_scale * sum_i loss_i`` over the micro-batch's
       per-sample losses; divide what the hooks saw by ``loss_scale`` to get per-sample gradients;
    3. once per optimizer step, before ``optimizer.step()``, ``on_step(loss_scale)``, when every
       parameter's ``.grad`` holds ``loss_scale * sum_i grad loss_i`` over the logical batch
       (weight decay is not in it). Steps the optimizer will not take reach ``on_step`` too and
       must be left out of the statistic: under fp16 a step whose gradients overflowed (the
       GradScaler skips it), and with ``on_nonfinite: skip_step`` a step whose loss was not
       finite (its ``.grad`` already cleared). Decide it on the device (``torch.isfinite``);
       dbx's ``exact`` does.

    Under fp16, ``loss_scale`` is a 0-d tensor on the device (it holds the GradScaler's scale,
    which changes between steps; reading it as a float would wait for the device); otherwise it is
    a float.
    4. at the end of the epoch, ``estimate(model, loss_fn, data)`` returning a
       ``DiversityEstimate``; ``loss_fn(outputs, targets, reduction="sum")`` is the run's loss and
       ``data`` is the training split (for estimators that draw their own samples at fixed
       weights: restore the model's train/eval mode, leave the weights, their ``.grad`` and
       buffers as they were);
    5. ``detach()`` to remove every hook; the next epochs train at full speed.

    The hooks run inside the training step: they must not synchronise with the device (no
    ``.item()``, no ``.tolist()``; do that once, in ``estimate``), log, or allocate per-sample
    gradients where the algebra avoids it. An estimator must not change the optimizer, the
    weights or the batch size. ``estimate`` should report ``sum_sq_norms`` and
    ``sq_norm_of_sum`` whenever it has them (policies such as ``gns`` and ``normtest`` need them),
    and ``samples`` must be the number of per-sample gradients those sums run over.

    ``state_dict``/``load_state_dict`` are optional (e.g. a counter of draws, so a resumed run
    draws the same samples); an online estimator that restarts its accumulation every measuring
    epoch needs neither.
    """

    def attach(self, model: "torch.nn.Module") -> None: ...

    def on_backward(self, loss_scale: "float | torch.Tensor") -> None: ...

    def on_step(self, loss_scale: "float | torch.Tensor") -> None: ...

    def estimate(self, model: "torch.nn.Module", loss_fn: Callable[..., Any], data: Any) -> DiversityEstimate: ...

    def detach(self) -> None: ...


class ModelFactory(Protocol):
    """``factory(*, num_classes, input_shape, **params) -> torch.nn.Module``.

    Called once per run (and again on resume, before the saved weights are loaded), with the
    ``num_classes`` and ``input_shape`` of the spec's dataset. ``num_classes`` is None for
    regression: return one output. The module maps a batch of inputs of shape
    ``(B, *input_shape)`` to ``(B, num_classes)`` (or ``(B, 1)``) logits; dbx applies the loss.
    Build it on the CPU and do not seed it; dbx seeds torch with the run's seed before calling you
    and moves the module to the device. An input shape the model cannot take is a ``ValueError``
    at construction that says which shapes it accepts, not an error in the first forward pass.

    For the diversity estimators, prefer modules whose per-sample gradient norms dbx computes from
    hooks (Linear, Conv, the norm layers, Embedding; see ``dbx.estimators.exact``); anything else
    with parameters needs the ``subsampled`` estimator.
    """

    def __call__(self, *, num_classes: int | None, input_shape: tuple[int, ...], **params: Any) -> "torch.nn.Module": ...


class DatasetFactory(Protocol):
    """``factory(*, root, seed, **params) -> DataSplits``.

    Called once per run (and on resume). Read data from ``root`` (never download unless the spec
    says ``download: true``). When the files are missing, raise ``dbx.errors.UserError`` saying
    where you looked and how to get them. Given the same ``seed`` and params, return the same
    splits (dbx shuffles and batches them itself, with the run's seed).
    """

    def __call__(self, **params: Any) -> DataSplits: ...
