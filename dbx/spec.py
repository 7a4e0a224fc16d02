"""The experiment spec: its schema, YAML loading with line numbers, ``--set`` overrides, sweeps.

A spec is the whole description of a run (or of a grid of runs). It is checked here, before
anything heavy starts, and every problem is reported at once with the file, the line and the
dotted key path, so ``dbx validate`` can answer in a fraction of a second. That is also why this
module must never import torch or mlflow.

Loading goes: text -> YAML node tree (our own safe loader) -> plain Python data plus a map from
key path to line -> ``--set`` overrides -> pydantic validation -> ``Spec``. Pydantic's error
locations are key paths, so the line map turns each of them into ``file:line``.
"""
from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Collection, Literal, Sequence

import yaml
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dbx.errors import UserError

__all__ = [
    "Problem",
    "SpecError",
    "PluginSpec",
    "DataSpec",
    "ModelSpec",
    "OptimizerSpec",
    "LossSpec",
    "ScheduleSpec",
    "TrackingSpec",
    "Spec",
    "load_spec",
    "parse_spec",
    "spec_from_dict",
    "apply_overrides",
    "expand_sweep",
]

Path = tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where it is, which key, and what to do about it."""

    where: str
    key: str
    message: str

    def __str__(self) -> str:
        if self.key:
            return f"{self.where}: {self.key}: {self.message}"
        return f"{self.where}: {self.message}"


class SpecError(UserError):
    """The spec is wrong. ``problems`` holds every problem found, in file order."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        self.data: Any = None  # the document as read, when it could be read
        self.where: Any = None  # key path -> "file:line", alongside ``data``
        self.poisoned: Collection[Path] = ()  # key paths whose value could not be read (already reported)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

# Strict types: YAML ``true`` must not pass for a number, nor ``"3"`` for an int. Ints are still
# accepted where floats are expected (pydantic's strict float allows them).
StrictStr = Annotated[str, Strict()]
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
Number = Annotated[float, Strict(), AllowInfNan(False)]
#: The largest count a spec may hold (batch sizes, epochs of a schedule, ...): far above any real
#: run, and small enough that a typo with twenty digits is an error, not a run that never ends.
MAX_COUNT = 2**31 - 1
MAX_EPOCHS = 1_000_000
MAX_SEED = 2**32 - 1  # what every generator dbx and its plugins seed (numpy's legacy one too) accepts
PositiveInt = Annotated[int, Strict(), Field(gt=0, le=MAX_COUNT)]

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


