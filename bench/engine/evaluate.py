"""Re-evaluate a finished run from its saved weights (``run_bench.py evaluate``).

The run's model is rebuilt from the configuration in its row (the seed redraws a random-init
backbone exactly), its saved weights are loaded (the backbone's may be absent when it was frozen:
``save_weights = "head"``), and the test split is scored by the same pass that scored it in
training: on cached features for ``protocol = "frozen"`` (the float16 features the run was
evaluated on, so the metrics equal the row's), on images otherwise.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from bench.api.registry import build_head
from bench.config.grid import Cell
from bench.core.errors import UsageError
from bench.data import image_cache
from bench.data.feature_cache import FeatureDataset
from bench.data.augment import to_float
from bench.engine.data_store import DataStore
from bench.engine.failures import finite_outputs
from bench.engine.inputs import Inputs, Trunk
from bench.engine.interrupt import StopRequest
from bench.engine.launch import RunContext
from bench.engine.members import Member
from bench.engine.predictions import Predictions
from bench.engine.progress import Progress
from bench.engine.saved_runs import frozen_backbone, load_trained, run_config
from bench.engine.streams import RngStream
from bench.engine.trainer import Trainer
from bench.eval.metrics import multilabel_metrics
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier
from bench.results import store as results


def evaluate_run(run_id: str, results_dir: Path, accelerator: Accelerator, data_root: str | None = None) -> dict[str, float]:
    """Re-evaluate a finished run's saved weights on its test split; return the metrics."""
    preds = predict_run(run_id, results_dir, accelerator, data_root)
    return multilabel_metrics(preds.scores, preds.targets, preds.ignore)


def predict_run(run_id: str, results_dir: Path, accelerator: Accelerator, data_root: str | None = None) -> Predictions:
    """A finished run's test-split predictions from its saved weights (scores [N, C] in the test
    split's order, as the run's score file holds them)."""
    row = results.run_row(results_dir, run_id)
    status = row.get("status")
    if status != "finished":
        why = f" ({row.get('error_type')}: {str(row.get('error'))[:300]})" if status == "failed" else ""
        raise UsageError(f"run {run_id} has status {status!r}{why}: only a finished run has trained weights to re-evaluate "
                         "(--retry-failed trains a failed run again)")
    cell = Cell.from_config(run_config(row), root=data_root or row.get("data_root"))
    store = DataStore(accelerator)
    data = store.splits(cell)
    set_seed(cell.seed)  # a random-init backbone is redrawn exactly as in training
    backbone = build_backbone(cell.backbone, cell.weights)
    head = build_head(cell.head, backbone.out_channels, len(data.classes), data.context, **cell.hparams)
    frozen = frozen_backbone(cell)
    model = Classifier(backbone, head, freeze_backbone=frozen, normalize=cell.recipe.input_normalization == "backbone")
    load_trained(model, results_dir, run_id, frozen=frozen)
    device = accelerator.device
    if cell.recipe.protocol == "frozen":  # the cached float16 features the run was scored on
        test = FeatureDataset(store.features(cell, "test", model))
        module, prepare = head, (lambda f: f.to(device))
    else:
        test = image_cache.CachedImages(data.test)
        module, prepare = model, (lambda images: to_float(images.to(device)))
    model.to(device).eval()
    inputs = Inputs(test, lambda: test, lambda x, _g: prepare(x), prepare, tuple(row.get("feature_shape") or ()))
    stream = RngStream.capture(device)
    member = Member(cell, None, head, module, module, module, stream, ({}, stream.copy()))
    ctx = RunContext(None, store, accelerator, Progress(False), results_dir, StopRequest(), checkpoint=False)  # type: ignore[arg-type]
    trainer = Trainer([member], Trunk(model, inputs, shared_backbone=False), ctx, first_epoch=cell.recipe.epochs)
    with finite_outputs(module, f"run {run_id}"):
        preds = trainer.predict(trainer.eval_loader(test), prepare).get(0)
    if member.failure is not None:
        raise member.failure.exception or RuntimeError(member.failure.error)
    assert preds is not None
    return preds
