"""Remote files for the loaders: the download cache, its HTTP client, and model-zoo name tables.

:mod:`.cache` fetches a remote file once per node (local rank 0 first),
verifies it and renames it into ``$CKPTMGR_HOME/hub/checkpoints``;
:mod:`.http` is the HTTP(S) client with retries and Range resume; :mod:`.zoo`
resolves ``torchvision://``, ``open-mmlab://`` and ``mmcls://`` names to URLs.
"""
