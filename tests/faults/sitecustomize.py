"""Start-up hook of fault-injected subprocesses (see tests/faultlib.py): applies $DROPPOS_FAULTS."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faultlib  # noqa: E402

del sys.path[0]
faultlib.install_from_env()
