"""Prints the README's Performance tables (markdown) from a `bench_save_load.py` JSON file: the
methods, then every target with its ratio in that run and MET, MISS or NOT MEASURED."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 1 << 30
LABELS = {
    "raw_buffered": "raw buffered write + fsync (the disk, page cache)",
    "raw_odirect": "raw O_DIRECT write, 16 MiB aligned buffers (the device)",
    "memcpy": "memcpy into touched memory",
    "ksuit_sync_torch": "**ksuit save, `.th`**",
    "ksuit_sync_torch_buffered": "ksuit save, `.th`, O_DIRECT off",
    "ksuit_sync_torch_crc": "ksuit save, `.th`, torch's CRC-32 left on",
    "ksuit_sync_safetensors": "**ksuit save, safetensors weights**",
    "ksuit_async": "**ksuit async save** (steady state; memory prepared at set-up)",
    "ksuit_async_unprepared": "ksuit async save, first save without `prepare`",
    "ksuit_async_small": "**ksuit async save**, 5,000 tensors of 64 KiB (steady state)",
    "many_files": "**ksuit `latest` of 20 submodels + trainer** (41 small files)",
    "torch_save": "`torch.save` + fsync",
    "safetensors_save": "safetensors `save_file` + fsync",
    "dcp_save": "torch.distributed.checkpoint `save`",
    "dcp_async_save": "torch.distributed.checkpoint `async_save` (steady state)",
    "load_torch": "load: `torch.load`",
    "load_torch_mmap": "load: `torch.load(mmap=True)`",
    "load_safetensors": "load: safetensors `load_file`",
    "load_ksuit_th": "**load: `ksuit.load_model`, `.th`**",
    "load_ksuit_safetensors": "**load: `ksuit.load_model`, safetensors**",
    "load_torch_mmap_of_ksuit_file": "load: `torch.load(mmap=True)` of ksuit's `.th`",
    "load_safetensors_of_ksuit_file": "load: safetensors `load_file` of ksuit's file",
    "resume_ksuit": "**resume: choose, verify, load into the model** (weights, AdamW, trainer)",
    "resume_torch_mmap": "resume baseline: `torch.load(mmap=True)` of the same files",
}


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, nargs="?", default=Path(__file__).with_name("results.json"))
    data = json.loads(parser.parse_args().results.read_text())
    results = data["results"]
    raw = results.get("raw_buffered", {}).get("gbps")
    print("| method | seconds | blocks training (s) | GB/s | x raw disk | peak extra memory (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key, r in results.items():
        if "seconds" not in r:
            continue
        gbps = r.get("gbps")
        extra = r["peak_extra"] / GIB if r.get("peak_extra") is not None else None
        x_raw = gbps / raw if gbps and raw else None
        cells = [_cell(r.get("blocked"), ".3f"), _cell(gbps, ".2f"), _cell(x_raw, ".2f"), _cell(extra, ".2f")]
        print(f"| {LABELS.get(key, key)} | {r['seconds']:.2f} | {' | '.join(cells)} |")
    print()
    print("| target | ratio in this run | goal | |")
    print("| --- | ---: | ---: | --- |")
    for t in data["targets"]:
        met = t["met"]
        verdict = "not measured" if met is None else "MET" if met else "**MISS**"
        print(f"| {t['target']} | {_cell(t['value'], '.2f') or 'n/a'} | {t['goal']} | {verdict} |")


if __name__ == "__main__":
    main()
