"""headbench: a benchmark harness for multi-label image classification heads.

Public helpers for plugins: ``bench.api.registry`` (``register_head``, ``register_dataset``),
``bench.api.context.HeadContext``, ``bench.api.dataset`` (``MultiLabelDataset`` and label helpers),
``bench.core.errors.UsageError``.
"""

__version__ = "0.1.0"
