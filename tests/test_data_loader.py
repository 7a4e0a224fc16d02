"""The resizable loader: every sample once per epoch, partial last batch, batch size changes
between epochs, reproducible order, and state_dict round trips."""
import pytest
import torch

from dbx.data.loader import DatasetLoader, TensorLoader, make_loader


def tensor_split(n=10, d=3):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, d)
    return x, torch.arange(n)


def epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def ids(batches):
    return [y.tolist() for _, y in batches]


@pytest.fixture(params=["tensors", "dataset"])
def kind(request):
    return request.param


def loader_for(kind, n=10, **kwargs):
    x, y = tensor_split(n)
    split = (x, y) if kind == "tensors" else torch.utils.data.TensorDataset(x, y)
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("seed", 0)
    return make_loader(split, **kwargs)


def test_make_loader_picks_the_path():
    assert isinstance(loader_for("tensors", batch_size=2, shuffle=True), TensorLoader)
    assert isinstance(loader_for("dataset", batch_size=2, shuffle=True), DatasetLoader)
    with pytest.raises(TypeError):
        make_loader([1, 2, 3], batch_size=2, shuffle=False, device="cpu", seed=0)


def test_every_sample_once_per_epoch_with_a_partial_last_batch(kind):
    loader = loader_for(kind, n=10, batch_size=4, shuffle=True)
    assert len(loader) == 3 and loader.num_samples == 10
    batches = ids(epoch(loader))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(sum(batches, [])) == list(range(10))


def test_inputs_stay_paired_with_targets(kind):
    loader = loader_for(kind, n=17, batch_size=5, shuffle=True)
    for x, y in loader:
        assert torch.equal(x[:, 0].long(), y)


def test_batch_size_change_takes_effect_at_the_next_epoch(kind):
    loader = loader_for(kind, n=10, batch_size=3, shuffle=True)
    it = iter(loader)
    first = next(it)
    loader.set_batch_size(5)
    assert loader.batch_size == 5 and len(loader) == 2
    rest = list(it)  # the epoch in progress keeps its size
    assert [len(y) for _, y in [first, *rest]] == [3, 3, 3, 1]
    assert [len(y) for _, y in loader] == [5, 5]
    loader.set_batch_size(64)
    assert [len(y) for _, y in loader] == [10]


def test_epochs_are_shuffled_differently_but_reproducibly(kind):
    a = loader_for(kind, n=50, batch_size=50, shuffle=True, seed=1)
    b = loader_for(kind, n=50, batch_size=50, shuffle=True, seed=1)
    c = loader_for(kind, n=50, batch_size=50, shuffle=True, seed=2)
    a1, a2 = ids(epoch(a)), ids(epoch(a))
    assert a1 != a2
    assert ids(epoch(b)) == a1 and ids(epoch(b)) == a2
    assert ids(epoch(c)) != a1


def test_no_shuffle_keeps_the_order(kind):
    loader = loader_for(kind, n=7, batch_size=3, shuffle=False)
    assert ids(epoch(loader)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_state_dict_round_trip_resumes_the_same_order(kind):
    original = loader_for(kind, n=30, batch_size=4, shuffle=True, seed=3)
    epoch(original)
    original.set_batch_size(7)
    state = original.state_dict()
    expected = [ids(epoch(original)) for _ in range(2)]

    resumed = loader_for(kind, n=30, batch_size=4, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    assert resumed.batch_size == 7
    assert [ids(epoch(resumed)) for _ in range(2)] == expected


def test_state_dict_survives_torch_save(tmp_path):
    loader = loader_for("tensors", n=20, batch_size=4, shuffle=True, augment=lambda x, g: x)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = ids(epoch(loader))
    fresh = loader_for("tensors", n=20, batch_size=4, shuffle=True, augment=lambda x, g: x)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert ids(epoch(fresh)) == expected


def add_noise(x, generator):
    return x + torch.rand(x.shape, generator=generator, device=x.device)


def test_augment_applies_to_each_batch_reproducibly_without_changing_the_order(kind):
    plain = loader_for(kind, n=20, batch_size=6, shuffle=True, seed=4)
    aug1 = loader_for(kind, n=20, batch_size=6, shuffle=True, seed=4, augment=add_noise)
    aug2 = loader_for(kind, n=20, batch_size=6, shuffle=True, seed=4, augment=add_noise)
    p, a1, a2 = epoch(plain), epoch(aug1), epoch(aug2)
    assert ids(p) == ids(a1)  # augmentation draws from its own stream
    for (xp, _), (x1, _), (x2, _) in zip(p, a1, a2):
        assert torch.equal(x1, x2)
        assert not torch.equal(x1, xp)
        assert ((x1 - xp) >= 0).all() and ((x1 - xp) < 1).all()
    # and the next epoch's augmentation differs
    assert not torch.equal(epoch(aug1)[0][0] - epoch(plain)[0][0], a1[0][0] - p[0][0])


def test_augment_state_round_trip():
    loader = loader_for("tensors", n=20, batch_size=20, shuffle=True, augment=add_noise)
    epoch(loader)
    state = loader.state_dict()
    expected = epoch(loader)[0][0]
    fresh = loader_for("tensors", n=20, batch_size=20, shuffle=True, augment=add_noise)
    fresh.load_state_dict(state)
    assert torch.equal(epoch(fresh)[0][0], expected)


def test_invalid_batch_size():
    loader = loader_for("tensors", batch_size=2, shuffle=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            loader.set_batch_size(bad)


def test_dataset_loader_with_workers():
    loader = loader_for("dataset", n=40, batch_size=8, shuffle=True, num_workers=2)
    batches = ids(epoch(loader))
    assert sorted(sum(batches, [])) == list(range(40))
    again = loader_for("dataset", n=40, batch_size=8, shuffle=True, num_workers=2)
    assert ids(epoch(again)) == batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_live_on_the_device():
    loader = loader_for("tensors", n=20, batch_size=8, shuffle=True, device="cuda", augment=add_noise)
    assert loader.inputs.is_cuda
    for x, y in loader:
        assert x.is_cuda and y.is_cuda


def test_default_workers_only_on_a_gpu():
    from dbx.data.loader import default_num_workers

    assert default_num_workers("cpu") == 0
    assert 1 <= default_num_workers("cuda") <= 8
    loader = loader_for("dataset", batch_size=4, shuffle=False)
    assert loader.num_workers == 0 and not loader.pin_memory
    assert "num_workers=0" in repr(loader)


def test_the_epoch_is_fixed_at_iter_not_at_the_first_batch(kind):
    loader = loader_for(kind, n=10, batch_size=5, shuffle=True)
    it = iter(loader)
    loader.set_batch_size(2)  # after iter(): the epoch already started at 5
    assert [len(y) for _, y in it] == [5, 5]
    assert [len(y) for _, y in loader] == [2] * 5
