"""ksuit from any training loop.

- `ksuit.integrations.loop`: a plain PyTorch loop (no ksuit trainer): `LoopState` (counters,
  RNG and your stateful objects as the writer's "trainer") and `resume`; with
  `ksuit.models.wrap` for plain modules. Also exported as `ksuit.LoopState` and `ksuit.resume`.
- `ksuit.integrations.lightning`: `KsuitCheckpointIO`, a Lightning `CheckpointIO` plugin
  (needs `pip install 'ksuit[lightning]'`).
- `ksuit.integrations.transformers`: `KsuitCallback` and `last_complete_checkpoint` for the
  Hugging Face `Trainer` (needs `pip install 'ksuit[transformers]'`).

Importing this package imports neither framework.
"""
