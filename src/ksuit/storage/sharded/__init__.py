"""Sharded checkpoints: a model's or optimizer's state that lives in shards on several ranks
(FSDP2 `fully_shard`, DTensor), written and read through torch.distributed.checkpoint (DCP)
with ksuit's guarantees.

A sharded checkpoint is a folder named like the file it replaces,
`<name>_cp=<tag>_<role>.dcp/`, holding

    __<rank>_0.distcp    each rank's shards (DCP's layout: a `torch.save` archive per chunk)
    .metadata            DCP's metadata: every tensor's size, dtype and chunks, where each lies
    ksuit.th             the payload without its tensors (`model_config`, `config_kind`,
                         `run_id`, iteration; an optimizer's `param_groups`) and where each
                         tensor goes: `torch.load(weights_only=True)` reads it

so it stays a plain DCP checkpoint (`torch.distributed.checkpoint.load` reads it) and a
reader needs no process group to rebuild the payload of the file it replaces.

Writing (`save`, `writer`): one DCP save per set writes every sharded folder of the set, each
rank through `Backend.write_part` into folders the coordinator staged; the set writer
(`ksuit.storage.sets.SetWriter`) commits them with the set's other files once every rank's
parts are durable. Reading (`metadata`, `reader`, `load`): `.metadata` through an allowlisting
unpickler, every chunk checked like a `.th` file; loads either consolidate in one process or
reshard onto the calling ranks (DCP). `verify` checks a folder without loading its tensors,
`consolidate` writes it as one `.th` or `.safetensors` file tensor by tensor, `local` takes
DTensors apart for snapshots.

Its modules import torch.distributed.checkpoint (about a second): the rest of ksuit imports
them only when a sharded checkpoint is written or read.
"""
