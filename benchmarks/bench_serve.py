"""Load test of `hgm-mm serve` on loopback: concurrent clients for a fixed time, then a spot check.

The service runs in its own process (`hgm-mm serve --index DIR --port 0`) over the whole IKEA
catalogue embedded by the model. For each request mix (words alone: the scene phrases of the
data; room photos: IKEA room photos; both), `--clients` threads post to ``/match`` back to back
for `--seconds`, each request bounded by a timeout, and the test stops by itself. It reports
p50/p95/p99 latency, throughput and errors per mix. Afterwards, with the service stopped, this
process loads the same folder and checks `--spot-checks` of the recorded answers against
`Matcher.match` on the same input (same products in the same order, scores within 1e-4).

The reference, in the same run, is what a shopper had before the service: one `hgm-mm match`
call per request, which loads the model from cold each time.

    python benchmarks/bench_serve.py [--data ../shared/data] [--model hgm-lite-en] [--clients 20]
                                     [--seconds 60] [--mixes text photo] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, record_result  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT_S = 120.0
START_TIMEOUT_S = 300.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def build_index(model_name: str, ikea: Path, folder: Path) -> None:
    """The IKEA catalogue embedded by the model, with the scene-category prior of the IKEA rooms."""
    import hgm_mm
    from hgm_mm.data import read_pairs, read_products, read_rooms
    from hgm_mm.ranking.catalog import build_catalog_index
    from hgm_mm.ranking.prior import SceneCategoryPrior

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hgm_mm.RandomInitWarning)
        model = hgm_mm.create_model(model_name)
    products = read_products(ikea / "products.jsonl")
    prior = SceneCategoryPrior.from_pairs(read_rooms(ikea / "rooms.jsonl"), products, read_pairs(ikea / "pairs.csv"))
    build_catalog_index(model, products, folder, prior=prior, progress=False)


def start_service(index_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(log_path, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "hgm_mm", "serve", "--index", str(index_dir), "--port", "0"],
                                   stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line.startswith("Serving on "):
            return process, line.split()[2]
    process.kill()
    raise SystemExit(f"the service did not start:\n{log_path.read_text()[-3000:]}")


def load_test(url: str, requests: list[dict], clients: int, seconds: float, seed: int) -> dict:
    """`clients` threads posting requests drawn from `requests` for `seconds`; every answer kept."""
    import httpx

    stop_at = time.monotonic() + seconds
    records: list[dict] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        draw = random.Random(seed * 1000 + worker)
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
            while time.monotonic() < stop_at:
                request = draw.choice(requests)
                files = {"photo": ("room.jpg", request["photo_bytes"], "image/jpeg")} if request.get("photo") else None
                data = {"k": "10", **({"text": request["text"]} if request.get("text") else {})}
                began = time.perf_counter()
                try:
                    answer = http.post("/match", files=files, data=data)
                    status, document = answer.status_code, (answer.json() if answer.status_code == 200 else None)
                except httpx.HTTPError as err:
                    status, document = type(err).__name__, None
                with lock:
                    records.append({"request": request["name"], "status": status, "document": document,
                                    "ms": (time.perf_counter() - began) * 1e3})

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    ok = [r["ms"] for r in records if r["status"] == 200]
    return {"requests": len(records), "errors": len(records) - len(ok), "elapsed_s": round(elapsed, 1),
            "throughput_per_s": round(len(ok) / elapsed, 2),
            "p50_ms": round(percentile(ok, 50), 1) if ok else None, "p95_ms": round(percentile(ok, 95), 1) if ok else None,
            "p99_ms": round(percentile(ok, 99), 1) if ok else None, "records": records}


def spot_check(index_dir: Path, requests: dict[str, dict], records: list[dict], count: int, seed: int) -> dict:
    """Recorded answers against `Matcher.match` on the same input, in this process."""
    from hgm_mm.ranking.matcher import Matcher
    from hgm_mm.apps.serving import read_room_photo

    matcher = Matcher.load(index_dir)
    answered = [r for r in records if r["status"] == 200]
    chosen = random.Random(seed).sample(answered, min(count, len(answered)))
    wrong = []
    for record in chosen:
        request = requests[record["request"]]
        image = read_room_photo(request["photo_bytes"]) if request.get("photo") else None
        result = matcher.match(image=image, text=request.get("text"), k=10)
        served = record["document"]
        same = (served["scene"] == result.scene
                and [p["product_id"] for p in served["products"]] == [p.product_id for p in result.products]
                and [p["product_id"] for p in served["product_set"]] == [p.product_id for p in result.product_set]
                and all(abs(p["score"] - q.score) <= 1e-4 for p, q in zip(served["products"], result.products)))
        if not same:
            wrong.append(record["request"])
    return {"checked": len(chosen), "wrong": len(wrong), "wrong_requests": wrong}


def cold_cli_calls(index_dir: Path, requests: list[dict], count: int) -> list[float]:
    """Seconds of `hgm-mm match` per request, each call loading the model from cold."""
    seconds = []
    for request in requests[:count]:
        command = [sys.executable, "-m", "hgm_mm", "match", "--index", str(index_dir), "-k", "10", "--json"]
        if request.get("photo"):
            command.insert(4, request["photo"])
        if request.get("text"):
            command += ["--text", request["text"]]
        began = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        seconds.append(time.perf_counter() - began)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hgm-lite-en", help="a model name or a saved model folder")
    parser.add_argument("--index", type=Path, help="an index folder to serve (default: the IKEA catalogue, "
                                                   "embedded by --model into a temporary folder)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("HGM_DATA", REPO_ROOT.parent / "shared" / "data")))
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each mix's load test")
    parser.add_argument("--mixes", nargs="+", default=["text", "photo"], choices=["text", "photo", "both"])
    parser.add_argument("--spot-checks", type=int, default=20, help="answers of each mix checked against Matcher.match")
    parser.add_argument("--cold-calls", type=int, default=2, help="`hgm-mm match` calls timed as the reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the JSON and RESULTS.md alone")
    args = parser.parse_args(argv)

    from hgm_mm.data import read_rooms

    ikea = args.data / "ikea"
    texts_file = args.data / "scene-texts" / "texts.jsonl"
    if not (ikea / "rooms.jsonl").is_file() or not texts_file.is_file():
        raise SystemExit(f"no IKEA rooms or scene phrases under {args.data}: give --data DIR or set HGM_DATA")
    phrases = [json.loads(line)["text"] for line in texts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    photos = [room.image for room in read_rooms(ikea / "rooms.jsonl")][:40]
    pools = {
        "text": [{"name": f"text:{i}", "text": t} for i, t in enumerate(phrases)],
        "photo": [{"name": f"photo:{p.name}", "photo": str(p), "photo_bytes": p.read_bytes()} for p in photos],
    }
    pools["both"] = [{**photo, "name": f"both:{i}", "text": pools["text"][i % len(phrases)]["text"]}
                     for i, photo in enumerate(pools["photo"])]
    machine = describe_machine()
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = args.index
        if index_dir is None:
            index_dir = Path(tmp) / "ikea-index"
            began = time.perf_counter()
            build_index(args.model, ikea, index_dir)
            print(f"indexed the IKEA catalogue with {args.model} in {time.perf_counter() - began:.0f} s", flush=True)
        reference = {mix: cold_cli_calls(index_dir, pools[mix], args.cold_calls) for mix in args.mixes}
        print("cold `hgm-mm match` per call: " + ", ".join(f"{mix} {statistics.median(s):.1f} s"
                                                          for mix, s in reference.items()), flush=True)
        began = time.perf_counter()
        process, url = start_service(index_dir, Path(tmp) / "serve.log")
        startup_s = time.perf_counter() - began
        try:
            runs = {}
            for mix in args.mixes:
                runs[mix] = load_test(url, pools[mix], args.clients, args.seconds, args.seed)
                print(f"{mix}: {args.clients} clients {runs[mix]['elapsed_s']} s: {runs[mix]['requests']} requests, "
                      f"{runs[mix]['errors']} errors, p50 {runs[mix]['p50_ms']} ms, p95 {runs[mix]['p95_ms']} ms, "
                      f"p99 {runs[mix]['p99_ms']} ms, {runs[mix]['throughput_per_s']} /s", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)
        by_name = {r["name"]: r for pool in pools.values() for r in pool}
        for mix, run in runs.items():
            run["spot_check"] = spot_check(index_dir, by_name, run.pop("records"), args.spot_checks, args.seed)
            print(f"{mix}: spot check {run['spot_check']['wrong']} wrong of {run['spot_check']['checked']}", flush=True)

    report = {"machine": machine, "model": args.model, "clients": args.clients, "seconds": args.seconds,
              "service_startup_s": round(startup_s, 1), "mixes": runs,
              "reference_cold_match_s": {mix: [round(s, 2) for s in seconds] for mix, seconds in reference.items()}}
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    if not args.no_record:
        for mix, run in runs.items():
            cold = statistics.median(reference[mix])
            line = (f"| `hgm-mm serve` load test, {mix} requests ({args.model}, IKEA catalogue; {args.clients} "
                    f"concurrent clients on loopback for {args.seconds:g} s, run by the benchmark on the same cores) "
                    f"| p50 {run['p50_ms']:.0f} ms, p95 {run['p95_ms']:.0f} ms, p99 {run['p99_ms']:.0f} ms; "
                    f"{run['throughput_per_s']} requests/s, {run['errors']} errors of {run['requests']}; "
                    f"{run['spot_check']['wrong']} of {run['spot_check']['checked']} answers differ from Matcher.match "
                    f"| `hgm-mm match` per request (cold model load) {cold:.1f} s "
                    f"| {cold * run['throughput_per_s']:.0f}× the requests per second |")
            record_result(args.out.with_name(f"serve_{mix}.json"), {**report, "mix": mix}, f"serve_{mix}", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
