"""What every benchmark records: the machine it ran on, and its line in benchmarks/RESULTS.md."""
from __future__ import annotations

import json
import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# Benchmark results

Each line is the latest run of one benchmark, measured against its reference in the same run;
ratios > 1 mean hgm_mm is faster (or scores higher). Re-run a benchmark to refresh its line.

| benchmark | hgm_mm | reference | ratio | machine | date |
| --- | --- | --- | --- | --- | --- |
"""


def describe_machine() -> dict:
    """CPU model, cores, memory, accelerator and library versions."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = re.findall(r"model name\s*:\s*(.+)", f.read())
            cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "torch_threads": torch.get_num_threads(),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(), "torch": torch.__version__,
    }


def machine_summary(machine: dict) -> str:
    memory = f", {machine['memory_gib']} GiB" if machine.get("memory_gib") else ""
    return f"{machine['cpu']}, {machine['cores']} cores{memory}, GPU: {machine.get('accelerator', 'none')}"


def record_result(json_path: Path, result: dict, key: str, markdown_cells: str) -> None:
    """Writes the JSON result and puts this benchmark's line (keyed by `key`) into RESULTS.md."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result = {**result, "date": today()}
    json_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    update_results_md(key, markdown_cells, result["machine"])


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def update_results_md(key: str, markdown_cells: str, machine: dict) -> None:
    """Replaces the RESULTS.md line of benchmark `key` (benchmark | hgm_mm | reference | ratio cells)."""
    line = f"{markdown_cells.rstrip().rstrip('|')}| {machine_summary(machine)} | {today()} | <!-- {key} -->"
    lines = RESULTS_MD.read_text(encoding="utf-8").splitlines() if RESULTS_MD.is_file() else HEADER.splitlines()
    lines = [existing for existing in lines if not existing.endswith(f"<!-- {key} -->")]
    RESULTS_MD.write_text("\n".join(lines + [line]) + "\n", encoding="utf-8")