class _Section(BaseModel):
    """Base of every spec block: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class PluginSpec(_Section):
    """A plugin chosen by name, with keyword parameters checked against its signature later."""

    name: StrictStr = Field(min_length=1, description="the plugin's registered name (see `dbx plugins`)")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments for the plugin's factory; checked against its signature",
    )


class ModelSpec(PluginSpec):
    """The network: a ``dbx.models`` plugin and its parameters."""

    sync_batchnorm: StrictBool = Field(
        False, description="under torchrun on CUDA, BatchNorm statistics over the whole global batch "
                           "(SyncBatchNorm) instead of each rank's share; no effect in one process",
    )


class DataSpec(PluginSpec):
    """The dataset: a ``dbx.datasets`` plugin, where its files are, and how much of it to use."""

    root: StrictStr | None = Field(None, description="directory with the data files; ~ and $VARS are expanded")
    subset: PositiveInt | None = Field(
        None, description="train on a fixed random subset of N training samples, the same for every seed"
    )


#: The keys of the SGD shorthand, ``optimizer: {lr, momentum, weight_decay, nesterov}``, and the
#: defaults they have always had with ``name: sgd`` (momentum 0.9, unlike torch.optim.SGD's 0).
SGD_SHORTHAND_DEFAULTS: dict[str, Any] = {"momentum": 0.9, "weight_decay": 0.0, "nesterov": False}


class OptimizerSpec(_Section):
    """The optimizer: a ``dbx.optimizers`` plugin by name (every ``torch.optim`` class is one).

    Two forms, one meaning. The SGD shorthand of earlier versions stays valid:
    ``optimizer: {lr: 0.1, momentum: 0.9, weight_decay: 5e-4, nesterov: false}``. The general form
    names the optimizer and passes its constructor's keyword arguments in ``params``:
    ``optimizer: {name: adamw, params: {lr: 3e-4, weight_decay: 0.1, betas: [0.9, 0.95]}}``
    (``params`` is checked against the constructor's signature, as for every plugin). ``lr`` may
    be written beside ``name`` or inside ``params``, once; it is the rate at the initial batch
    size, from which the schedule and ``lr_scaling`` start.
    """

    name: StrictStr = Field(
        "sgd", min_length=1,
        description="the optimizer's registered name: sgd, adamw, adam, ... (any torch.optim class, lower case, "
                    "or a dbx.optimizers plugin; see `dbx plugins`)",
    )
    lr: Number | None = Field(
        None, gt=0,
        description="learning rate at the initial batch size (may be given as params.lr instead); required",
    )
    momentum: Number | None = Field(
        None, ge=0, lt=1, description="SGD shorthand: momentum in [0, 1); with name sgd it defaults to 0.9"
    )
    weight_decay: Number | None = Field(
        None, ge=0, description="SGD shorthand: L2 weight decay (default 0); for other optimizers use params"
    )
    nesterov: StrictBool | None = Field(
        None, description="SGD shorthand: Nesterov momentum, needs momentum > 0 (default false)"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="keyword arguments of the optimizer's constructor (betas, eps, weight_decay, ...); "
                    "checked against its signature",
    )

    @field_validator("momentum", "weight_decay", "nesterov")
    @classmethod
    def _shorthand_is_for_sgd(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.data.get("name")
        if value is not None and name is not None and name != "sgd":
            raise ValueError(f"{info.field_name} beside name is SGD shorthand; for optimizer {name!r} write it in "
                             f"params (e.g. params: {{{info.field_name}: ...}}), as the constructor names it")
        return value

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        momentum = info.data.get("momentum")
        if value and momentum is not None and momentum <= 0:
            raise ValueError("nesterov: true needs momentum > 0; set momentum (e.g. 0.9) or nesterov: false")
        return value

    @field_validator("params")
    @classmethod
    def _each_setting_once(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        twice = [key for key in ("lr", *SGD_SHORTHAND_DEFAULTS) if key in value and info.data.get(key) is not None]
        if twice:
            key = twice[0]
            raise ValueError(f"{key} is given twice, as optimizer.{key} and optimizer.params.{key}; keep one")
        if "lr" in value:
            lr = value["lr"]
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"params.lr must be a positive number, got {_show(lr)}")
        elif info.data.get("lr") is None and "lr" in info.data:
            raise ValueError("missing the learning rate: set optimizer.lr (or optimizer.params.lr), "
                             "the rate at the initial batch size")
        return value

    @model_validator(mode="after")
    def _sgd_defaults(self) -> "OptimizerSpec":
        """With ``name: sgd``, the shorthand keys keep the defaults they always had (so
        ``{lr: 0.1}`` and ``{name: sgd, params: {lr: 0.1}}`` are the same optimizer)."""
        if self.name == "sgd":
            for key, default in SGD_SHORTHAND_DEFAULTS.items():
                if getattr(self, key) is None and key not in self.params:
                    setattr(self, key, default)
        return self

    @property
    def base_lr(self) -> float:
        """The learning rate at the initial batch size, wherever the spec wrote it."""
        return float(self.lr if self.lr is not None else self.params["lr"])

    def constructor_kwargs(self) -> dict[str, Any]:
        """Everything the optimizer's constructor receives besides the model's parameters."""
        shorthand = {key: getattr(self, key) for key in SGD_SHORTHAND_DEFAULTS if getattr(self, key) is not None}
        return {**shorthand, **{k: v for k, v in self.params.items() if k != "lr"}, "lr": self.base_lr}


class LossSpec(_Section):
    """The training loss: a ``dbx.losses`` plugin, or null for the one the data implies."""

    name: StrictStr | None = Field(
        None, min_length=1,
        description="cross_entropy | mse | huber | a dbx.losses plugin; null: cross_entropy for classes and "
                    "tokens, mse for regression",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="keyword arguments of the loss (cross_entropy: label_smoothing, ignore_index; huber: delta)",
    )

    @field_validator("params")
    @classmethod
    def _params_need_a_name(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if value and info.data.get("name") is None and "name" in info.data:
            raise ValueError("params need a loss name, e.g. loss: {name: cross_entropy, params: {label_smoothing: 0.1}}")
        return value


class ScheduleSpec(_Section):
    """How the learning rate changes over epochs (on top of batch-size scaling).

    Every schedule is a function of the epoch alone, so it keeps its shape when the batch size
    (and so the number of steps per epoch) changes, and a resumed run needs no scheduler state.
    """

    name: Literal["constant", "cosine", "linear", "onecycle", "multistep", "step"] = Field(
        "constant", description="constant | cosine | linear | onecycle | multistep | step"
    )
    t_max: PositiveInt | None = Field(
        None, description="cosine and linear: the decay's length in epochs; null means `epochs`"
    )
    milestones: list[PositiveInt] = Field(
        default_factory=list,
        validate_default=True,
        description="multistep: epochs at which lr is multiplied by gamma, strictly increasing",
    )
    gamma: Number = Field(0.1, gt=0, le=1, description="multistep/step: factor applied at each decay")
    step_size: PositiveInt | None = Field(
        None, validate_default=True, description="step: decay every this many epochs (required for `step`)"
    )
    warmup_epochs: StrictInt = Field(
        0, ge=0,
        description="linear warm-up: epoch e <= warmup_epochs runs at e / warmup_epochs of the scheduled lr "
                    "(epoch 1 at 1/warmup_epochs, epoch warmup_epochs at the full rate); 0: none",
    )
    min_lr: Number = Field(0.0, ge=0, description="cosine, linear, onecycle: the lowest learning rate, reached at the end")
    pct_start: Number = Field(
        0.3, gt=0, lt=1, description="onecycle: the fraction of the epochs spent rising to lr"
    )
    div_factor: Number = Field(25.0, ge=1, description="onecycle: the first epoch's lr is lr / div_factor")

    @field_validator("milestones")
    @classmethod
    def _milestones_fit_the_schedule(cls, value: list[int], info: ValidationInfo) -> list[int]:
        if info.data.get("name") == "multistep" and not value:
            raise ValueError("schedule 'multistep' needs milestones, e.g. milestones: [30, 60, 90]")
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {value}")
        return value

    @field_validator("step_size")
    @classmethod
    def _step_needs_step_size(cls, value: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("name") == "step" and value is None:
            raise ValueError("schedule 'step' needs step_size, e.g. step_size: 30")
        return value

    @field_validator("warmup_epochs")
    @classmethod
    def _onecycle_warms_up_itself(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("name") == "onecycle":
            raise ValueError("schedule 'onecycle' rises on its own (pct_start, div_factor); set warmup_epochs: 0")
        return value


class TrackingSpec(_Section):
    """Where MLflow records the run."""

    uri: StrictStr | None = Field(
        None, description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here"
    )
    experiment: StrictStr | None = Field(None, description="MLflow experiment name; null: the spec's name")
    system_metrics: StrictBool = Field(True, description="log CPU/GPU/memory use alongside the run")


class CheckpointSpec(_Section):
    """End-of-epoch checkpoints, so that a killed run can be resumed with ``dbx resume RUN_ID``."""

    enabled: StrictBool = Field(True, description="write a checkpoint at the end of every epoch")
    keep_last: PositiveInt = Field(2, description="how many of the newest checkpoints to keep")
    dir: StrictStr | None = Field(
        None, description="folder for checkpoints; null: beside the MLflow store (dbx-checkpoints/<run id>)"
    )


def _sweep_key_problem(key: str) -> str | None:
    for path in sweep_key_paths(key):
        message = "a sweep cannot vary 'sweep' itself" if path[0] == "sweep" else _path_problem(path)
        if message:
            return message
    return None


def _check_sweep_key(key: str) -> str:
    message = _sweep_key_problem(key)
    if message:
        raise ValueError(message)
    return key


SweepKey = Annotated[str, AfterValidator(_check_sweep_key)]
SweepValues = Annotated[list[Any], Field(min_length=1)]


class Spec(_Section):
    """One experiment: what to train, how, with which batch-size policy, and where to log it."""

    name: StrictStr = Field(pattern=NAME_PATTERN, description="run name: letters, digits, '_', '.', '-'")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="seed for weights, data order and plugins")
    device: StrictStr = Field("auto", pattern=DEVICE_PATTERN, description="auto | cpu | cuda | cuda:N")
    data: DataSpec = Field(description="the dataset plugin and its parameters")
    model: ModelSpec = Field(description="the model plugin and its parameters")
    optimizer: OptimizerSpec = Field(description="the optimizer (sgd, adamw, ... or a plugin) and its settings; lr is required")
    loss: LossSpec = Field(default_factory=LossSpec, description="the training loss; by default the one the data implies")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="learning-rate schedule")
    epochs: StrictInt = Field(gt=0, le=MAX_EPOCHS, description="number of passes over the training data")
    policy: PluginSpec = Field(description="the batch-size policy plugin: fixed, adabatch, divebatch, ...")
    estimator: PluginSpec = Field(
        default_factory=lambda: PluginSpec(name="exact"),
        description="the gradient-diversity estimator, used when the policy needs one",
    )
    lr_scaling: Literal["none", "linear", "sqrt", "auto"] = Field(
        "none",
        description="how lr follows batch-size changes: none | linear | sqrt | auto (linear for SGD, sqrt for "
                    "adaptive optimizers such as Adam); none keeps the schedule as written",
    )
    clip_grad_norm: Number | None = Field(
        None, gt=0,
        description="clip the gradient's global L2 norm to this value before each optimizer step (the estimator "
                    "has already read the unclipped per-sample gradients); null: no clipping",
    )
    target_accuracy: Number | None = Field(
        None, ge=0, le=1, description="test accuracy that counts as 'reached' for time-to-target"
    )
    target_perplexity: Number | None = Field(
        None, ge=1,
        description="sequence tasks: test perplexity (lower is better) that counts as 'reached' for time-to-target",
    )
    max_micro_batch: PositiveInt | None = Field(
        None, description="largest physical batch; larger logical batches are accumulated"
    )
    eval_batch_size: PositiveInt = Field(1024, description="batch size for evaluation")
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none", description="mixed precision for forward/backward: none | bf16 | fp16 (fp16 needs CUDA)"
    )
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop", description="a NaN/inf loss: stop the run as FAILED, or skip that optimizer step"
    )
    compile: StrictBool = Field(
        False, description="torch.compile the model for the plain training steps, its batch dimension dynamic (one "
        "compilation for every batch size); measuring steps and evaluation run eagerly"
    )
    cuda_graphs: StrictBool = Field(
        False, description="CUDA only: capture the plain training step as a CUDA graph per batch shape and replay it "
        "(measuring steps run eagerly); a step that cannot be captured trains without graphs, with a message"
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="checkpoints for resuming")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow settings")
    sweep: dict[SweepKey, SweepValues] | None = Field(
        None, description="grid of runs: dotted key path -> list of values, e.g. {seed: [0, 1, 2]}; keys joined by + vary "
        "together: {policy+lr_scaling: [[{name: fixed}, none], [{name: divebatch}, linear]]}"
    )

    @field_validator("target_perplexity")
    @classmethod
    def _one_target(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("target_accuracy") is not None:
            raise ValueError("give target_accuracy or target_perplexity, not both: time-to-target counts one of them")
        return value

    _origin: _Origin = PrivateAttr(default_factory=lambda: _Origin())

    def __eq__(self, other: object) -> bool:
        """Specs are equal when their settings are, wherever they were loaded from."""
        if not isinstance(other, Spec):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def where(self, key_path: tuple[str, ...] | str) -> str:
        """``file:line`` of the deepest key on ``key_path`` that the file has (for messages)."""
        path = _split_key(key_path) if isinstance(key_path, str) else tuple(key_path)
        return self._origin.where(path)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain JSON-safe Python, every default filled in."""
        return self.model_dump(mode="json")

    def flat_params(self) -> dict[str, str]:
        """``{"optimizer.lr": "0.1", ...}``: the resolved spec as flat strings, for MLflow params.

        MLflow refuses ``+`` in a param name, so a joint sweep key ``policy+lr_scaling`` is
        logged as ``sweep.policy/lr_scaling``."""
        flat: dict[str, str] = {}
        _flatten(self.to_dict(), (), flat)
        return {key.replace("+", "/"): value for key, value in flat.items()}

    def resolved_yaml(self) -> str:
        """YAML text of ``to_dict()``: what actually ran, saved beside the spec as given."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def source_text(self) -> str:
        """The spec file's text exactly as given ("" when built from a dict)."""
        return self._origin.text

    @property
    def source_path(self) -> str | None:
        """The spec file's path as the user gave it (None when not loaded from a file)."""
        return self._origin.path


def _flatten(value: Any, prefix: Path, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, prefix + (str(key),), out)
    elif prefix:
        out[".".join(prefix)] = _format_value(value)


def _format_value(value: Any) -> str:
    """Strings as they are, everything else as JSON (true, null, [1, 2], 0.0005)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


# --------------------------------------------------------------------------------------------
# Where things came from
# --------------------------------------------------------------------------------------------


@dataclass
class _Origin:
    """What a spec remembers about its source, so later errors can point at a line."""

    source: str = "<spec>"
    path: str | None = None
    text: str = ""
    lines: dict[Path, int] = field(default_factory=dict)
    assigned: dict[Path, str] = field(default_factory=dict)  # set by --set or a sweep: path -> where

    def where(self, path: Path) -> str:
        for n in range(len(path), 0, -1):  # an override (or sweep) that set this key or a parent
            if path[:n] in self.assigned:
                return self.assigned[path[:n]]
        for n in range(len(path), 0, -1):  # else the deepest key the file has on the path
            prefix = path[:n]
            if prefix in self.lines:
                return f"{self.source}:{self.lines[prefix]}"
            below = [where for p, where in self.assigned.items() if p[:n] == prefix]
            if below:  # a block only an override created, e.g. --set schedule.name=multistep
                return below[0]
        return self.source


def _split_key(key: str) -> Path:
    """``"a.b.c"`` -> ``("a", "b", "c")``; a sweep's own keys keep their dots: ``sweep.policy.name``."""
    head, dot, rest = key.partition(".")
    if head == "sweep" and dot:
        return ("sweep", rest)
    return tuple(key.split("."))


def _split_sweep_key(key: str) -> Path:
    return tuple(key.split("."))


def _joint_value_problem(joint: list[Path], value: Any) -> str | None:
    if len(joint) == 1 or (isinstance(value, list) and len(value) == len(joint)):
        return None
    keys = ", ".join(".".join(path) for path in joint)
    return f"each value of a joint key must be a list of {len(joint)} values, one per key ({keys}), got {_format_value(value)}"


def sweep_key_paths(key: str) -> list[Path]:
    """The key paths one sweep key sets: ``"seed"`` -> ``[("seed",)]``; keys joined by ``+`` vary
    together, one value per key in each entry: ``"policy+lr_scaling"`` -> ``[("policy",), ("lr_scaling",)]``."""
    return [_split_sweep_key(part.strip()) for part in key.split("+")]


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("null", "bool", "int", "float", "str")}

