#!/usr/bin/env python3
"""The built-in demo: the whole pipeline on handwritten digits with planted label errors.

    python demo.py                 # everything under demo/
    python demo.py --out /tmp/d    # elsewhere; --help lists the size options

The demo itself lives in examples/digits/ (see its __init__.py for the steps).
"""

from influence import cli

if __name__ == "__main__":
    cli.quiet_tensorflow()
    from examples.digits.run import main

    cli.exit_process(cli.run(main))
