"""Checks crash states in a fresh process, for `test_crash_states.py`.

`python crash_check_worker.py JOB.json RESULT.json`: JOB lists states as `(name, blob)` pairs
(blobs are files named by their checksum in `blobs_dir`) and the update of the last save that
returned before the crash. For each state the worker materializes it as a fresh run folder and
runs what a restarted run runs: recovery, then resume selection. It records a violation when

- recovery raises, or leaves a temporary file or a journal behind;
- a manifest in the folder lists a file that is missing or does not match its size and checksum,
  or files that carry different training iterations (a torn set);
- a checkpoint file is listed by no manifest (half of a deleted set: `ksuit verify` reports it);
- resume finds no set although a save had returned, or picks one older than that save;
- a file of the chosen set does not load or carries another iteration than the set.

Iterations are read from the files themselves (`training_iteration` of weights and trainer
files, the optimizer's `step`), not from the manifest.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import xxhash

from ksuit.readers import select_resume_set
from ksuit.storage import recover_folder

GROUP = "autoencoder"


class Checker:
    def __init__(self, blobs_dir: Path, work_dir: Path):
        self.blobs_dir = blobs_dir
        self.work_dir = work_dir
        self.blobs: dict[str, bytes] = {}
        self.updates: dict[str, int | str] = {}  # checksum -> update carried, or an error

    def blob(self, key: str) -> bytes:
        if key not in self.blobs:
            self.blobs[key] = (self.blobs_dir / key).read_bytes()
        return self.blobs[key]

    def update_of(self, data: bytes) -> int | str:
        key = xxhash.xxh3_64_hexdigest(data)
        if key not in self.updates:
            try:
                payload = torch.load(io.BytesIO(data), weights_only=True)
                if "training_iteration" in payload:
                    self.updates[key] = int(payload["training_iteration"]["update"])
                else:  # an optimizer state: every parameter took one step per update
                    steps = {int(s["step"]) for s in payload["state"].values()}
                    self.updates[key] = steps.pop() if len(steps) == 1 else f"optimizer steps {steps}"
            except Exception as e:
                self.updates[key] = f"does not load: {type(e).__name__}: {str(e)[:80]}"
        return self.updates[key]

    def check(self, state: dict) -> list[str]:
        run_dir = self.work_dir / str(state["id"])
        folder = run_dir / "checkpoints"
        folder.mkdir(parents=True)
        for name, key in state["files"]:
            (folder / name).write_bytes(self.blob(key))
        try:
            return self._check(run_dir, folder, state["returned"])
        finally:
            shutil.rmtree(run_dir)

    def _check(self, run_dir: Path, folder: Path, returned: int | None) -> list[str]:
        violations = []
        try:
            recover_folder(folder)
        except Exception as e:
            return [f"recovery raised {type(e).__name__}: {str(e)[:200]}"]
        left = sorted(n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith(".ksuit-journal"))
        if left:
            violations.append(f"leftover after recovery: {left}")
        listed = set()
        for manifest in sorted(folder.glob("*.manifest.json")):
            doc = json.loads(manifest.read_text())
            listed.update(doc["files"])
            problem = self._set_problem(folder, doc)
            if problem:
                violations.append(f"torn set {manifest.name}: {problem}")
        orphans = sorted(n for n in os.listdir(folder) if n.endswith(".th") and n not in listed)
        if orphans:
            violations.append(f"files no manifest lists: {orphans}")
        try:
            chosen, _skipped = select_resume_set(run_dir, GROUP)
        except FileNotFoundError as e:
            if returned is not None:
                violations.append(f"no set to resume from after the save of update {returned} returned: {e}")
            return violations
        except Exception as e:
            return [*violations, f"resume raised {type(e).__name__}: {str(e)[:200]}"]
        update = chosen.training_iteration.update
        if returned is not None and update < returned:
            violations.append(f"resume went back to update {update}; the save of update {returned} returned")
        for name in chosen.manifest.files:
            carried = self.update_of((folder / name).read_bytes())
            if carried != update:
                violations.append(f"chosen set {chosen.tag} at update {update}: {name} carries {carried}")
        return violations

    def _set_problem(self, folder: Path, manifest: dict) -> str | None:
        updates = {}
        for name, entry in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                return f"{name} missing"
            data = path.read_bytes()
            if len(data) != entry["size"] or xxhash.xxh3_64_hexdigest(data) != entry["checksum"]:
                return f"{name} does not match the manifest"
            updates[name] = self.update_of(data)
        if len(set(updates.values())) > 1:
            return f"files of different iterations {sorted(set(map(str, updates.values())))}"
        return None


def trust_journals_blindly() -> None:
    """A mutation for the test of the test: recovery takes a journal's files for staged when
    their temporary names exist and for renamed when they do not, without checking sizes and
    checksums (what recovery did before journals recorded them)."""
    import stat

    import ksuit.storage.local.recovery as recovery

    def entry_state(folder: Path, entry) -> str:
        temp = folder / entry.temp
        if not os.path.lexists(temp):
            return "applied"
        return "staged" if stat.S_ISREG(os.lstat(temp).st_mode) else "broken"

    recovery._entry_state = entry_state


def main(job_path: str, result_path: str) -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # recovery reports every discarded save; the states are many
    job = json.loads(Path(job_path).read_text())
    if job.get("trust_journals_blindly"):
        trust_journals_blindly()
    checker = Checker(Path(job["blobs_dir"]), Path(job["work_dir"]))
    start = time.perf_counter()
    results = []
    for state in job["states"]:
        violations = checker.check(state)
        if violations:
            results.append({"id": state["id"], "violations": violations})
    Path(result_path).write_text(
        json.dumps({"checked": len(job["states"]), "failed": results, "seconds": time.perf_counter() - start})
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
