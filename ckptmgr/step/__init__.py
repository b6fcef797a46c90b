"""A checkpoint step: its files, its formats, how it is committed, listed, owned and read back.

Where a save's bytes go and when a step becomes visible is decided here:
:mod:`.formats` says what each rank writes (plain or sharded), :mod:`.files`
writes and verifies the component files, :mod:`.save` runs the agreed
prepare/write/commit sequence, :mod:`.commit` holds the two commit protocols
(rename a temporary directory, or write the manifest last), :mod:`.index`
lists committed steps, :mod:`.ownership` keeps one writer per directory, and
:mod:`.load` reads steps back with the fallback past damaged ones. Tiered
checkpoints (a local tier on every node's disk, uploaded to the persistent
directory) are :mod:`.tiers`, built on :mod:`.tierview` (what both tiers hold),
:mod:`.localsave` (the local commit), :mod:`.upload` and :mod:`.tierload`.
"""
