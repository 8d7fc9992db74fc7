"""``pip install .`` (not editable) gives a package that runs on its own: the wheel carries
the config tree, the help template and the web UI's pages, and the entrypoints train from
any directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, cli_env


def _run(cmd: list, cwd: Path, env: dict) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel built from this checkout installed; the dependencies
    come from this interpreter's site-packages (a path in a .pth file: its own .pth files,
    e.g. an editable install of lmpipe, are not processed)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy: building writes build/ and *.egg-info next to it
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source], root, env
    )
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], root, env)
    python = root / "venv" / "bin" / "python"
    site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env
    )
    (Path(site.strip()) / "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = (root / "dist").glob("lmpipe-*.whl")
    _run([*pip, "--python", python, "install", "--no-deps", wheel], root, env)
    return python


@pytest.mark.slow  # ~60 s on 2 shared cores: wheel, venv, three entrypoint runs
def test_the_installed_package_trains_from_any_directory(installed, tmp_path, cache_dir):
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}
    package = Path(
        _run([installed, "-c", "import lmpipe; print(lmpipe.__file__)"], tmp_path, env).strip()
    ).parent
    assert package.is_relative_to(installed.parents[1])  # the wheel's copy, not the checkout
    assert (package / "ui" / "static" / "index.html").is_file()

    train = [installed, "-m", "lmpipe.train"]
    assert "lmpipe.train: train a language model" in _run([*train, "--help"], tmp_path, env)
    composed = yaml.safe_load(_run([*train, "--cfg", "job"], tmp_path, env))
    assert composed["model"]["name"] == "tiny" and composed["data"]["name"] == "demo"

    out = tmp_path / "runs"
    _run(
        [
            *train,
            *TINY,
            "trainer.max_steps=3",
            "trainer.eval_batches=1",
            "data.sources.0.num_records=400",
            "data.sources.1.num_records=200",
            f"out_dir={out}",
            f"cache_dir={cache_dir}",
        ],
        tmp_path,
        env,
    )
    assert (out / "ar-demo-tiny-pretrain-v1" / "checkpoints" / "step_000003").is_dir()
