"""``python -m examples.digits``: the same as ``python demo.py``."""

from influence import cli

if __name__ == "__main__":
    cli.quiet_tensorflow()
    from examples.digits.run import main

    cli.exit_process(cli.run(main))
