"""Architectures of installed libraries by name (torchvision, timm, Hugging Face transformers), random
weights only, adapted to the data, each trained by `dbx run` with the real library."""
import pytest
import torch
from click.testing import CliRunner

from dbx.cli import main
from dbx.errors import UserError
from dbx.estimators import per_sample_sq_norms
from dbx.models.adapters import timm_model, torchvision_model, transformers_model
from dbx.train.losses import cross_entropy
from dbx.train.tasks import Task

DIGITS = """\
name: {name}
seed: 0
device: cpu
data: {{name: digits, subset: {subset}}}
model: {model}
optimizer: {{name: adam, lr: 1e-3}}
epochs: {epochs}
policy: {policy}
estimator: {estimator}
eval_batch_size: 128
tracking: {{system_metrics: false, experiment: libraries}}
"""

TEXT = """\
name: {name}
seed: 0
device: cpu
data: {{name: text_file, params: {{path: {path}, seq_len: 16}}}}
model: {model}
optimizer: {{name: adamw, params: {{lr: 1e-3}}}}
epochs: 2
policy: {policy}
estimator: {estimator}
tracking: {{system_metrics: false, experiment: libraries}}
"""

FIXED = "{name: fixed, params: {batch_size: 32}}"
GROWING = "{name: divebatch, params: {initial: 8, max: 64, delta: 10.0, resize_every: 1}}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def dbx_run(tmp_path, store: str, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["run", str(path), "--tracking-uri", store], catch_exceptions=False)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("libraries").experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1) if result.exit_code == 0 else []
    return result, client, runs[0] if runs else None


def test_torchvision_resnet18_on_one_channel_images_trains_and_exact_measures_it(tmp_path, store):
    """digits are 1 x 8 x 8: a 1x1 convolution turns them into the 3 channels resnet18 takes; its
    BatchNorm and convolutions are layers the exact estimator measures."""
    text = DIGITS.format(name="tv-resnet18", model="{name: torchvision, params: {arch: resnet18}}",
                         policy=GROWING, estimator="{name: exact}", subset=48, epochs=1)
    result, client, run = dbx_run(tmp_path, store, text)
    assert result.exit_code == 0, result.output
    assert run.info.status == "FINISHED" and "diversity" in run.data.metrics
    assert "11,1" in result.output  # about 11.2 M parameters: the real resnet18


def test_timm_models_take_the_data_channels_and_the_exact_norms_match_explicit_gradients():
    torch.manual_seed(0)
    model = timm_model(num_classes=10, input_shape=(1, 8, 8), arch="test_resnet").eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1  # timm's in_chans, no adapter layer
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    loss = Task("classification", cross_entropy()).loss_fn
    hooks = per_sample_sq_norms(model, loss, x, y, method="hooks").total
    explicit = per_sample_sq_norms(model, loss, x, y, method="func").total
    torch.testing.assert_close(hooks, explicit, rtol=1e-4, atol=1e-6)


def test_timm_trains_by_dbx_run(tmp_path, store):
    text = DIGITS.format(name="timm-vit", model="{name: timm, params: {arch: test_vit, kwargs: {img_size: 8, "
                         "patch_size: 2}}}", policy=FIXED, estimator="{name: exact}", subset=96, epochs=2)
    result, client, run = dbx_run(tmp_path, store, text)
    assert result.exit_code == 0, result.output
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert run.info.status == "FINISHED" and len(losses) == 2


def test_a_hugging_face_gpt2_from_a_config_is_a_language_model_measured_by_the_subsampled_estimator(tmp_path, store):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small language model learns to predict the next byte " * 40)
    model = ("{name: transformers, params: {model_type: gpt2, config: {n_layer: 1, n_embd: 16, n_head: 2, "
             "n_positions: 16}}}")
    text = TEXT.format(name="hf-gpt2", path=corpus, model=model, policy=GROWING,
                       estimator="{name: subsampled, params: {samples: 32}}")
    result, client, run = dbx_run(tmp_path, store, text)
    assert result.exit_code == 0, result.output
    assert {"test_perplexity", "diversity"} <= set(run.data.metrics)
    sizes = [m.value for m in client.get_metric_history(run.info.run_id, "batch_size")]
    assert sizes[0] == 8 and sizes[-1] > 8


def test_exact_names_gpt2s_batch_shared_position_lookup_and_measures_the_rest_tied_head_included(tmp_path, store):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("tied embeddings share one weight between two modules " * 40)
    gpt2 = "{name: transformers, params: {model_type: gpt2, config: {n_layer: 1, n_embd: 16, n_head: 2}}}"
    text = TEXT.format(name="hf-exact", path=corpus, policy=GROWING, estimator="{name: exact}", model=gpt2)
    result, _, _ = dbx_run(tmp_path, store, text)
    assert result.exit_code == 2
    assert "'model.transformer.wpe'" in result.output and "exclude" in result.output  # a (1, T) lookup: no samples
    assert "subsampled" in result.output  # the other way out

    text = TEXT.format(name="hf-exact-wpe", path=corpus, policy=GROWING,
                       estimator="{name: exact, params: {exclude: ['*.wpe']}}", model=gpt2)
    result, _, _ = dbx_run(tmp_path, store, text)
    assert result.exit_code == 0, result.output  # the tied wte/lm_head weight passes the self-check


def test_an_image_classifier_from_a_hugging_face_config_gets_the_data_sizes():
    model = transformers_model(num_classes=10, input_shape=(1, 8, 8), model_type="vit",
                               config={"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                                       "intermediate_size": 32, "patch_size": 2})
    config = model.model.config
    assert (config.num_labels, config.num_channels, config.image_size) == (10, 1, 8)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("model, fragment", [
    ("{name: torchvision, params: {arch: resnet18, weights: IMAGENET1K_V1}}",
     "never downloads any; remove weights: IMAGENET1K_V1"),
    ("{name: timm, params: {arch: test_resnet, pretrained: true}}", "never downloads any; remove pretrained: true"),
    ("{name: transformers, params: {model_type: vit, pretrained: google/vit-base-patch16-224}}",
     "never downloads any; remove pretrained: google/vit-base-patch16-224"),
    ("{name: torchvision, params: {arch: resnet5}}", "torchvision has no arch 'resnet5'. Did you mean 'resnet50'"),
    ("{name: timm, params: {arch: test_vit, kwargs: {img_size: 7}}}", "cannot take inputs of shape (1, 8, 8)"),
    ("{name: transformers, params: {model_type: gtp2}}", "has no model_type 'gtp2'. Did you mean"),
])
def test_pretrained_weights_and_unknown_architectures_are_refused_with_exit_2(tmp_path, store, model, fragment):
    result, _, _ = dbx_run(tmp_path, store, DIGITS.format(name="refused", model=model, policy=FIXED,
                                                          estimator="{name: exact}", subset=96, epochs=1))
    assert result.exit_code == 2, result.output
    assert fragment in result.output


def test_the_adapters_refuse_pretrained_weights_in_python_too():
    with pytest.raises(UserError, match="random weights"):
        torchvision_model(num_classes=10, input_shape=(3, 32, 32), arch="resnet18", weights="DEFAULT")
