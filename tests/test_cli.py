"""How a script's process ends: cli.exit_process."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # buffered, as by default
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_exit_process_flushes_piped_output_and_keeps_the_status():
    # Into a pipe, stdout is block-buffered: the short last write waits in its buffer until flushed.
    done = run_python("import sys\nfrom influence import cli\nsys.stdout.write('x' * 200_000)\nsys.stdout.write('end')\n"
                           "print('to stderr', file=sys.stderr, end='')\ncli.exit_process(3)")
    assert done.returncode == 3
    assert done.stdout == "x" * 200_000 + "end" and done.stderr == "to stderr"


def test_exit_process_under_a_profiler_exits_normally_so_the_report_is_written(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom influence import cli\n"
                      "def work():\n    return sum(range(10))\nwork()\ncli.exit_process(4)\n")
    done = subprocess.run([sys.executable, "-m", "cProfile", str(script)], capture_output=True, text=True, timeout=60)
    # (python -m cProfile itself ends with status 0 whatever the script's)
    assert "function calls" in done.stdout and "(work)" in done.stdout  # cProfile's report, printed at exit
