"""``weighting: authors`` reproduces the DiveBatch authors' computation, checked against a small
hand-written oracle of their formula: per step, the per-sample gradients of the step's *mean* loss
(so a short last batch weighs its samples more), BatchNorm's weight terms normalised with the
running statistics (BatchNorm in eval mode for BackPACK's backward), and S2 the sum of the steps'
mean-loss gradients. dbx's default differs from it on the same steps."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dbx.estimators import ExactEstimator


def model_with_batchnorm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def data(n=22):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def authors_oracle(model, x, y, batch):
    """Their formula written out: explicit per-sample gradients of each layer from its input and the
    output gradient of the step's mean loss; BatchNorm's weight term from the running statistics."""
    lin1, bn, _, lin2 = model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s1 = 0.0
    s2 = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for xb, yb in zip(x.split(batch), y.split(batch)):
        h1 = lin1(xb)
        h2 = bn(h1)  # training mode: batch statistics, running statistics updated
        a = torch.relu(h2)
        out = lin2(a)
        loss = F.cross_entropy(out, yb)  # the mean over the step's samples
        b1, b2, b3 = torch.autograd.grad(loss, [h1, h2, out], retain_graph=True)
        xhat_running = (h1 - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
        for i in range(xb.shape[0]):
            per_sample = [b1[i].outer(xb[i]), b1[i], b2[i] * xhat_running[i], b2[i], b3[i].outer(a[i]), b3[i]]
            s1 += sum(float(g.double().square().sum()) for g in per_sample)
        loss.backward()
        for total, p in zip(s2, model.parameters(), strict=True):
            total += p.grad.double()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return s1 / sum(float(t.square().sum()) for t in s2)


def estimated(model, x, y, batch, **params):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    estimator = ExactEstimator(**params)
    estimator.attach(model)
    for xb, yb in zip(x.split(batch), y.split(batch)):
        scale = 1.0 / xb.shape[0]
        (F.cross_entropy(model(xb), yb, reduction="sum") * scale).backward()
        estimator.on_backward(scale)
        estimator.on_step(scale)
        opt.step()
        opt.zero_grad(set_to_none=True)
    value = estimator.estimate(model, F.cross_entropy, None).value
    estimator.detach()
    return value


def test_authors_weighting_equals_a_hand_written_oracle_of_their_formula():
    x, y = data(22)  # batches of 8, 8 and a short one of 6
    expected = authors_oracle(model_with_batchnorm(), x, y, 8)
    assert estimated(model_with_batchnorm(), x, y, 8, weighting="authors") == pytest.approx(expected, rel=1e-5)
    dbx = estimated(model_with_batchnorm(), x, y, 8)
    assert abs(dbx - expected) / expected > 1e-3  # the default is dbx's definition, not theirs


def test_without_batchnorm_and_a_short_batch_the_two_weightings_agree():
    torch.manual_seed(0)
    x, y = data(24)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ours = estimated(model, x, y, 8)
    model.load_state_dict(state)
    theirs = estimated(model, x, y, 8, weighting="authors")
    assert theirs == pytest.approx(ours, rel=1e-6)


def test_an_unknown_weighting_is_refused_by_name():
    with pytest.raises(ValueError, match="weighting.*'dbx', 'authors'"):
        ExactEstimator(weighting="paper")
