"""Tracked runs: `TrainConfig.report_to` sends losses, learning rates, validation metrics and the config to
accelerate's trackers; each tracker here runs locally and is read back with its own reader."""
import glob
import json
import struct
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from hgm_mm.training import TrainConfig, train
from hgm_mm.training.tracking import TRACKING_DIR, flat_config, metric_key, resolve_trackers

sys.path.insert(0, str(Path(__file__).parent))
from test_training import make_dataset, tiny_config  # noqa: E402  (the tiny dataset and run of the training tests)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# what every tracked run logs: losses and learning rates each step (log_every_steps=1), and at each validation
STEP_KEYS = {"loss", "product_loss", "room_loss", "scene_loss", "samples_per_s", "lr", "tower_lr"}
VALIDATION_KEYS = {"val/recall_at_10", "val/ndcg_at_10", "val/map", "val/scene/bedroom/recall_at_10",
                   "val/scene/kitchen/ndcg_at_10", "val/category/sofa/recall_at_10"}


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def tracked_run(dataset, output, report_to, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(tiny_config(report_to=report_to, log_every_steps=1, **{"epochs": 1, **overrides}),
                     data=dataset, output=output, progress=False)


# -- the setting ------------------------------------------------------------------------------------
def test_report_to_takes_a_tracker_or_a_list_and_round_trips():
    assert TrainConfig().report_to is None  # the default: tensorboard when installed
    assert TrainConfig(report_to="wandb").report_to == ["wandb"]
    assert TrainConfig(report_to=["MLflow", "tensorboard", "mlflow"]).report_to == ["mlflow", "tensorboard"]
    assert TrainConfig(report_to="none").report_to == [] and TrainConfig(report_to=[]).report_to == []
    for value in (None, "all", ["wandb", "mlflow"], "none"):
        config = TrainConfig(report_to=value)
        assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_report_to_refuses_unknown_trackers_naming_the_field_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig.report_to='tensorbord': unknown tracker\(s\) \['tensorbord'\]; "
                                         r"expected one of \['tensorboard', 'wandb', 'mlflow', 'all', 'none'\]"):
        TrainConfig(report_to="tensorbord")
    with pytest.raises(ValueError, match="'all' and 'none' stand alone"):
        TrainConfig(report_to=["all", "wandb"])
    with pytest.raises(ValueError, match=r"report_to=3 \(int\); expected a list of strings or a string or null"):
        TrainConfig(report_to=3)
    path = tmp_path / "run.yaml"
    path.write_text("model: hgm-tiny\nreport_to: [wandb, comet]\n")
    with pytest.raises(ValueError, match=r"run.yaml: TrainConfig.report_to=\['wandb', 'comet'\]: unknown"):
        TrainConfig.from_file(path)
    path.write_text("model: hgm-tiny\nreport_to: [wandb, mlflow]\n")
    assert TrainConfig.from_file(path).report_to == ["wandb", "mlflow"]


def test_a_tracker_that_is_not_installed_is_an_error_not_silence(monkeypatch):
    assert resolve_trackers(["wandb", "mlflow"]) == ["wandb", "mlflow"]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed: import mlflow fails
    with pytest.raises(ImportError, match=r"mlflow not installed; install it \(pip install mlflow-skinny\)"):
        resolve_trackers(["wandb", "mlflow"])


def test_config_values_are_flattened_for_trackers_and_metric_names_fit_every_tracker():
    assert flat_config({"a": [1, 2], "b": None, "c": {"d": 0.5, "e": []}, "f": True}) == \
        {"a": "1,2", "b": "none", "c.d": 0.5, "c.e": "none", "f": True}
    assert metric_key("recall@10") == "recall_at_10" and metric_key("chairs & stools") == "chairs _ stools"


