"""The fully connected model factories: output shapes, regression, and param validation."""
import pytest
import torch
from torch import nn

from dbx import registry
from dbx.models.linear import logreg
from dbx.models.mlp import mlp


@pytest.mark.parametrize("input_shape", [(7,), (1, 4, 4)])
@pytest.mark.parametrize("num_classes, width", [(3, 3), (None, 1)])
def test_logreg_and_mlp_output_shapes(input_shape, num_classes, width):
    x = torch.randn(5, *input_shape)
    assert logreg(num_classes=num_classes, input_shape=input_shape)(x).shape == (5, width)
    assert mlp(num_classes=num_classes, input_shape=input_shape, widths=[8, 4])(x).shape == (5, width)


def test_logreg_is_one_linear_layer():
    model = logreg(num_classes=2, input_shape=(10,), bias=False)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].bias is None and linears[0].weight.shape == (2, 10)


def test_mlp_layers_follow_the_params():
    model = mlp(num_classes=4, input_shape=(6,), widths=[16, 8], activation="tanh", dropout=0.5)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", "Linear", "Tanh", "Dropout", "Linear", "Tanh", "Dropout", "Linear"]
    assert [type(m).__name__ for m in mlp(num_classes=2, input_shape=(3,), widths=[])] == ["Flatten", "Linear"]


def test_mlp_params_are_validated_from_the_signature():
    assert registry.check_params("model", "mlp", {"widths": [32], "activation": "gelu", "dropout": 0.1}) == []
    problems = dict(registry.check_params("model", "mlp", {"widths": "wide", "activation": "swish"}))
    assert set(problems) == {("widths",), ("activation",)}
    assert registry.check_params("model", "logreg", {"num_classes": 3})  # injected, not settable


def test_bad_mlp_values_raise():
    with pytest.raises(ValueError, match="dropout"):
        mlp(num_classes=2, input_shape=(3,), dropout=1.0)
    with pytest.raises(ValueError, match="activation"):
        mlp(num_classes=2, input_shape=(3,), activation="swish")
