"""Model factories (registered as ``dbx.models`` plugins).

Each factory takes keyword-only arguments: ``num_classes`` and ``input_shape`` are injected by dbx
from the dataset (``num_classes=None`` means regression: one output); the others are the model's
parameters, settable from a spec's ``model.params`` and validated against the signature.

- ``logreg``          (``dbx.models.linear``) flatten + one Linear layer
- ``mlp``             (``dbx.models.mlp``) fully connected network
- ``small_cnn``       (``dbx.models.cnn``) a few conv blocks, for CPU-scale image runs
- ``resnet18_cifar``  (``dbx.models.resnet``) the CIFAR ResNet-18 of the DiveBatch code
- ``resnet18``        (``dbx.models.resnet``) torchvision's ImageNet ResNet-18, from scratch
- ``transformer_lm``  (``dbx.models.transformer``) a small GPT for sequence data
- ``vit``             (``dbx.models.transformer``) a small vision transformer
- ``lstm_classifier`` (``dbx.models.recurrent``) an LSTM over sequences or image rows
- ``torchvision``, ``timm``, ``transformers`` (``dbx.models.adapters``) any architecture of those
  libraries by name, randomly initialised
"""
