"""Any architecture of an installed library by name, randomly initialised: torchvision, timm, Hugging Face.

- ``torchvision`` (``model: {name: torchvision, params: {arch: resnet50}}``): every classification
  builder of ``torchvision.models.list_models()``.
- ``timm`` (``{name: timm, params: {arch: convnext_atto}}``): every ``timm.list_models()`` name;
  needs the optional extra ``pip install "dbx[timm]"``.
- ``transformers`` (``{name: transformers, params: {model_type: gpt2, config: {n_layer: 2}}}``): a
  Hugging Face model built from a config (``AutoConfig.for_model(model_type, **config)``): a
  causal language model for sequence data (token ids ``(T,)``), an image classifier for images;
  needs ``pip install "dbx[transformers]"``.

Each adapts the model to the data: the number of classes (one output for regression), the
input channels (torchvision: a learned 1x1 convolution in front when the images do not have 3;
timm: ``in_chans``), the vocabulary (Hugging Face: ``vocab_size``). The model is tried once on a
batch of two blank inputs at construction, so a size it cannot take is an input error naming
the shapes, before any run starts.

Weights are always random: dbx never downloads anything. Asking for pretrained weights
(``weights:``, ``pretrained:``) is an input error; to fine-tune from a checkpoint, write a model
plugin that loads your local file (see docs/plugins.md).

Whether the ``exact`` diversity estimator can measure a library's model depends on its layers:
torchvision's and timm's convolutional networks are built from supported layers (BatchNorm
included); models with custom layers (Hugging Face's ``Conv1D`` in GPT-2, RMSNorm variants, a
class-token parameter) are refused by name at the start, and the ``subsampled`` estimator
measures them instead.
"""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from dbx.errors import UserError
from dbx.models.linear import num_outputs

__all__ = ["torchvision_model", "timm_model", "transformers_model"]

NO_DOWNLOADS = ("dbx builds {library} models with random weights and never downloads any; remove {key}, "
                "or load your own weights in a model plugin (docs/plugins.md)")


def torchvision_model(
    *,
    num_classes: int | None,
    input_shape: tuple[int, ...],
    arch: str,
    weights: str | None = None,
    kwargs: dict[str, Any] = {},  # noqa: B006 - never mutated; a dict so YAML mappings validate
) -> nn.Module:
    """torchvision's ``arch`` (e.g. ``resnet50``, ``mobilenet_v3_small``, ``vit_b_16``), from scratch.

    ``kwargs`` go to the builder (e.g. ``{dropout: 0.2}``); a ``vit_*`` model gets the data's
    ``image_size`` unless given. Images with other than 3 channels pass through a learned 1x1
    convolution to 3 first.
    """
    import torchvision

    if weights is not None:
        raise UserError(NO_DOWNLOADS.format(library="torchvision", key=f"weights: {weights}"))
    _check_images("torchvision", input_shape)
    names = torchvision.models.list_models(module=torchvision.models)
    _check_name("torchvision", "arch", arch, names)
    options = dict(kwargs)
    if arch.startswith("vit_"):
        options.setdefault("image_size", int(input_shape[1]))
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_outputs(num_classes), **options)
    except TypeError as exc:
        raise ValueError(f"torchvision {arch} does not take these kwargs {options}: {exc}") from exc
    if input_shape[0] != 3:
        model = nn.Sequential(nn.Conv2d(int(input_shape[0]), 3, kernel_size=1), model)
    _try_forward(f"torchvision {arch}", model, input_shape, (num_outputs(num_classes),))
    return model


def timm_model(
    *,
    num_classes: int | None,
    input_shape: tuple[int, ...],
    arch: str,
    pretrained: bool = False,
    kwargs: dict[str, Any] = {},  # noqa: B006 - never mutated
) -> nn.Module:
    """timm's ``arch`` from scratch, with ``in_chans`` and ``num_classes`` from the data.

    ``kwargs`` go to ``timm.create_model``; transformers trained on small images need the size,
    e.g. ``{img_size: 32}`` (and often ``patch_size``).
    """
    timm = _optional("timm", "timm")
    if pretrained:
        raise UserError(NO_DOWNLOADS.format(library="timm", key="pretrained: true"))
    _check_images("timm", input_shape)
    _check_name("timm", "arch", arch, timm.list_models())
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_outputs(num_classes),
                                  in_chans=int(input_shape[0]), **kwargs)
    except TypeError as exc:
        raise ValueError(f"timm {arch} does not take these kwargs {dict(kwargs)}: {exc}") from exc
    _try_forward(f"timm {arch}", model, input_shape, (num_outputs(num_classes),))
    return model