# YAML 1.1 wants a dot and a signed exponent in a float, so PyYAML reads 5e-4 and 1e3 as strings.
# This also takes an unsigned exponent and a missing dot; .inf and .nan are kept.
_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that reads 5e-4 as a float and leaves dates as strings (specs have no dates)."""


_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_TAG + "float", _TAG + "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(_TAG + "float", _FLOAT, list("-+0123456789."))


class _Reader:
    """Turns a composed YAML node tree into plain data, noting each key's line on the way.

    Walking the nodes ourselves (rather than ``yaml.load``) is what lets us see duplicate keys,
    which PyYAML silently collapses, and refuse every tag that is not plain data.
    """

    #: How many values (scalars, lists, mappings) a document may hold once its aliases are
    #: expanded. Aliases are read once and shared, but whatever walks the data later (validation,
    #: MLflow params) expands them: nine nested aliases of nine items are 387 million values.
    MAX_VALUES = 100_000

    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self.loader = loader
        self.source = source
        self.lines: dict[Path, int] = {}
        self.problems: list[Problem] = []
        self.poisoned: set[Path] = set()  # paths whose value could not be read at all
        self._done: dict[int, Any] = {}
        self._active: set[int] = set()
        self._sizes: dict[int, int] = {}  # node -> number of values once expanded

    def problem(self, node: yaml.Node, path: Path, message: str, poison: bool = False) -> None:
        self.problems.append(Problem(f"{self.source}:{node.start_mark.line + 1}", ".".join(path), message))
        if poison:
            self.poisoned.add(path)

    def read(self, node: yaml.Node, path: Path) -> Any:
        if id(node) in self._active:
            self.problem(node, path, "recursive YAML alias; write the value out instead", poison=True)
            return None
        if id(node) in self._done:  # an alias: same value, its keys' lines stay at the anchor
            return self._done[id(node)]
        self._active.add(id(node))
        try:
            value = self._read(node, path)
        finally:
            self._active.discard(id(node))
        if self._sizes.get(id(node), 1) > self.MAX_VALUES:
            self.problem(node, path, f"YAML aliases expand this value to more than {self.MAX_VALUES:,} values "
                                     f"(an alias bomb?); write the values out instead", poison=True)
            value, self._sizes[id(node)] = None, 1
        self._done[id(node)] = value
        return value

    def _size(self, nodes: Sequence[yaml.Node]) -> int:
        """1 for a list or mapping itself, plus what each of its items expands to."""
        return 1 + sum(self._sizes.get(id(n), 1) for n in nodes)

    def _read(self, node: yaml.Node, path: Path) -> Any:
        if isinstance(node, yaml.MappingNode) and node.tag == _TAG + "map":
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode) and node.tag == _TAG + "seq":
            items = []
            for index, item in enumerate(node.value):
                self.lines[path + (str(index),)] = item.start_mark.line + 1
                items.append(self.read(item, path + (str(index),)))
            self._sizes[id(node)] = self._size(node.value)
            return items
        if isinstance(node, yaml.ScalarNode) and node.tag in _SCALAR_TAGS:
            try:
                return self.loader.construct_object(node)
            except (ValueError, KeyError):  # e.g. "!!int abc", "!!bool maybe"
                self.problem(node, path, f"cannot read {node.value!r} as {node.tag.replace(_TAG, '!!')}", True)
                return None
        if isinstance(node, yaml.ScalarNode) and node.tag in (_TAG + "merge", _TAG + "value"):
            return node.value
        tag = node.tag.replace(_TAG, "!!")
        self.problem(node, path, f"unsupported YAML tag {tag!r}; a spec holds plain values, lists and mappings", True)
        return None

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        own = {id(k) for k, _ in node.value if k.tag != _TAG + "merge"}
        self.loader.flatten_mapping(node)  # resolves "<<: *anchor" merges; merged keys come first
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, path, "a key must be a plain name, not a list or mapping", poison=True)
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if id(key_node) in own:  # merged keys may be overridden; written ones may not repeat
                if key in first_line:
                    self.problem(key_node, path + (key,), f"duplicate key {key!r} (first at line {first_line[key]})")
                first_line.setdefault(key, line)
            self.lines[path + (key,)] = line  # the value kept is the last one, so is its line
            result[key] = self.read(value_node, path + (key,))
        self._sizes[id(node)] = self._size([value for _, value in node.value]) + len(node.value)
        return result


def _yaml_problem(exc: yaml.YAMLError, text: str, source: str) -> Problem:
    """One line saying where the YAML is broken (line and column, 1-based) and how."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "unreadable"
        if exc.context and what.startswith("but "):  # "expected a single document..., but found ..."
            what = f"{exc.context}, {what}"
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    elif isinstance(exc, yaml.reader.ReaderError):  # a control character, or bad encoding
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        what = str(exc.reason)
        if isinstance(exc.character, int):
            what = f"unacceptable character #x{exc.character:04x}: {what}"
    else:
        line = column = None
        what = str(exc).splitlines()[0]
    if line is None:
        return Problem(source, "", f"invalid YAML: {what}")
    return Problem(f"{source}:{line}", "", f"invalid YAML at line {line}, column {column}: {what}")


