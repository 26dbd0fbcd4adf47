import subprocess
import sys
import time


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.perf_counter(); from loratool.cli import cli; "
            "import click; from click.testing import CliRunner; r = CliRunner().invoke(cli, ['--help']); "
            "assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'triton', 'numpy', 'transformers', 'peft') if m in sys.modules]; "
            "print(heavy)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "loratool", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    assert p.returncode == 0 and "inspect" in p.stdout and "validate" in p.stdout
    assert elapsed < 2.0  # generous for a loaded CI machine; `make demo` shows the real figure


def test_bad_usage_exits_2():
    p = subprocess.run([sys.executable, "-m", "loratool", "inspect"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "loratool", "no-such-command"], capture_output=True, text=True)
    assert p.returncode == 2
