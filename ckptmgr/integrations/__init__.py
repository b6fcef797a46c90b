"""Bridges to the trainers people already use, so they keep their trainer and get ckptmgr's checkpoints.

* :mod:`ckptmgr.integrations.lightning`: ``CkptmgrCheckpointIO``, a Lightning
  ``CheckpointIO`` plugin (``Trainer(plugins=[CkptmgrCheckpointIO()])``);
* :mod:`ckptmgr.integrations.mmengine`: ``CkptmgrHook`` for mmengine's Runner
  and ``register_loaders()`` for its ``load_from`` / ``CheckpointLoader``.

Each submodule imports its framework when it is imported (and raises
:class:`~ckptmgr.errors.MissingDependencyError` with an install hint when the
framework is missing); this package and ``import ckptmgr`` import neither.
"""
