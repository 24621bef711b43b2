#!/usr/bin/env python3
"""The built-in demo: the whole pipeline on handwritten digits with planted label errors.

    python demo.py                 # everything under demo/
    python demo.py --out /tmp/d    # elsewhere; --help lists the size options

See influence/demo.py for what it does, step by step.
"""

import sys

from influence import cli

if __name__ == "__main__":
    cli.quiet_tensorflow()
    from influence.demo import main

    sys.exit(cli.run(main))
