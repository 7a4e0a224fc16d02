"""Every registered model: the factory contract (output shape, regression head, params from the
signature), and the convolutional models' architecture and flags."""
import pytest
import torch
from torch import nn

from dbx import registry
from dbx.models.cnn import small_cnn
from dbx.models.resnet import resnet18, resnet18_cifar

MODELS = sorted(registry.available("model"))
SEQUENCE_MODELS = {"transformer_lm", "transformers"}  # checked on token data in test_contracts.py
# The library adapters are told which architecture to build; every other model builds with params: {}.
REQUIRED = {"torchvision": {"arch": "resnet18"}, "timm": {"arch": "test_resnet"}, "transformers": {"model_type": "vit"}}
SMALL = {"transformers": {"model_type": "vit", "config": {"num_hidden_layers": 1, "hidden_size": 16,
                                                          "num_attention_heads": 2, "intermediate_size": 32}},
         "vit": {"width": 32, "depth": 2, "heads": 2}}


@pytest.mark.parametrize("name", [m for m in MODELS if m not in SEQUENCE_MODELS])
@pytest.mark.parametrize("num_classes, outputs", [(7, 7), (None, 1)])
def test_every_image_model_maps_a_batch_to_one_row_of_outputs_per_sample(name, num_classes, outputs):
    params = SMALL.get(name, REQUIRED.get(name, {}))
    model = registry.build("model", name, params, num_classes=num_classes, input_shape=(3, 32, 32))
    assert isinstance(model, nn.Module)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, outputs)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_has_a_param_schema_without_injected_keys(name):
    schema, _ = registry.params_of("model", registry.load("model", name))
    assert "num_classes" not in schema and "input_shape" not in schema
    assert {key for key, p in schema.items() if p.required} == set(REQUIRED.get(name, {}))


def test_resnet18_cifar_is_the_cifar_variant():
    model = resnet18_cifar(num_classes=10, input_shape=(3, 32, 32))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # as kuangliu/pytorch-cifar's ResNet18
    assert resnet18_cifar(num_classes=10, input_shape=(1, 28, 28))(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_is_torchvisions_from_scratch():
    model = resnet18(num_classes=200, input_shape=(3, 64, 64))
    assert model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, nn.MaxPool2d)
    assert model.fc.out_features == 200
    again = resnet18(num_classes=200, input_shape=(3, 64, 64))
    assert not torch.equal(model.conv1.weight, again.conv1.weight)  # random init, no pretrained weights


def test_small_cnn_shapes_and_options():
    model = small_cnn(num_classes=10, input_shape=(1, 28, 28), channels=[4, 8, 8], hidden=16, batch_norm=True,
                      dropout=0.1)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    tiny = small_cnn(num_classes=10, input_shape=(1, 8, 8), channels=[4, 4, 4, 4])  # pooling stops at 1x1
    assert tiny(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="image inputs"):
        small_cnn(num_classes=2, input_shape=(10,))


def test_channels_last_and_compile_flags():
    model = resnet18_cifar(num_classes=10, input_shape=(3, 32, 32), channels_last=True)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    compiled = small_cnn(num_classes=10, input_shape=(1, 28, 28), compile=True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)  # compiled lazily, at the first call
    assert registry.check_params("model", "resnet18", {"channels_last": True, "compile": False}) == []
    assert registry.check_params("model", "resnet18_cifar", {"channels_last": "yes please"})


def test_small_cnn_learns_digits():
    from dbx.data.digits import digits
    from dbx.data.loader import make_loader

    torch.manual_seed(0)
    splits = digits(seed=0)
    model = small_cnn(num_classes=10, input_shape=splits.input_shape, channels=[8], hidden=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = make_loader(splits.train, batch_size=64, shuffle=True, device="cpu", seed=0)
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    x, y = splits.test
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.85
