"""``python -m ckptmgr.cli``: the same as the ``ckptmgr`` command."""
import sys

from . import main

sys.exit(main())
