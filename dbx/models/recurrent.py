"""A recurrent classifier: ``lstm_classifier`` reads a sequence (or an image row by row) with an LSTM.

Inputs of shape ``(T, F)`` are T steps of F features; images ``(C, H, W)`` are read as H steps of
``C * W`` features (the classic "sequential MNIST by rows"); with ``vocab_size``, inputs ``(T,)``
are token ids, embedded first. The class comes from the last layer's final hidden state (both
directions' when ``bidirectional``).

The ``exact`` estimator has no per-sample kernel for ``nn.LSTM`` yet: train this model with a
policy that needs no diversity (``fixed``, ``adabatch``) or measure it with the ``subsampled``
estimator, which falls back to explicit per-sample gradients (``torch.func``) for the LSTM.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dbx.models.linear import num_outputs

__all__ = ["lstm_classifier", "LSTMClassifier"]


class LSTMClassifier(nn.Module):
    def __init__(self, features: int, hidden: int, layers: int, bidirectional: bool, dropout: float, classes: int,
                 vocab_size: int | None, embed: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed) if vocab_size is not None else None
        self.lstm = nn.LSTM(embed if vocab_size is not None else features, hidden, num_layers=layers,
                            batch_first=True, bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        elif x.dim() == 4:  # images (B, C, H, W) -> H steps of C * W features
            x = x.permute(0, 2, 1, 3).flatten(2)
        _, (h, _) = self.lstm(x)
        directions = 2 if self.lstm.bidirectional else 1
        last = h.view(self.lstm.num_layers, directions, x.shape[0], -1)[-1]  # the last layer
        return self.head(last.transpose(0, 1).flatten(1))


def lstm_classifier(
    *,
    num_classes: int | None,
    input_shape: tuple[int, ...],
    hidden: int = 128,
    layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    vocab_size: int | None = None,
    embed: int = 64,
) -> nn.Module:
    """An LSTM over the input's steps, then a linear layer from its final hidden state.

    ``input_shape``: ``(T, F)`` feature sequences, ``(C, H, W)`` images (read by rows), or, with
    ``vocab_size`` set, ``(T,)`` token ids (embedded to ``embed`` features). ``dropout`` acts
    between stacked layers.
    """
    shape = tuple(int(v) for v in input_shape)
    if vocab_size is not None:
        if len(shape) != 1 or vocab_size < 1:
            raise ValueError(f"with vocab_size, lstm_classifier reads token ids of shape (T,), got {shape}")
        features = embed
    elif len(shape) == 2:
        features = shape[1]
    elif len(shape) == 3:
        features = shape[0] * shape[2]
    else:
        raise ValueError(f"lstm_classifier reads (T, F) sequences, (C, H, W) images, or (T,) token ids with "
                         f"vocab_size; got input_shape {shape}")
    if hidden < 1 or layers < 1 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"hidden and layers must be positive and dropout in [0, 1); got {hidden}, {layers}, {dropout}")
    model = LSTMClassifier(features, hidden, layers, bidirectional, dropout, num_outputs(num_classes), vocab_size, embed)
    bound = 1.0 / math.sqrt(hidden)  # PyTorch's own LSTM initialisation, made explicit
    for name, param in model.lstm.named_parameters():
        nn.init.uniform_(param, -bound, bound)
        if name.startswith("bias_ih"):  # forget gate bias 1 (Jozefowicz et al. 2015): remember by default
            with torch.no_grad():
                param[hidden:2 * hidden].fill_(1.0)
    return model
