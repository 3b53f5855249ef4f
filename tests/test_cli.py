"""The genrecal command line (CliRunner and the installed console script), the Makefile
bootstrap and the CI entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from genrecal import cli
from genrecal.common import config
from genrecal.common.errors import ConfigError
from genrecal.store.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = list(config.load_pipelines(REPO / "pipelines.yaml").pipelines)
CONSOLE_SCRIPT = Path(sys.executable).with_name("genrecal")
VENV = Path(sys.executable).parent.parent


@pytest.fixture
def runner(monkeypatch) -> CliRunner:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("GENRECAL_PIPELINES", raising=False)
    monkeypatch.delenv("GENRECAL_DEBUG", raising=False)
    return CliRunner()


@pytest.fixture
def bad_file(tmp_path) -> Path:
    """Three problems: an unknown key, a bad value and both steps and epochs."""
    pipeline = config.get_pipeline("demo", REPO / "pipelines.yaml").to_dict()
    pipeline["teacher"]["dtpye"] = "float32"
    pipeline["cache"]["batch_size"] = 0
    pipeline["stages"][0]["epochs"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"demo": pipeline}}, sort_keys=False))
    return path


def test_help_lists_the_commands(runner):
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    assert "pipelines" in result.stdout and "--file" in result.stdout


def test_version(runner):
    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip().startswith("genrecal ")


def test_pipelines_lists_every_pipeline_with_a_summary(runner):
    result = runner.invoke(cli.app, ["pipelines"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED
    demo = next(line for line in lines if line.startswith("demo "))
    assert "tiny:qwen2_vl" in demo and "->" in demo and "align -> distill -> finetune" in demo


def test_check_all(runner):
    result = runner.invoke(cli.app, ["pipelines", "check"])
    assert result.exit_code == 0, result.output
    assert f"{len(SHIPPED)} pipeline(s) valid" in result.stdout


def test_check_one(runner):
    result = runner.invoke(cli.app, ["pipelines", "check", "demo"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("1 pipeline(s) valid: demo")


def test_check_unknown_name_fails_with_the_available_names(runner):
    result = runner.invoke(cli.app, ["pipelines", "check", "nope"])
    assert result.exit_code == cli.EXIT_USER_ERROR
    assert "no pipeline named 'nope'" in result.stderr and "'demo'" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args", [
    ["pipelines", "check", "--file", "{bad}"],
    ["pipelines", "check", "-f", "{bad}", "demo"],
    ["--file", "{bad}", "pipelines", "check"],
    ["pipelines", "--file", "{bad}", "check"],
    ["pipelines", "--file", "{bad}"],
])
def test_bad_file_prints_every_problem_and_exits_2(runner, bad_file, args):
    result = runner.invoke(cli.app, [a.format(bad=bad_file) for a in args])
    assert result.exit_code == cli.EXIT_USER_ERROR, result.output
    assert result.stderr.startswith(f"genrecal: error: {bad_file}: 3 problem(s)")
    for path in ("pipelines.demo.teacher.dtpye", "pipelines.demo.cache.batch_size",
                 "pipelines.demo.stages[0].steps"):
        assert path in result.stderr
    assert "Traceback" not in result.output and result.exception is not None


def test_command_file_option_overrides_the_global_one(runner, bad_file):
    good = REPO / "pipelines.yaml"
    result = runner.invoke(cli.app, ["--file", str(bad_file), "pipelines", "check",
                                     "--file", str(good)])
    assert result.exit_code == 0, result.output


def test_file_from_the_environment(runner, bad_file):
    result = runner.invoke(cli.app, ["pipelines", "check"], env={"GENRECAL_PIPELINES": str(bad_file)})
    assert result.exit_code == cli.EXIT_USER_ERROR


def test_missing_file_is_one_clear_message(runner, tmp_path):
    result = runner.invoke(cli.app, ["pipelines", "check", "--file", str(tmp_path / "x.yaml")])
    assert result.exit_code == cli.EXIT_USER_ERROR
    assert "file not found" in result.stderr


def test_debug_shows_the_exception(runner, bad_file):
    result = runner.invoke(cli.app, ["--debug", "pipelines", "check", "--file", str(bad_file)])
    assert isinstance(result.exception, ConfigError)
    assert result.exit_code == 1


def test_other_exceptions_are_not_disguised(runner, monkeypatch):
    def broken(path=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(config, "load_pipelines", broken)
    result = runner.invoke(cli.app, ["pipelines"])
    assert isinstance(result.exception, RuntimeError)
    assert "genrecal: error" not in result.output


def test_which_errors_are_user_errors():
    assert cli.is_genrecal_error(ConfigError("f", []))
    assert cli.is_genrecal_error(DatasetError("bad sample", sample_id="s1"))
    assert not cli.is_genrecal_error(ValueError("x"))
    assert not cli.is_genrecal_error(yaml.YAMLError("x"))


# ---------------------------------------------------------------- installed console script

def run_script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENRECAL_")}
    return subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_console_script_checks_a_bad_file(bad_file):
    assert CONSOLE_SCRIPT.is_file(), "install the package: pip install -e ."
    done = run_script("pipelines", "check", "--file", str(bad_file))
    assert done.returncode == 2
    assert done.stderr.startswith("genrecal: error:") and "Traceback" not in done.stderr
    assert "pipelines.demo.teacher.dtpye" in done.stderr and done.stdout == ""


def test_console_script_lists_the_packaged_default(tmp_path):
    done = run_script("pipelines", "check", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "(packaged default)" in done.stdout


# ---------------------------------------------------------------- Makefile and CI entry point

def make(*args: str) -> subprocess.CompletedProcess:
    """Run make in the repository, independent of an outer make (CI runs us inside one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_make_bootstraps_a_fresh_venv_from_the_lock(tmp_path):
    venv = tmp_path / "venv"
    for target in ("test", "test-fast", "demo"):
        done = make("-n", target, f"VENV={venv}")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        steps = [next(i for i, line in enumerate(lines) if needle in line) for needle in (
            "-m venv", "install --only-binary=:all: -r requirements/lock.txt", "install --no-deps -e .",
            "pip check")]
        assert steps == sorted(steps)
    lock = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    assert "torch==2.13.0+cpu" in lock  # the CPU build: no CUDA wheel satisfies the pin
    assert "-m pytest --timeout=" in make("-n", "test", f"VENV={venv}").stdout
    assert '-m "not slow"' in make("-n", "test-fast", f"VENV={venv}").stdout
    assert "genrecal run demo" in make("-n", "demo", f"VENV={venv}").stdout


def test_make_reinstalls_only_when_the_lock_or_pyproject_changes(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".genrecal-installed").touch()
    fresh = make("-n", "test", f"VENV={venv}").stdout
    assert "pip install" not in fresh and "-m pytest" in fresh
    os.utime(venv / ".genrecal-installed", (0, 0))  # older than pyproject.toml and the lock
    stale = make("-n", "test", f"VENV={venv}").stdout
    assert "-r requirements/lock.txt" in stale and "install --no-deps -e ." in stale


def test_no_tests_collected_fails_make_test(tmp_path):
    (tmp_path / "test_nothing.py").write_text("def test_one():\n    pass\n")
    done = make("test", f"VENV={VENV}", f"-o{VENV}/.genrecal-installed",
                f"PYTEST_ARGS={tmp_path / 'test_nothing.py'} -k no_such_test -p no:cacheprovider")
    assert "1 deselected" in done.stdout
    assert done.returncode != 0 and "Error 5" in done.stderr


def test_ci_entry_point_runs_make_test():
    script = REPO / ".ci" / "run"
    assert os.access(script, os.X_OK)
    lines = [line.strip() for line in script.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "set -euo pipefail" and lines[-1] == "make test"
    assert not any("|| true" in line or "set +e" in line for line in lines)
