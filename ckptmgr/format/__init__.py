"""Bytes <-> objects: the formats ckptmgr writes and reads, none of which runs pickle code.

* :mod:`.safetensors`: a streaming reader/writer of the safetensors format;
* :mod:`.skeleton`: the JSON "skeleton" that carries nested structure beside tensors;
* :mod:`.torchfile`: ``torch.save`` files, read with ``weights_only=True`` unless trusted;
* :mod:`.checksum`: hashing beside the I/O; :mod:`.manifest`: the commit record of a step;
* :mod:`.weights`: the one writer of a single-file weights checkpoint.
"""
