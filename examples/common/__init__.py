"""Shared machinery of the training examples (``modelnet40.py``, ``imagenet.py``).

* :mod:`common.cli` — the shared flags, their defaults and checks, and the loop around the runs.
* :mod:`common.distributed` — single process or DistributedDataParallel under ``torchrun``.
* :mod:`common.training` — the epoch loop, evaluation, checkpoints.
* :mod:`common.metrics` — top-k accuracy and mean average precision over all classes.
* :mod:`common.reporting` — CSV/JSON results, Markdown tables, figures.
* :mod:`common.vision` — torchvision when it imports, else an in-repo ResNet-18/ImageFolder.

The examples put ``examples/`` on ``sys.path`` (Python does so for ``python examples/x.py`` and
``torchrun examples/x.py``), so this package is imported as ``common``.
"""
