"""Build what a run trains from its spec: data, model, optimizer, loss, policy, estimator, loaders.

Every named part comes from the plugin registry, so a third-party dataset, model, optimizer,
loss, policy or estimator is built exactly like a built-in one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from dbx import registry
from dbx.data import resolve_root, take_subset
from dbx.data.loader import make_loader
from dbx.errors import UserError
from dbx.protocols import DataSplits
from dbx.train.compile import compile_for_training
from dbx.train.lr import resolve_lr_scaling
from dbx.train.tasks import Task, build_task


@dataclass
class Parts:
    data: DataSplits
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    policy: Any
    estimator: Any
    train_loader: Any
    test_loader: Any
    task: Task  # classification, regression or sequence, with the run's loss
    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype, None for full precision
    scaler: Any = None  # torch.amp.GradScaler for fp16
    lr_scaling: str = "none"  # the spec's rule, with ``auto`` resolved for this optimizer
    compiled: Any = None  # compile: true: the model as plain training steps call it (dbx.train.compile)
    net: Any = None  # what the training step calls: ``model`` in DDP under torchrun, else ``model`` itself

    @property
    def loss_fn(self) -> Callable[..., torch.Tensor]:
        """``loss_fn(outputs, targets, reduction="sum")``: the run's loss, as estimators call it."""
        return self.task.loss_fn

    def autocast(self) -> Any:
        """The forward passes' precision context (a no-op without amp)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def build_parts(spec: Any, device: torch.device) -> Parts:
    """Construct every part of a run on ``device``, seeded by ``spec.seed``. Under torchrun each
    rank builds the same parts and loads its slice of each batch (``dbx.distributed``)."""
    from dbx.distributed import rank, world_size
    from dbx.distributed.ddp import distributed_parts

    torch.manual_seed(spec.seed)
    data = registry.build("dataset", spec.data.name, spec.data.params,
                          root=resolve_root(spec.data.root), seed=spec.seed)
    if not isinstance(data, DataSplits):
        raise UserError(f"dataset {spec.data.name!r} returned {type(data).__name__}, not dbx.protocols.DataSplits")
    if spec.data.subset:
        data = take_subset(data, spec.data.subset, seed=0)  # the same subset for every seed of a sweep
    model = registry.build("model", spec.model.name, spec.model.params,
                           num_classes=data.num_classes, input_shape=tuple(data.input_shape)).to(device)
    shards = {"rank": rank(), "world_size": world_size()}
    train_loader = make_loader(data.train, batch_size=1, shuffle=True, device=device, seed=spec.seed,
                               augment=data.augment, **shards)
    policy = registry.build("policy", spec.policy.name, spec.policy.params,
                            dataset_size=train_loader.num_samples, seed=spec.seed)
    estimator = None
    if policy.uses_diversity:
        estimator = registry.build("estimator", spec.estimator.name, spec.estimator.params, seed=spec.seed)
    train_loader.set_batch_size(policy.initial_batch_size())
    if estimator is not None:  # an unsupported layer is the user's to fix: say so before any run starts
        estimator.attach(model)
        estimator.detach()
    test_loader = make_loader(data.test, batch_size=spec.eval_batch_size, shuffle=False, device=device,
                              seed=spec.seed, **shards)
    optimizer = build_optimizer(spec.optimizer, model)
    task = build_task(spec.loss, data)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.amp]
    if spec.amp == "fp16" and device.type != "cuda":
        raise UserError(f"amp: fp16 needs a CUDA device, and this run is on {device}. "
                        f"Use amp: bf16 (works on the CPU) or amp: none.")
    if spec.cuda_graphs and device.type != "cuda":
        raise UserError(f"cuda_graphs: true needs a CUDA device, and this run is on {device}. "
                        f"Use cuda_graphs: false (or compile: true, which works on the CPU).")
    scaler = torch.amp.GradScaler(device.type) if spec.amp == "fp16" else None
    if (spec.compile or spec.cuda_graphs) and world_size() > 1:
        raise UserError("compile: true and cuda_graphs: true are for one process; under torchrun (--nproc) set "
                        "them to false")
    compiled = compile_for_training(model) if spec.compile else None
    parts = Parts(data, model, optimizer, policy, estimator, train_loader, test_loader, task, device, amp_dtype,
                  scaler, resolve_lr_scaling(spec.lr_scaling, optimizer), compiled)
    return distributed_parts(parts, sync_batchnorm=spec.model.sync_batchnorm)


def build_optimizer(optimizer_spec: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The spec's optimizer over the model's parameters.

    ``dbx.optimizers`` plugins are constructed as torch.optim classes are:
    ``Factory(params, lr=..., **params_from_the_spec)``, the first argument the parameters.
    """
    name = optimizer_spec.name
    optimizer = registry.build("optimizer", name, optimizer_spec.constructor_kwargs(), params=model.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(f"optimizer {name!r} returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
    return optimizer