def _read_yaml(text: str, source: str) -> tuple[Any, _Reader]:
    """Plain data from YAML text, with the reader that holds its line map and problems.

    A syntax error ends reading at once (nothing after it can be trusted) as a SpecError.
    """
    loader = None
    try:
        loader = _SpecLoader(text)  # the reader checks the characters already
        node = loader.get_single_node()
        reader = _Reader(loader, source)
        return (None if node is None else reader.read(node, ())), reader
    except yaml.YAMLError as exc:  # also a malformed merge, "<<: 3", found while reading
        raise SpecError([_yaml_problem(exc, text, source)]) from exc
    except RecursionError as exc:
        raise SpecError([Problem(source, "", "invalid YAML: nested too deeply")]) from exc
    finally:
        if loader is not None:
            loader.dispose()


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _is_open_mapping(annotation: Any) -> bool:
    """True for ``params`` and ``sweep``: mappings whose keys the schema does not fix."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if is_union else (annotation,)
    return any(typing.get_origin(option) is dict for option in options)


def _model_at(path: Path) -> type[BaseModel] | None:
    """The schema block at ``path`` (``()`` is ``Spec``), or None when it is not a block."""
    model: type[BaseModel] | None = Spec
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        model = _submodel(model.model_fields[part].annotation)
    return model


def _did_you_mean(key: str, choices: Sequence[str]) -> str:
    guess = difflib.get_close_matches(key, list(choices), n=1)
    if guess:
        return f" Did you mean {guess[0]!r}?"
    return f" Valid keys: {', '.join(choices)}."


def _path_problem(path: Path) -> str | None:
    """Why ``path`` is not a key of the schema, or None when it is (or lies inside ``params``)."""
    if not path or any(part == "" for part in path):
        return f"{'.'.join(path)!r} is not a key path; write it like optimizer.lr"
    model: type[BaseModel] = Spec
    for depth, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            where = f"in {'.'.join(path[:depth])!r}" if depth else "in the spec"
            return f"no such key {part!r} {where}.{_did_you_mean(part, list(fields))}"
        annotation = fields[part].annotation
        sub = _submodel(annotation)
        if sub is not None:
            model = sub
        elif _is_open_mapping(annotation):
            return None
        elif depth < len(path) - 1:
            return f"{'.'.join(path[: depth + 1])!r} is a single value; it has no key {path[depth + 1]!r}"
    return None


def _parse_value(text: str) -> tuple[Any, str | None]:
    """A ``--set`` value read as YAML, so 5e-4, [1, 2], true and null mean what they do in a file."""
    try:
        data, reader = _read_yaml(text, "value")
    except SpecError as exc:
        return None, exc.problems[0].message
    if reader.problems:
        return None, reader.problems[0].message
    return data, None


def _set_path(data: dict[str, Any], path: Path, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``path`` set. Mappings along the way are copied, never mutated
    (YAML aliases may share them), and created where missing or null."""
    root = dict(data)
    node = root
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif isinstance(child, dict):
            child = dict(child)
        else:
            prefix = ".".join(path[: depth + 1])
            raise ValueError(f"{prefix!r} is {_show(child)}, not a mapping; set it whole, e.g. {prefix}={{...}}")
        node[part] = child
        node = child
    node[path[-1]] = value
    return root


