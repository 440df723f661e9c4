"""cifar-transfer: input normalization is a contract with the pretrained model.

Modules, one job each:

- ``contract``   the normalization contract, its presets and the named wrong variants
- ``backbones``  pretrained backbones, each declaring its contract
- ``data``       datasets decoded once into uint8 tensors; batched augmentation
- ``model``      the classifier and its self-describing checkpoint folder
- ``train``      ``python -m cifar_transfer.train``
- ``evaluate``   ``python -m cifar_transfer.evaluate``: accuracy under every variant
- ``meter``      how far inputs sit from the first batch-norm layer's statistics
- ``card``       the model card, generated from a checkpoint's own files
"""

__version__ = "0.1.0"
