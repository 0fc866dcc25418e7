"""The `hgm-mm` command line."""
import json
import logging

import pytest
from PIL import Image

import hgm_mm
from hgm_mm.apps.cli import main


def _tiny_dataset(root):
    (root / "img").mkdir(parents=True)
    products = []
    for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (120, 120, 120)]):
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"p{i}.jpg")
        products.append({"product_id": f"p{i}", "image": f"img/p{i}.jpg", "title": f"product {i}",
                         "category": "sofa"})
    Image.new("RGB", (64, 48), (90, 90, 90)).save(root / "img" / "room.jpg")
    (root / "products.jsonl").write_text("\n".join(json.dumps(p) for p in products))
    (root / "rooms.jsonl").write_text(json.dumps({"room_id": "r1", "image": "img/room.jpg", "scene": "bedroom",
                                                  "title": "a calm bedroom"}))
    (root / "pairs.csv").write_text("room_id,product_id\nr1,p2\n")
    return root


def test_demo_passes_its_flags_to_run_demo(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("hgm_mm.apps.demo.run_demo", lambda data, **kwargs: seen.update(data=data, **kwargs))
    assert main(["demo", "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--model", "hgm-tiny",
                 "--rooms", "2", "--train-rooms", "8", "--products", "40", "--steps", "3", "--batch-size", "8",
                 "-k", "4"]) == 0
    assert seen == {"data": tmp_path, "output": tmp_path / "out", "model": "hgm-tiny", "rooms": 2, "train_rooms": 8,
                    "products": 40, "steps": 3, "batch_size": 8, "top_k": 4}


def test_demo_without_data_or_network_fails_with_one_clear_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HGM_DATA", raising=False)
    monkeypatch.setenv("HGM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("hgm_mm.data.ikea_repo.IKEA_ARCHIVE_URL", "https://127.0.0.1:9/ikea.tar.gz")  # no network
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--model", "hgm-tiny"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hgm-mm demo: cannot download the IKEA room dataset from ")
    assert lines[0].endswith("; pass --data DIR or set HGM_DATA to a folder with products.jsonl, rooms.jsonl and "
                             "pairs.csv")
    assert not (tmp_path / "runs").exists()


def test_demo_reports_a_bad_dataset_row(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    (data / "pairs.csv").write_text("room_id,product_id\nr1,p9\n")
    assert main(["demo", "--data", str(data), "--model", "hgm-tiny"]) == 2
    err = capsys.readouterr().err
    assert "pairs.csv line 2" in err and "p9" in err


def test_models_lists_the_builtins(capsys):
    assert main(["models"]) == 0
    assert {"hgm-lite-en", "hgm-lite-multilingual", "hgm-tiny"} <= set(capsys.readouterr().out.split())


def test_evaluate_prints_one_table_with_the_baselines_and_writes_json(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    out_json = tmp_path / "eval.json"
    with pytest.warns(UserWarning):
        code = main(["evaluate", "--model", "hgm-tiny", "--catalog", str(data / "products.jsonl"),
                     "--rooms", str(data / "rooms.jsonl"), "--pairs", str(data / "pairs.csv"), "--baselines",
                     "--train-pairs", str(data / "pairs.csv"), "--frozen-model", "hgm-tiny", "--json", str(out_json)])
    assert code == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == ["model", "hgm-tiny", "random", "popularity", "scene_popularity", "frozen_features"]
    document = json.loads(out_json.read_text())
    assert document["model"]["n_rooms"] == 1 and "recall@10" in document["table"]["random"]


def test_evaluate_scenes_alone_and_refuses_a_partial_retrieval_set(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    (data / "images.jsonl").write_text("\n".join(json.dumps({"image": f"img/p{i}.jpg", "scene": s})
                                                 for i, s in enumerate(["bedroom", "kitchen", "bedroom"])))
    with pytest.warns(UserWarning):
        assert main(["evaluate", "--model", "hgm-tiny", "--scenes", str(data / "images.jsonl")]) == 0
    assert "scenes: 3 photos, accuracy" in capsys.readouterr().out
    assert main(["evaluate", "--model", "hgm-tiny", "--catalog", str(data / "products.jsonl")]) == 2
    assert "needs --catalog, --rooms and --pairs together" in capsys.readouterr().err


def test_evaluate_baselines_read_the_training_rooms_scenes_from_the_model_and_check_them_first(tmp_path, capsys):
    import warnings

    import hgm_mm

    data = _tiny_dataset(tmp_path / "data")
    room = json.loads(data.joinpath("rooms.jsonl").read_text())
    (data / "pairs.csv").write_text(f"room_id,product_id\n{room['room_id']},p2\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = hgm_mm.create_model("hgm-tiny").save_pretrained(tmp_path / "model")
    # trained on rooms that --rooms (the rooms being scored) does not hold
    (model_dir / "train_pairs.csv").write_text("room_id,product_id\nt1,p1\nt2,p3\n")
    command = ["evaluate", "--model", str(model_dir), "--catalog", str(data / "products.jsonl"), "--rooms",
               str(data / "rooms.jsonl"), "--pairs", str(data / "pairs.csv"), "--baselines",
               "--frozen-model", "hgm-tiny"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(command) == 2  # no record of t1's scene: refused before the evaluation
    captured = capsys.readouterr()
    assert "unknown room" in captured.err and "--train-rooms" in captured.err
    assert "rooms," not in captured.out  # nothing was evaluated
    (model_dir / "train_room_scenes.json").write_text(json.dumps({"format": 1, "scenes": {"t1": "kitchen",
                                                                                            "t2": "bedroom"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(command) == 0
    assert "scenes from " + str(model_dir / "train_room_scenes.json") in capsys.readouterr().out


def test_evaluate_a_trained_model_leaves_out_its_training_rooms_and_writes_a_report(tmp_path, capsys):
    import warnings

    import hgm_mm

    data = _tiny_dataset(tmp_path / "data")
    rooms = [json.loads(data.joinpath("rooms.jsonl").read_text())]
    rooms.append({"room_id": "r2", "image": "img/room.jpg", "scene": "kitchen", "title": "a kitchen"})
    (data / "rooms.jsonl").write_text("\n".join(json.dumps(r) for r in rooms))
    (data / "pairs.csv").write_text("room_id,product_id\nr1,p2\nr2,p1\nr2,p3\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = hgm_mm.create_model("hgm-tiny").save_pretrained(tmp_path / "model")
    (model_dir / "train_pairs.csv").write_text("room_id,product_id\nr1,p2\n")  # as a training run records it
    report = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["evaluate", "--model", str(model_dir), "--catalog", str(data / "products.jsonl"),
                     "--rooms", str(data / "rooms.jsonl"), "--pairs", str(data / "pairs.csv"), "--baselines",
                     "--frozen-model", "hgm-tiny", "--report", str(report), "--json", str(tmp_path / "e.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "scoring the 1 rooms" in out and "1 training rooms left out" in out
    assert f"popularity baselines count the training pairs of {model_dir / 'train_pairs.csv'}" in out
    document = json.loads((tmp_path / "e.json").read_text())
    assert document["model"]["n_rooms"] == 1 and "popularity" in document["table"]
    html = (report / "index.html").read_text()
    assert "r2" in html and "r1" not in html.replace("r1,", "")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.jpg").write_bytes(b"x")
    assert main(["evaluate", "--model", "hgm-tiny", "--catalog", str(data / "products.jsonl"), "--rooms",
                 str(data / "rooms.jsonl"), "--pairs", str(data / "pairs.csv"), "--report", str(photos)]) == 2
    assert (photos / "keep.jpg").exists()


def test_version_and_log_levels(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"hgm-mm {hgm_mm.__version__}"
    logger = logging.getLogger("hgm_mm.training.loop")
    for flags, shown in (([], True), (["--quiet"], False), (["--log-level", "warning"], False),
                         (["--log-level", "DEBUG"], True)):
        assert main(["models", *flags]) == 0
        assert "hgm-tiny" in capsys.readouterr().out  # the command's answer, whatever the level
        logger.info("a line of the run")
        logger.warning("a warning")
        said = capsys.readouterr()
        assert ("a line of the run" in said.err) == shown, flags
        assert "a warning" in said.err and "a warning" not in said.out  # logs keep standard output clean
        assert len(logging.getLogger("hgm_mm").handlers) == 1  # each call replaces the last one's handler
    with pytest.raises(ValueError, match="log level 'LOUD'"):
        hgm_mm.log_to_console("LOUD")


def test_every_training_setting_has_a_flag_that_reaches_the_config(tmp_path):
    import dataclasses

    from hgm_mm.apps.cli import parse_args
    from hgm_mm.apps.commands import train_config
    from hgm_mm.training import TrainConfig

    config_file = tmp_path / "run.yaml"
    config_file.write_text("epochs: 7\nwarmup_steps: 9\n")
    args = parse_args(["train", "--data", str(tmp_path), "--config", str(config_file), "--warmup-steps", "3",
                       "--no-freeze-norm-stats", "--report-to", "none", "--precision", "bf16", "--max-steps", "2"])
    config = train_config(args)
    assert (config.epochs, config.warmup_steps, config.max_steps) == (7, 3, 2)  # the file's, then the flags over it
    assert config.freeze_norm_stats is False and config.report_to == [] and config.precision == "bf16"
    untouched = train_config(parse_args(["train", "--data", str(tmp_path)]))
    assert untouched == TrainConfig()  # a flag left out keeps the default
    help_text = help_of(["train"])
    for setting in dataclasses.fields(TrainConfig):
        assert "--" + setting.name.replace("_", "-") in help_text, setting.name
    assert "(default: 33)" in help_text and "example: hgm-mm train" in help_text
    with pytest.raises(ValueError, match="TrainConfig.lr=inf"):
        train_config(parse_args(["train", "--data", str(tmp_path), "--lr", "inf"]))


def help_of(command: list[str]) -> str:
    """What `hgm-mm COMMAND --help` prints."""
    import contextlib
    import io

    from hgm_mm.apps.cli import parse_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args([*command, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("command", ["demo", "evaluate", "train", "train-scenes", "index", "match", "serve", "models"])
def test_each_subcommand_shows_an_example(command):
    assert f"example: hgm-mm {command}" in help_of([command])