def _try_set(data: dict[str, Any], path: Path, value: Any) -> tuple[dict[str, Any], str | None]:
    """``data`` with ``path`` set, or the unchanged data and why the path cannot be set."""
    try:
        return _set_path(data, path, value), None
    except ValueError as exc:
        return data, str(exc)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[Problem]]:
    """Apply ``KEY=VALUE`` strings to spec data; returns new data (the input is left alone).

    A key must name a key of the schema, except inside ``params`` (plugins check their own) and
    ``sweep``, so a typo never invents a setting that nothing reads.
    """
    data, problems, _ = _apply_overrides(data, overrides)
    return data, problems


def _apply_overrides(
    data: dict[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], list[Problem], dict[Path, str]]:
    """``apply_overrides``, also returning which override set which path (for ``Spec.where``)."""
    assigned: dict[Path, str] = {}
    problems: list[Problem] = []
    for override in overrides:
        where = f"--set {override}"
        key, equals, text = override.partition("=")
        key = key.strip()
        if not equals:
            problems.append(Problem(where, key, "expected KEY=VALUE, e.g. --set optimizer.lr=0.05"))
            continue
        path = _split_key(key)
        message = _path_problem(path)
        value, value_error = _parse_value(text)
        if message is None and value_error is not None:
            message = f"cannot read the value {text!r}: {value_error}"
        if message is None:
            data, message = _try_set(data, path, value)
        if message is not None:
            problems.append(Problem(where, key, message))
            continue
        assigned[path] = where
    return data, problems, assigned