# -- runs, read back by each tracker's reader ---------------------------------------------------
def test_a_tensorboard_run_writes_losses_learning_rates_validations_and_its_config(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = tracked_run(dataset, tmp_path / "run", "tensorboard", epochs=2)  # validations at steps 3 and 6
    events = glob.glob(str(tmp_path / "run" / TRACKING_DIR / "hgm_mm" / "events.out.tfevents.*"))
    assert len(events) == 1
    scalars = EventAccumulator(events[0], size_guidance={"scalars": 0})
    scalars.Reload()
    tags = set(scalars.Tags()["scalars"])
    assert STEP_KEYS | VALIDATION_KEYS <= tags
    assert [e.step for e in scalars.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    recall = scalars.Scalars("val/recall_at_10")
    assert [e.step for e in recall] == [h["step"] for h in result.history] == [3, 6]
    assert [e.value for e in recall] == pytest.approx([h["recall@10"] for h in result.history])
    rates = [e.value for e in scalars.Scalars("lr")]
    assert rates == sorted(rates) and rates[0] < rates[-1]  # warm-up: the learning rate rises over the first steps
    assert [e.value for e in scalars.Scalars("tower_lr")] == pytest.approx([r * 0.3 for r in rates])  # 3e-4 / 1e-3
    (hparams,) = glob.glob(str(tmp_path / "run" / TRACKING_DIR / "hgm_mm" / "*" / "hparams.yml"))
    config = yaml.safe_load(Path(hparams).read_text())
    assert config["model"] == "hgm-tiny" and config["report_to"] == "tensorboard" and config["max_steps"] == "none"
    assert config["batch_size"] == 6


def _wandb_records(path: Path):
    """The records of a wandb offline run file. wandb 0.31 has no Python reader of it (it moved into
    wandb-core); the file is leveldb's log format behind a 7-byte header, each record a protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a wandb run file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (2, 3):  # the first or a middle piece
            pending += chunk
        else:
            break


def test_a_wandb_offline_run_holds_the_logged_keys_in_the_run_folder(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the run folder, then
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing in the home folder
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    result = tracked_run(dataset, tmp_path / "run", "wandb")
    (run_file,) = glob.glob(str(tmp_path / "run" / TRACKING_DIR / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config, run = [], {}, None
    for record in _wandb_records(Path(run_file)):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            run = record.run
    assert run is not None and run.project == "hgm_mm" and run.display_name == "run"  # named after its folder
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert all(STEP_KEYS <= set(h) for h in history)
    assert VALIDATION_KEYS <= set(history[-1])
    assert history[-1]["val/recall_at_10"] == pytest.approx(result.history[-1]["recall@10"])
    assert config["model"] == "hgm-tiny" and config["report_to"] == "wandb" and config["lr"] == 1e-3


def test_an_mlflow_file_store_run_holds_metrics_by_step_and_the_config(dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    result = tracked_run(dataset, tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("hgm_mm").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert STEP_KEYS | VALIDATION_KEYS <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    (recall,) = client.get_metric_history(run.info.run_id, "val/recall_at_10")
    assert (recall.step, recall.value) == (3, pytest.approx(result.history[-1]["recall@10"]))
    assert run.data.params["model"] == "hgm-tiny" and run.data.params["report_to"] == "mlflow"


def test_the_default_reports_to_tensorboard_when_installed_and_none_reports_nothing(dataset, tmp_path):
    from hgm_mm.apps.cli import main

    assert resolve_trackers(None) == ["tensorboard"]  # tensorboard is installed with the test extra
    tracked_run(dataset, tmp_path / "default", None, max_steps=1)
    assert glob.glob(str(tmp_path / "default" / TRACKING_DIR / "hgm_mm" / "events.out.tfevents.*"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", "--data", str(dataset), "--model", "hgm-tiny", "--output", str(tmp_path / "none"),
                     "--max-steps", "1", "--batch-size", "6", "--no-scene-heads", "--report-to", "none"])
    assert code == 0 and (tmp_path / "none" / "model" / "hgm_config.json").is_file()
    assert not (tmp_path / "none" / TRACKING_DIR).exists()
    assert json.loads((tmp_path / "none" / "train_config.json").read_text())["report_to"] == []
