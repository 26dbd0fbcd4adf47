import subprocess
import sys


def test_help_imports_nothing_heavy():
    """`loratool --help` lists the commands without importing torch, triton, numpy, transformers
    or PEFT (its speed is measured in bench/bench_inspect.py, not here)."""
    code = ("import sys; from loratool.cli import cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'triton', 'numpy', 'transformers', 'peft') if m in sys.modules]; "
            "print(heavy)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    p = subprocess.run([sys.executable, "-m", "loratool", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "inspect" in p.stdout and "validate" in p.stdout


def test_bad_usage_exits_2():
    p = subprocess.run([sys.executable, "-m", "loratool", "inspect"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "loratool", "no-such-command"], capture_output=True, text=True)
    assert p.returncode == 2