# --------------------------------------------------------------------------------------------
# Validation and friendly messages
# --------------------------------------------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_BOUND_KEYS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}
_PATTERN_HINTS = {
    "name": "use letters, digits, '_', '.' and '-' only",
    "device": "use auto, cpu, cuda or cuda:N (e.g. cuda:1)",
}


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, with its type when that helps."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (bool)"
    kind = {dict: "mapping", list: "list"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


def _number(bound: Any) -> str:
    if isinstance(bound, float) and bound.is_integer():
        return str(int(bound))
    return str(bound)


def _field_info(path: Path) -> Any:
    model = _model_at(path[:-1]) if path else None
    if model is None or path[-1] not in model.model_fields:
        return None
    return model.model_fields[path[-1]]


def _friendly(error: dict[str, Any], path: Path) -> str:
    """Pydantic's message rewritten to say what is wrong with the value and how to fix it."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    key = path[-1] if path else ""
    if kind == "missing":
        info = _field_info(path)
        hint = f" ({info.description})" if info is not None and info.description else ""
        return f"missing required key {key!r}{hint}"
    if kind == "extra_forbidden":
        model = _model_at(path[:-1])
        if model is OptimizerSpec and not difflib.get_close_matches(key, list(model.model_fields), n=1):
            return (f"unknown key {key!r}. The optimizer's own settings go in optimizer.params, "
                    f"e.g. params: {{{key}: ...}}; beside name only lr (and, for sgd, momentum, weight_decay, "
                    f"nesterov) may be written")
        return f"unknown key {key!r}." + (_did_you_mean(key, list(model.model_fields)) if model else "")
    if kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {_show(value)}"
        if kind == "string_type" and isinstance(value, (int, float)):
            message += "; put it in quotes to make it a string"
        block = _model_at(path)
        if kind.startswith("model") and isinstance(value, str) and block and "name" in block.model_fields:
            message += f"; write {{name: {value}}}"
        return message
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {_number(ctx[_BOUND_KEYS[kind]])}, got {value}"
    if kind == "finite_number":
        return f"must be a finite number, got {value}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        message = f"must be one of {', '.join(choices)}; got {_show(value)}"
        guess = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
        return message + (f". Did you mean {guess[0]!r}?" if guess else "")
    if kind == "string_pattern_mismatch":
        return f"{value!r} is not allowed here: {_PATTERN_HINTS.get(key, 'must match ' + str(ctx.get('pattern')))}"
    if kind == "too_short" and path[:1] == ("sweep",):
        return "a sweep key needs at least one value, e.g. [0, 1, 2]"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return f"{error['msg']} (got {_show(value)})"


def _error_path(loc: tuple[Any, ...]) -> Path:
    return tuple(str(part) for part in loc if part != "[key]")


def _sort_problems(problems: list[Problem], source: str) -> list[Problem]:
    """File order: problems with a line first (by line), then whole-file ones, then --set ones."""

    def order(problem: Problem) -> tuple[int, int]:
        if problem.where.startswith("--set "):
            return (2, 0)
        line = problem.where[len(source) + 1 :] if problem.where.startswith(source + ":") else ""
        return (0, int(line)) if line.isdigit() else (1, 0)

    return sorted(problems, key=order)


def _validate(data: Any, origin: _Origin, earlier: Sequence[Problem] = (), poisoned: Collection[Path] = ()) -> Spec:
    """``data`` as a ``Spec``, or a SpecError with ``earlier`` problems and every schema problem."""
    problems = list(earlier)
    spec = None
    if not isinstance(data, dict):
        got = "an empty document" if data is None else _show(data)
        message = f"a spec must be a mapping of keys (name:, data:, model:, ...), got {got}"
        problems.append(Problem(origin.where(()), "", message))
    else:
        try:
            spec = Spec.model_validate(data)
        except ValidationError as exc:
            for error in exc.errors():
                path = _error_path(error["loc"])
                if any(path[:n] in poisoned for n in range(len(path) + 1)):
                    continue  # already reported: the value could not be read
                problems.append(Problem(origin.where(path), ".".join(path), _friendly(error, path)))
    if problems or spec is None:
        error = SpecError(_sort_problems(problems, origin.source))
        error.data, error.where = data, origin.where  # so plugin names can still be checked
        error.poisoned = poisoned
        raise error
    spec._origin = origin
    return spec


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_spec(text: str, *, source: str = "<spec>", overrides: Sequence[str] = ()) -> Spec:
    """A validated Spec from YAML text; ``source`` names it in messages (a path, usually)."""
    return _parse(text, source=source, path=None, overrides=overrides)


def _parse(text: str, *, source: str, path: str | None, overrides: Sequence[str]) -> Spec:
    data, reader = _read_yaml(text, source)
    origin = _Origin(source=source, path=path, text=text, lines=reader.lines)
    problems = list(reader.problems)
    if isinstance(data, dict):
        data, override_problems, origin.assigned = _apply_overrides(data, overrides)
        problems += override_problems
    return _validate(data, origin, problems, reader.poisoned)


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Spec:
    """Read, override and validate a spec file; every problem is raised at once as a SpecError."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise SpecError([Problem(name, "", f"spec file not found: {name}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem(name, "", f"cannot read spec file: {exc}")]) from None
    return _parse(text, source=name, path=name, overrides=overrides)


