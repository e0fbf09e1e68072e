"""Run by tests in a fresh process: exports a sharded checkpoint folder and prints the peak
resident memory before and after (ru_maxrss, KiB), once everything is imported and the folder's
metadata was read, so the difference is what the export itself held."""

import json
import resource
import sys
from pathlib import Path

from ksuit.storage import open_backend
from ksuit.storage.sharded.consolidate import export_sharded
from ksuit.storage.sharded.load import read_folder_metadata

source, to, target = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
folder = open_backend(source.parent).child(source.name)
read_folder_metadata(folder)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
written = export_sharded(folder, to, open_backend(target.parent), target.name)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after, "size": written.size}))
