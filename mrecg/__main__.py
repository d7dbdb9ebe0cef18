"""``python -m mrecg <command>``: the same as the installed ``mrecg`` command (``mrecg.commands``)."""
import sys

from mrecg.commands import main

sys.exit(main())