def spec_from_dict(data: dict[str, Any], *, source: str = "<spec>") -> Spec:
    """A validated Spec from plain Python data (tests, programmatic use)."""
    return _validate(data, _Origin(source=source))


def expand_sweep(spec: Spec) -> list[tuple[str, Spec]]:
    """The sweep's grid as ``(label, spec)`` pairs, in the order the keys are written.

    Each point is a full Spec without a sweep, validated on its own; problems point at the sweep
    key's line. A spec without a sweep is one point with an empty label.
    """
    if not spec.sweep:
        return [("", spec)]
    origin = spec._origin
    base = spec.to_dict()
    base["sweep"] = None
    keys = list(spec.sweep)
    paths = [sweep_key_paths(key) for key in keys]
    places = {path: origin.where(("sweep", key)) for key, joint in zip(keys, paths) for path in joint}
    problems: dict[tuple[str, str, str], Problem] = {}
    points: list[tuple[str, Spec]] = []
    for values in itertools.product(*(spec.sweep[key] for key in keys)):
        label = ",".join(f"{key}={_format_value(value)}" for key, value in zip(keys, values))
        data = base
        point_problems: list[Problem] = []
        for key, joint, value in zip(keys, paths, values):
            message = _sweep_key_problem(key) or _joint_value_problem(joint, value)
            for path, part in zip(joint, value if len(joint) > 1 else [value]):
                if message is None:
                    data, message = _try_set(data, path, part)
            if message is not None:
                point_problems.append(Problem(places[joint[0]], f"sweep.{key}", message))
        point_origin = _Origin(origin.source, origin.path, origin.text, origin.lines, {**origin.assigned, **places})
        try:
            points.append((label, _validate(data, point_origin, point_problems)))
        except SpecError as exc:
            for p in exc.problems:  # the same problem in many points is reported once, for the first
                labelled = Problem(p.where, p.key, f"{p.message} (sweep point {label})")
                problems.setdefault((p.where, p.key, p.message), labelled)
    if problems:
        raise SpecError(_sort_problems(list(problems.values()), origin.source))
    return points


Spec.model_rebuild()