class HuggingFaceModel(nn.Module):
    """A ``transformers`` model seen as dbx expects: a tensor in, the logits tensor out."""

    def __init__(self, model: nn.Module, input_name: str) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.input_name: x}).logits


def transformers_model(
    *,
    num_classes: int | None,
    input_shape: tuple[int, ...],
    model_type: str,
    config: dict[str, Any] = {},  # noqa: B006 - never mutated
    pretrained: str | None = None,
) -> nn.Module:
    """A Hugging Face model of ``model_type`` (``gpt2``, ``llama``, ``bert``, ``vit``, ...) built from
    ``AutoConfig.for_model(model_type, **config)`` with random weights.

    Sequence data (token ids ``(T,)``): ``AutoModelForCausalLM``, with ``vocab_size`` set to the
    data's vocabulary. Images ``(C, H, W)``: ``AutoModelForImageClassification``, with
    ``num_labels``, ``num_channels`` and ``image_size`` from the data. ``config`` sets anything
    else (sizes, dropout: e.g. ``{n_layer: 2, n_embd: 64, n_head: 2}`` for gpt2).
    """
    transformers = _optional("transformers", "transformers")
    if pretrained is not None:
        raise UserError(NO_DOWNLOADS.format(library="Hugging Face", key=f"pretrained: {pretrained}"))
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    _check_name("Hugging Face transformers", "model_type", model_type, list(CONFIG_MAPPING.keys()))
    shape = tuple(int(v) for v in input_shape)
    settings = dict(config)
    if len(shape) == 1:
        if num_classes is None:
            raise ValueError("a Hugging Face language model needs sequence data with a vocabulary (num_classes)")
        settings.setdefault("vocab_size", int(num_classes))
        for special in ("bos_token_id", "eos_token_id"):  # the library's ids may lie outside this vocabulary
            settings.setdefault(special, None)  # and are unused: dbx trains, it never generates
        auto, input_name, expected = transformers.AutoModelForCausalLM, "input_ids", (shape[0], int(num_classes))
    elif len(shape) == 3:
        settings.setdefault("num_labels", num_outputs(num_classes))
        settings.setdefault("num_channels", shape[0])
        settings.setdefault("image_size", shape[1])
        auto, input_name, expected = (transformers.AutoModelForImageClassification, "pixel_values",
                                      (num_outputs(num_classes),))
    else:
        raise ValueError(f"the transformers adapter takes token ids (T,) or images (C, H, W), got {shape}")
    try:
        model_config = transformers.AutoConfig.for_model(model_type, **settings)
        if hasattr(model_config, "use_cache"):
            model_config.use_cache = False  # no key/value cache: dbx trains, it does not generate
        model = auto.from_config(model_config)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"transformers cannot build a {model_type} model for {'sequence' if len(shape) == 1 else 'image'} "
                         f"data from config {settings}: {exc}") from exc
    adapted = HuggingFaceModel(model, input_name)
    _try_forward(f"transformers {model_type}", adapted, shape, expected, tokens=num_classes if len(shape) == 1 else None)
    return adapted


def _optional(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"this model needs {module}, which is not installed: pip install \"dbx[{extra}]\"") from exc


def _check_images(library: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3:
        raise ValueError(f"{library} models take images (C, H, W), got input_shape {tuple(input_shape)}")


def _check_name(library: str, key: str, name: str, names: list[str]) -> None:
    if name in names:
        return
    guesses = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, guesses))}?" if guesses else ""
    raise ValueError(f"{library} has no {key} {name!r}.{hint} ({len(names)} are available; "
                     f"e.g. {', '.join(sorted(names)[:5])}, ...)")


def _try_forward(what: str, model: nn.Module, input_shape: tuple[int, ...], expected: tuple[int, ...],
                 tokens: int | None = None) -> None:
    """One forward of two blank inputs, so a size the model cannot take is found at construction."""
    shape = (2, *(int(v) for v in input_shape))
    x = torch.zeros(shape, dtype=torch.long) if tokens is not None else torch.zeros(shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the data's shape does not fit
        raise ValueError(f"{what} cannot take inputs of shape {tuple(input_shape)}: {type(exc).__name__}: "
                         f"{str(exc)[:300]}") from exc
    finally:
        model.train(was_training)
    if tuple(out.shape[1:]) != expected:
        raise ValueError(f"{what} gives outputs of shape {tuple(out.shape[1:])} per sample for inputs of "
                         f"{tuple(input_shape)}; dbx expects {expected}")
