"""`laion-assets models fetch` against a loopback server holding LAION's files (../shared/realmodels) at their paths:
every file with its sha256, atomic, resumed with a Range request after a cut, a wrong digest refused with the path
and the expected digest; and a missing file an error naming the command before any work."""

from __future__ import annotations

import http.server
import re
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from laion_assets.cli import main
from laion_assets.core.clip.model_files import ModelFileError, fetch
from laion_assets.core.clip.registry import LAION_FILES, laion_model_set, laion_root, resolve
from laion_assets.core.settings import ModelSettings, SourceSettings

FILES = [f for group in LAION_FILES.values() for f in group]
FAST = SourceSettings(retries=1, backoff_s=0.01, timeout_s=10)


class Mirror:
    """A loopback HTTP server of {path: bytes} that honours Range, can cut a body short once, and records Range
    headers."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.ranges, self.cut = files, [], set()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.lstrip("/")
                if path not in mirror.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body, start = mirror.files[path], 0
                if self.headers.get("Range"):
                    mirror.ranges.append((path, self.headers["Range"]))
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if path in mirror.cut:  # half the body, then the connection drops
                    mirror.cut.discard(path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(realmodels):
    files = {f.path: (realmodels / f.path).read_bytes() for f in FILES if f.sha256}
    files["watermark/watermark_model_v1.pt"] = b"a stand-in for LAION's watermark model" * 100
    server = Mirror(files)
    yield server
    server.close()


def test_fetch_checks_every_digest_resumes_and_refuses_wrong_bytes(mirror, tmp_path):
    models_dir = tmp_path / "models"
    root = laion_root(models_dir)
    settings = ModelSettings(preset="laion", models_dir=str(models_dir))
    with pytest.raises(FileNotFoundError, match="laion-assets models fetch --preset laion"):
        resolve(settings)  # before anything is fetched: the error names the command
    # A download cut half-way is retried with a Range request for the rest.
    mirror.cut.add("aesthetic/v2/sac+logos+ava1-l14-linearMSE.pth")
    done = fetch(root, FILES, FAST, mirror.url)
    assert {d.action for d in done} == {"downloaded"} and len(done) == len(FILES) == 15
    v2 = "aesthetic/v2/sac+logos+ava1-l14-linearMSE.pth"
    assert any(p == v2 and r.startswith("bytes=") for p, r in mirror.ranges)
    assert [d.file.path for d in done if d.pinned_now] == ["watermark/watermark_model_v1.pt"]  # no published digest
    assert not list(root.rglob("*.part"))
    chosen = resolve(settings)  # every file present and right
    assert chosen.safety_head.endswith("clip_autokeras_binary_nsfw.zip") and chosen == resolve(settings, check=False)
    assert {d.action for d in fetch(root, FILES, FAST, mirror.url)} == {"present"}
    # A rerun after a kill mid-file resumes the .part it left.
    target = root / "nsfw/clip_autokeras_binary_nsfw.zip"
    data = target.read_bytes()
    target.unlink()
    Path(str(target) + ".part").write_bytes(data[:1000])
    again = fetch(root, FILES, FAST, mirror.url)
    assert [d.action for d in again if d.action != "present"] == ["resumed"] and target.read_bytes() == data
    # The published file replaced by other bytes: refused, the path and the expected digest named, nothing kept.
    target.unlink()
    mirror.files["nsfw/clip_autokeras_binary_nsfw.zip"] = data[:-10] + b"0123456789"
    with pytest.raises(ModelFileError, match=r"expected 905520bb0336accc.*clip_autokeras_binary_nsfw.zip"):
        fetch(root, FILES, FAST, mirror.url)
    assert not target.exists() and not Path(str(target) + ".part").exists()
    # A file damaged on disk is refused when the preset resolves, with its path and its expected digest.
    mirror.files["nsfw/clip_autokeras_binary_nsfw.zip"] = data
    fetch(root, FILES, FAST, mirror.url)
    aesthetic = Path(laion_model_set(models_dir).aesthetic_head)
    aesthetic.write_bytes(aesthetic.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=f"{re.escape(str(aesthetic))}: sha256 .*expected 21dd590f3ccdc646"):
        resolve(settings)
    assert resolve(settings, ("safety_head",)).safety_head  # a command that does not need it still runs


def test_models_fetch_command_and_a_clip_command_without_the_files(mirror, tmp_path):
    run = CliRunner().invoke
    models_dir = str(tmp_path / "models")
    result = run(main, ["clip", "safety", str(tmp_path / "emb"), "-o", str(tmp_path / "s.parquet"), "--preset", "laion",
                        "--models-dir", models_dir])
    assert result.exit_code == 1 and "laion-assets models fetch --preset laion" in result.output, result.output
    result = run(main, ["models", "fetch", "--models-dir", models_dir, "--mirror", mirror.url, "--retries", "0"])
    assert result.exit_code == 0, result.output
    assert "15 files" in result.output and "pinned now" in result.output
