"""Room photo -> view vectors, the query's encoding: each design of the views against the 55 crops.

A query photo is encoded as the model's room views. The reference is today's default, `hgm-lite-en`
with 55 crops (grids 1-5, each tile its own 224 px pass) through ONNX Runtime, as `Matcher` runs
it. The candidates, in the same run on the same IKEA room photos:

- `feature_map` at several sides: one pass over the whole photo, the feature map pooled per tile
  (`ModelConfig.room_views`);
- static int8 of the same ONNX graph (ONNX Runtime QDQ, per-channel weights, calibrated on training
  rooms' photos), for the crops and for each feature map. This is a probe: the library does not
  ship an int8 engine.

Latency is the time `Matcher` spends on a photo's views: preprocessing plus the encoder, p50 and
p95 over the photos, each design in its own pass after a warm-up. With `--trained NAME=DIR` (model
folders written by `hgm-mm train`) it also measures validation Recall@10 / NDCG@10 of each model on
its own held-out rooms, with the room views in fp32 and in int8 (products stay fp32: the catalogue
is embedded once, offline).

    python benchmarks/bench_room_views.py [--data ../shared/data] [--photos 20] [--sizes 640 960]
        [--trained crops=runs/crops/model --trained map640=runs/map640/model] [--no-int8] [--no-record]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, machine_summary, record_result  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def int8_encoder(model, calibration: torch.Tensor):
    """The model's ONNX room-view graph quantised to static int8; returns pixels (as the model's
    room views) -> (R, V, D), like `photo_encoder(model, room_views=True)`."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from hgm_mm.models.export import FoldedImageEncoder, FoldedRoomMapEncoder, _export

    room_map = model.room_views.kind == "feature_map"
    encoder = (FoldedRoomMapEncoder if room_map else FoldedImageEncoder)(model).eval()
    folder = Path(tempfile.mkdtemp(prefix="hgm_int8_"))
    (folder / "fp32.onnx").write_bytes(_export(encoder, calibration[:3]))
    quant_pre_process(str(folder / "fp32.onnx"), str(folder / "pre.onnx"), skip_symbolic_shape=True)

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"pixels": calibration[i:i + 1].numpy()} for i in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(folder / "pre.onnx"), str(folder / "int8.onnx"), Photos(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(folder / "int8.onnx"), options, providers=["CPUExecutionProvider"])

    def run(pixels: torch.Tensor) -> torch.Tensor:
        if room_map:  # (R, 1, 3, M, M)
            return torch.from_numpy(session.run(None, {"pixels": pixels[:, 0].float().numpy()})[0])
        flat = pixels.flatten(0, 1)
        out = [torch.from_numpy(session.run(None, {"pixels": chunk.float().numpy()})[0]) for chunk in flat.split(64)]
        return torch.cat(out).view(*pixels.shape[:2], -1)

    return run


def calibration_pixels(model, photos: list[str], n_views: int = 220) -> torch.Tensor:
    """About `n_views` tower inputs from the given (training) room photos."""
    chunks, total = [], 0
    for photo in photos:
        views = model.preprocess_room_views([photo])[0]
        chunks.append(views)
        total += len(views)
        if total >= n_views:
            break
    return torch.cat(chunks).cpu()


