#!/usr/bin/env python
"""Post-training quantization with BRECQ / QDrop block reconstruction and MRECG grouping (see --help).

The entry point users know; the same as the ``mrecg-ptq`` console script (``mrecg.cli``).
"""
import sys

from mrecg.cli import main

if __name__ == '__main__':
    sys.exit(main())
