"""The install: the lock is fresh and pins pyproject's dependencies; the documented commands install through it;
a wheel (non-editable install) carries the whole package and finds the data through PERSVIZ_DATA; devices."""
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from persviz import loading, paths

ROOT = Path(__file__).resolve().parents[2]
LOCK_REL = "requirements/lock-linux-py311.txt"
LOCK = ROOT / LOCK_REL
# The platform the lock is resolved for (requirements/update_lock.py): markers are judged there.
LOCK_ENV = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": "test"}


def _update_lock():
    spec = importlib.util.spec_from_file_location("persviz_update_lock", ROOT / "requirements" / "update_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"lock line not pinned with ==: {line}"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


# ---------------------------------------------------------------- the lock


def test_the_lock_is_regenerated_after_pyproject_changes():
    update_lock = _update_lock()
    recorded = update_lock.recorded_hash(LOCK)
    assert recorded, f"{LOCK_REL} has no '# pyproject-dependencies-sha256:' first line"
    assert recorded == update_lock.dependency_hash(ROOT / "pyproject.toml"), (
        f"pyproject.toml's dependencies changed since {LOCK_REL} was written: run `python3 requirements/update_lock.py`")


def test_the_lock_pins_every_dependency_within_pyproject_bounds():
    pins = _pins()
    missing, outside = [], []
    for req in _pyproject_requirements():
        if req.marker is not None and not req.marker.evaluate(LOCK_ENV):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            missing.append(str(req))
        elif not req.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{req} (locked {pins[name]})")
    assert not missing, f"pyproject dependencies not pinned in {LOCK_REL}: {missing}"
    assert not outside, f"locked versions outside pyproject's bounds: {outside}"


def _readme_block(tag: str) -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {tag} -->\s*```(?:bash)?\n(.+?)\n```", readme, re.S)
    assert found, f"README has no <!-- {tag} --> code block"
    return found.group(1).strip()


def _installs_through_the_lock(command: str) -> bool:
    """Some `pip install` in the command takes both the lock (-r) and the package with its test extra."""
    for part in re.split(r"&&|;|\n", command):
        if re.search(r"pip install\b", part) and f"-r {LOCK_REL}" in part and re.search(r"""-e ["']?\.\[test\]""", part):
            return True
    return False


@pytest.mark.parametrize("tag", ["main-command", "test-command"])
def test_the_readme_commands_install_through_the_lock(tag):
    assert _installs_through_the_lock(_readme_block(tag)), (
        f"README's {tag} should install with `pip install -q -r {LOCK_REL} -e \".[test]\"`")


def test_ci_installs_through_the_lock():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _installs_through_the_lock(ci), f".ci/run should install with -r {LOCK_REL}"
    assert _readme_block("test-command") in ci


def test_environment_yml_installs_through_the_lock():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(rf"^\s*-\s+-r {re.escape(LOCK_REL)}\s*$", text, re.M)
    assert re.search(r"^\s*-\s+-e \.\[test\]\s*$", text, re.M)


# ---------------------------------------------------------------- the data folder


def test_the_repository_data_is_found_and_the_constants_agree(monkeypatch):
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    assert paths.data_dir() == ROOT / "data"
    assert paths.shapesworld_dir() == ROOT / "data" / "shapesworld"
    if not os.environ.get(paths.DATA_ENV):
        assert (paths.DATA_DIR, paths.SHAPESWORLD_DIR) == (ROOT / "data", ROOT / "data" / "shapesworld")


def test_persviz_data_wins(monkeypatch, tmp_path):
    (tmp_path / "shapesworld").mkdir()
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    assert paths.data_dir() == tmp_path
    assert paths.shapesworld_dir() == tmp_path / "shapesworld"


def test_persviz_data_without_the_data_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    with pytest.raises(paths.DataNotFoundError, match="PERSVIZ_DATA"):
        paths.data_dir()


def test_no_data_anywhere_is_a_clear_error_at_load_time_only(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.setattr(paths, "REPO_DATA_DIR", tmp_path / "missing")
    with pytest.raises(paths.DataNotFoundError) as err:
        paths.data_dir()
    assert isinstance(err.value, FileNotFoundError)
    assert "PERSVIZ_DATA" in str(err.value) and "clone" in str(err.value)
    with pytest.raises(paths.DataNotFoundError):
        loading.load_pipeline()
    with pytest.raises(paths.DataNotFoundError):
        loading.load_evaluator(kind="oracle")


# ---------------------------------------------------------------- the wheel (a non-editable install)

WHEEL_CHECK = r"""
import os, sys
from pathlib import Path
target, data = Path(sys.argv[1]).resolve(), os.environ.pop("PERSVIZ_DATA")
import persviz, persviz.tea, persviz.finexl, persviz.pigeon, persviz.cli  # importing never needs the data
from persviz import paths
from persviz.loading import load_pipeline
assert Path(persviz.__file__).resolve().is_relative_to(target), persviz.__file__
try:
    load_pipeline()
except paths.DataNotFoundError as err:
    assert "PERSVIZ_DATA" in str(err), err
else:
    raise AssertionError("a wheel install without PERSVIZ_DATA found data")
os.environ["PERSVIZ_DATA"] = data
pipe = load_pipeline()
import torch
image = pipe("a red circle on a black background", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
             output_type="np").images[0]
assert image.shape[-1] == 3, image.shape
print("WHEEL-OK", persviz.__file__)
"""


def _copy_source(dest: Path) -> None:
    """pyproject, README and the package, without caches: the build must not write into the shared tree."""
    import shutil
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "persviz", dest / "persviz", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    _copy_source(tmp / "src")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp / "dist"), str(tmp / "src")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (built,) = (tmp / "dist").glob("persviz-*.whl")
    return built


def test_the_wheel_carries_every_room_and_the_command_but_no_data(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entries = z.read(entry_points).decode()
    for room in ("tea", "finexl", "pigeon", "shapesworld", "trainers"):
        assert f"persviz/{room}/__init__.py" in names, room
    assert "persviz/paths.py" in names and "persviz/cli.py" in names
    assert re.search(r"\[console_scripts\]\s*\npersviz\s*=\s*persviz\.cli:main", entries), entries
    assert not [n for n in names if not n.startswith(("persviz/", "persviz-"))], "files outside the package"
    assert wheel.stat().st_size < 5_000_000, "the wheel should not carry the data"


def test_the_wheel_installed_elsewhere_loads_the_embedded_pipeline_through_persviz_data(wheel, tmp_path):
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (target / "bin" / "persviz").is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PERSVIZ_SCALE")}
    env.update(PYTHONPATH=str(target), PERSVIZ_DATA=str(ROOT / "data"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", WHEEL_CHECK, str(target)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and "WHEEL-OK" in run.stdout, run.stdout + run.stderr


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, ("cuda", torch.float16)),
    (False, True, ("mps", torch.float32)),
    (False, False, ("cpu", torch.float32)),
])
def test_pick_device_prefers_cuda_then_apple_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    dev, dt = loading.pick_device()
    assert (dev.type, dt) == expected
    assert loading.pick_device("cpu") == (torch.device("cpu"), torch.float32)
