"""The files a model preset needs, where they are published, and their sha256: checked before any work starts,
fetched by `laion-assets models fetch` (downloaded into a `.part` file that a rerun resumes with a Range request,
its sha256 checked, then renamed into place: a file under its final name is always the whole, right file).

open_clip's weights (the CLIPs) are not among them: open_clip downloads and caches those itself (docs/clip.md says
how to pre-fetch them for a cluster without internet).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from laion_assets.core.clip.specs import file_sha256

FETCH_COMMAND = "laion-assets models fetch --preset {preset} --models-dir {models_dir}"


@dataclass(frozen=True)
class ModelFile:
    """One published file: where it goes under the preset's folder, where it comes from, its sha256 ("" when its
    publisher gives none: then the digest of the first fetch is pinned beside it, in `<file>.sha256`)."""

    path: str
    url: str
    sha256: str
    what: str


class ModelFileError(ValueError):
    """A model file whose bytes are not the published ones (corrupt, truncated or another file)."""


def pinned_digest(local: Path, file: ModelFile) -> str:
    """The digest a file must have: the preset's, else the one pinned at its first fetch ("" if never fetched)."""
    if file.sha256:
        return file.sha256
    pin = Path(str(local) + ".sha256")
    return pin.read_text().strip() if pin.exists() else ""


def missing_error(locals_: list[Path], preset: str, models_dir: str) -> FileNotFoundError:
    command = FETCH_COMMAND.format(preset=preset, models_dir=models_dir)
    return FileNotFoundError(f"the {preset} preset's model file(s) {', '.join(str(p) for p in locals_)} are "
                             f"missing: run `{command}` first (with internet, or --mirror a copy)")


def verify(local: Path, file: ModelFile, preset: str = "laion", models_dir: str = "") -> Path:
    """The file, checked: FileNotFoundError naming the fetch command when it is missing, ModelFileError with the
    path and the expected digest when its sha256 differs."""
    if not local.exists():
        raise missing_error([local], preset, models_dir or str(local.parent))
    expected = pinned_digest(local, file)
    got = file_sha256(str(local))
    if expected and got != expected:
        raise ModelFileError(f"{local}: sha256 {got}, expected {expected} ({file.what}: corrupt, truncated or not "
                             f"the published file); fetch it again: "
                             f"`{FETCH_COMMAND.format(preset=preset, models_dir=models_dir or local.parent)}`")
    return local


def verify_all(root: Path, files: list[ModelFile], preset: str, models_dir: str) -> None:
    """Every file present (one error naming all missing ones) and each one's digest right."""
    absent = [root / f.path for f in files if not (root / f.path).exists()]
    if absent:
        raise missing_error(absent, preset, models_dir)
    for f in files:
        verify(root / f.path, f, preset, models_dir)


@dataclass
class Fetched:
    file: ModelFile
    local: Path
    action: str  # "present", "downloaded", "resumed"
    sha256: str
    pinned_now: bool = False


def fetch(root: Path, files: list[ModelFile], settings: object = None, mirror: str = "",
          log: Callable[[str], None] | None = None) -> list[Fetched]:
    """Download whatever of `files` is missing or wrong under `root`, from its published URL (or `mirror` +
    its path), each checked against its sha256 before it takes its final name. ModelFileError (the path and the
    expected digest) for a download whose digest differs; the bad bytes are deleted."""
    from laion_assets.core.crawl.source import WatFetchError, download_http
    from laion_assets.core.settings import SourceSettings

    source = settings if isinstance(settings, SourceSettings) else SourceSettings()
    out = []
    for f in files:
        local = root / f.path
        expected = pinned_digest(local, f)
        if local.exists() and expected and file_sha256(str(local)) == expected:
            out.append(Fetched(f, local, "present", expected))
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        part = Path(str(local) + ".part")
        resumed = part.exists() and part.stat().st_size > 0
        url = mirror.rstrip("/") + "/" + f.path if mirror else f.url
        if log:
            log(f"{'resuming' if resumed else 'fetching'} {url} -> {local}")
        try:
            try:
                download_http(url, str(part), source)
            except WatFetchError as err:
                if not (resumed and "HTTP 416" in str(err)):
                    raise
                part.unlink()  # a whole (but wrong) .part: nothing left to resume, start again
                download_http(url, str(part), source)
        except WatFetchError as err:
            raise ModelFileError(f"cannot fetch {f.what} from {url}: {err}") from err
        got = file_sha256(str(part))
        if expected and got != expected:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise ModelFileError(f"{url}: sha256 {got}, expected {expected} for {local} ({f.what}); nothing kept")
        os.replace(part, local)  # the final name only for the whole, checked file
        pinned = False
        if not expected:
            Path(str(local) + ".sha256").write_text(got + "\n")
            pinned = True
        out.append(Fetched(f, local, "resumed" if resumed else "downloaded", got, pinned))
    return out
