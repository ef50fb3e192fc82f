"""headbench: a benchmark harness for multi-label image classification heads.

Public helpers for plugins: ``bench.registry`` (``register_head``, ``register_dataset``),
``bench.context.HeadContext``, ``bench.dataset`` (``MultiLabelDataset`` and label helpers),
``bench.errors.UsageError``.
"""

__version__ = "0.1.0"
