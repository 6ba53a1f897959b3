"""Where the analysis reads a run's artifacts: in place where the store is a local folder (a ``file:`` artifact
location), else from one user cache that every later analysis reuses, whatever its ``--out``.

The cache (``$XDG_CACHE_HOME/stresslab/artifacts``, else ``~/.cache/stresslab/artifacts``; ``--cache-dir`` moves it)
is keyed by run id (or logged-model id) and artifact path: a finished run's artifacts do not change. A download
lands in a temporary name and is renamed into place, so an interrupted one is never read back. Clear it with
``rm -rf ~/.cache/stresslab/artifacts``."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlparse


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stresslab" / "artifacts"


def local_folder(artifact_uri: str | None) -> Path | None:
    """The folder a ``file:`` (or plain path) artifact location names, or None for a remote one."""
    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" else None


class ArtifactReader:
    """Paths of run and logged-model artifacts, counted by where they came from (``summary``)."""

    def __init__(self, uri: str, cache_dir: str | Path | None = None):
        self.uri, self.cache = uri, Path(cache_dir).expanduser() if cache_dir else default_cache()
        self.counts: Counter = Counter()
        self.bytes: Counter = Counter()

    def run_file(self, run_id: str, artifact_uri: str | None, path: str) -> Path:
        """``path`` among run ``run_id``'s artifacts."""
        import mlflow

        return self._get(("runs", run_id), artifact_uri, path,
                         lambda dst: mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst, tracking_uri=self.uri))

    def model_file(self, model_id: str, artifact_location: str | None, path: str) -> Path:
        """``path`` among logged model ``model_id``'s artifacts (e.g. ``data/model.pt2``)."""
        import mlflow

        remote = f"{(artifact_location or '').rstrip('/')}/{path}"
        return self._get(("models", model_id), artifact_location, path,
                         lambda dst: mlflow.artifacts.download_artifacts(artifact_uri=remote, dst_path=dst, tracking_uri=self.uri))

    def _get(self, key: tuple[str, str], location: str | None, path: str, download) -> Path:
        folder = local_folder(location)
        if folder is not None and (folder / path).exists():
            self._count("read in place", folder / path)
            return folder / path
        target = self.cache.joinpath(*key, path)
        if target.exists():
            self._count("from the cache", target)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file drowns the log
            fetched = Path(download(str(staging)))
            os.replace(fetched, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._count("downloaded", target)
        return target

    def _count(self, how: str, path: Path) -> None:
        self.counts[how] += 1
        self.bytes[how] += path.stat().st_size

    def reset(self) -> None:
        """Counts from zero: a copy sent to a worker process counts its own reads, which ``absorb`` adds back."""
        self.counts, self.bytes = Counter(), Counter()

    def absorb(self, other: "ArtifactReader") -> None:
        self.counts.update(other.counts)
        self.bytes.update(other.bytes)

    def summary(self) -> str:
        parts = [f"{self.counts[h]} {h} ({self.bytes[h] / 2**20:.1f} MB)" for h in ("read in place", "from the cache", "downloaded")]
        return f"artifacts: {', '.join(parts)}; cache {self.cache}"