def time_views(model, encode, photos: list[str]) -> list[float]:
    """Seconds per photo of preprocessing plus encoding its views, after one warm-up photo."""
    with torch.inference_mode():
        encode(model.preprocess_room_views([photos[0]]))
        seconds = []
        for photo in photos:
            started = time.perf_counter()
            encode(model.preprocess_room_views([photo]))
            seconds.append(time.perf_counter() - started)
    return seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def validation_quality(folder: Path, data_root: Path, int8: bool) -> dict:
    """Recall@10 / NDCG@10 on the model's held-out rooms, room views in fp32 and (optionally) int8."""
    import hgm_mm.embedding.batch as batch
    from hgm_mm.data.records import load_dataset
    from hgm_mm.evaluation.evaluate import evaluate, held_out_rooms
    from hgm_mm.models.hgm import load_model

    model = load_model(folder).eval()
    data = load_dataset(data_root)
    held_out, _ = held_out_rooms(data.rooms, folder)
    held_ids = {r.room_id for r in held_out}
    train_photos = [str(r.image) for r in data.rooms if r.room_id not in held_ids]

    def measure() -> dict:
        metrics = evaluate(model, data.products, held_out, data.pairs, progress=False).metrics
        return {"recall@10": metrics["recall@10"], "ndcg@10": metrics["ndcg@10"]}

    result = {"rooms": len(held_out), "fp32": measure()}
    if int8:
        quantised = int8_encoder(model, calibration_pixels(model, train_photos))
        original = batch._encoder

        def rooms_in_int8(model_, *, room_views, **options):
            return quantised if room_views else original(model_, room_views=room_views, **options)

        batch._encoder = rooms_in_int8
        try:
            result["int8"] = measure()
        finally:
            batch._encoder = original
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("HGM_DATA", REPO_ROOT.parent / "shared" / "data")))
    parser.add_argument("--photos", type=int, default=20, help="IKEA room photos timed per design")
    parser.add_argument("--sizes", type=int, nargs="*", default=[640, 960], help="feature-map sides to time")
    parser.add_argument("--trained", action="append", default=[], help="NAME=DIR: a trained model folder to score")
    parser.add_argument("--no-int8", action="store_true", help="leave the int8 probe out")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "room_views.json")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the JSON and RESULTS.md alone")
    args = parser.parse_args(argv)

    ikea = args.data / "ikea"
    if not (ikea / "rooms.jsonl").is_file():
        print(f"skipped: {ikea / 'rooms.jsonl'} not found; point --data (or HGM_DATA) at the shared data folder")
        return 0
    warnings.simplefilter("ignore")
    import hgm_mm
    from hgm_mm.data.records import load_dataset
    from hgm_mm.embedding.batch import photo_encoder

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rooms = load_dataset(ikea, check_images=False).rooms
    timed = [str(r.image) for r in rooms[-args.photos:]]
    calibration_photos = [str(r.image) for r in rooms[:len(rooms) - args.photos]]
    designs = [("crops 55", {"room_views": "crops"})] + [
        (f"feature map {size}", {"room_views": "feature_map", "room_map_size": size}) for size in args.sizes]
    latency = {}
    for name, overrides in designs:
        model = hgm_mm.create_model("hgm-lite-en", **overrides).eval()
        engines = {"fp32": photo_encoder(model, room_views=True, engine="onnxruntime")}
        if not args.no_int8:
            engines["int8"] = int8_encoder(model, calibration_pixels(model, calibration_photos))
        for engine, encode in engines.items():
            seconds = time_views(model, encode, timed)
            latency[f"{name}, {engine}"] = {"p50_ms": 1000 * statistics.median(seconds),
                                            "p95_ms": 1000 * percentile(seconds, 0.95)}
            print(f"{name:>16} {engine}: p50 {latency[f'{name}, {engine}']['p50_ms']:.1f} ms, "
                  f"p95 {latency[f'{name}, {engine}']['p95_ms']:.1f} ms", flush=True)
    quality = {}
    for item in args.trained:
        name, _, folder = item.partition("=")
        quality[name] = validation_quality(Path(folder), ikea, int8=not args.no_int8)
        print(f"{name}: {quality[name]}", flush=True)

    reference = latency["crops 55, fp32"]["p50_ms"]
    machine = describe_machine()
    result = {"machine": machine, "photos": len(timed), "latency": latency, "quality": quality}
    if not args.no_record:
        cells = "; ".join(f"{name} p50 {v['p50_ms']:.0f} ms ({reference / v['p50_ms']:.1f}×)"
                          for name, v in latency.items() if name != "crops 55, fp32")
        quality_cells = "; ".join(
            f"{name}: " + ", ".join(f"{k} R@10 {q[k]['recall@10']:.4f} NDCG@10 {q[k]['ndcg@10']:.4f}"
                                    for k in ("fp32", "int8") if k in q) for name, q in quality.items())
        fastest = min((v["p50_ms"], name) for name, v in latency.items())
        record_result(args.out, result, "room_views",
                      f"| room photo → view vectors (hgm-lite-en, {len(timed)} IKEA room photos, ONNX Runtime, "
                      f"{torch.get_num_threads()} threads; `bench_room_views.py`) "
                      f"| {cells}{'; quality on held-out rooms: ' + quality_cells if quality else ''} "
                      f"| 55 crops fp32 p50 {reference:.0f} ms, p95 {latency['crops 55, fp32']['p95_ms']:.0f} ms "
                      f"| fastest ({fastest[1]}) {reference / fastest[0]:.1f}× |")
    print(f"machine: {machine_summary(machine)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
