"""Prints the README's Performance table (markdown) from a `bench_save_load.py` JSON file."""

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
    "ksuit_async": "**ksuit async save** (steady state)",
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
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, nargs="?", default=Path(__file__).with_name("results.json"))
    data = json.loads(parser.parse_args().results.read_text())
    results = data["results"]
    raw = results["raw_buffered"]["gbps"]
    print("| method | seconds | blocks training (s) | GB/s | x raw disk | peak extra memory (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key, r in results.items():
        if "seconds" not in r:
            continue
        blocked = f"{r['blocked']:.2f}" if "blocked" in r else ""
        gbps = r.get("gbps")
        extra = f"{r['peak_extra'] / GIB:.2f}" if r.get("peak_extra") is not None else ""
        print(
            f"| {LABELS.get(key, key)} | {r['seconds']:.2f} | {blocked} | "
            f"{gbps:.2f} | {gbps / raw:.2f} | {extra} |"
        )
    print()
    for t in data["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        print(f"- {'met' if t['met'] else '**missed**'}: {t['target']}: {value} (goal {t['goal']})")


if __name__ == "__main__":
    main()
