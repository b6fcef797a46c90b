"""Sharded checkpoints: FSDP2 / DTensor state saved by every rank through torch.distributed.checkpoint.

:mod:`.detect` tells whether a model is sharded without importing anything;
:mod:`.engine` collects, saves and loads DCP state on every rank; :mod:`.dcp_io`
is the DCP storage glue (the only module that imports DCP at its top, and it
is imported only when a sharded step is touched); :mod:`.consolidate` turns a
sharded step into one state dict or file in a single process.

Trust: DCP's metadata is a pickle, checked against the manifest and then read
with an allowlist unpickler (:mod:`.safe_pickle`): it can describe tensors, not
run code.
"""
from .consolidate import consolidate, export

__all__ = ["consolidate", "export"]
