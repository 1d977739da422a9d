"""img2dataset's options in the download stage: kept columns, output formats, hashes, boxes blurred, the
re-encoding switches, EXIF, incremental modes and the LAION size rule; against a server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_assets.core.download.distributor import run as download
from laion_assets.core.download.resize import blur_boxes, process_image
from laion_assets.core.settings import DownloadSettings, FetchSettings, ResizeSettings
from laion_assets.core.storage import Storage
from laion_assets.offline.synthetic import Scene, jpeg_bytes, render

FETCH = FetchSettings(allow_networks=("127.0.0.1/32",), deadline_s=5.0, backoff_s=0.01)
BIG = [jpeg_bytes(render(Scene("square", "green", "white", "center"), (640, 480), seed=i)) for i in range(4)]
TINY = jpeg_bytes(render(Scene("star", "red", "white", "top"), (40, 30), seed=1))


def serve(loopback, tmp_path, bad_md5: bool = False) -> str:
    for i, body in enumerate(BIG):
        loopback.static(f"/{i}.jpg", body, "image/jpeg")
    loopback.static("/tiny.jpg", TINY, "image/jpeg")
    rows = [{"url": f"{loopback.base}/{i}.jpg", "caption": f"c{i}", "uid": f"uid-{i}",
             "md5": hashlib.md5(body).hexdigest(), "face_bboxes": [[0.0, 0.0, 0.25, 0.25]] if i == 0 else []}
            for i, body in enumerate(BIG)]
    rows.append({"url": f"{loopback.base}/tiny.jpg", "caption": "tiny", "uid": "uid-tiny",
                 "md5": hashlib.md5(TINY).hexdigest(), "face_bboxes": []})
    if bad_md5:
        rows[1]["md5"] = "0" * 32
    path = tmp_path / "list.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_additional_columns_hashes_and_the_size_rule(loopback, tmp_path):
    urls = serve(loopback, tmp_path, bad_md5=True)
    settings = DownloadSettings(samples_per_shard=10, fetch=FETCH, save_additional_columns=("uid",),
                                compute_hash="md5", verify_hash="md5,md5", extract_exif=True)
    out = tmp_path / "out"
    report = download(urls, Storage(str(out)), "", settings)
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["uid"] for r in rows] == ["uid-0", "uid-1", "uid-2", "uid-3", "uid-tiny"]
    assert [r["status"] for r in rows] == ["success", "hash_mismatch", "success", "success", "failed_to_resize"]
    found = hashlib.md5(BIG[1]).hexdigest()
    assert rows[1]["error_message"] == f"hash mismatch: md5 expected md5 {'0' * 32}, found {found}"
    assert rows[4]["error_message"] == "under min_image_bytes (5000)" and rows[4]["bytes_downloaded"] == len(TINY)
    assert rows[0]["md5"] == hashlib.md5(BIG[0]).hexdigest() and rows[0]["sha256"] == hashlib.sha256(BIG[0]).hexdigest()
    assert "exif" in rows[0] and "md5" not in (pq.read_schema(out / "00000.parquet").metadata or {})
    members = tar_members(out / "00000.tar")
    meta = json.loads(members[f"{rows[0]['key']}.json"])
    assert meta["uid"] == "uid-0" and meta["md5"] == rows[0]["md5"]
    assert report.statuses["hash_mismatch"] == 1 and report.errors["under min_image_bytes (5000)"] == 1
    stats = json.loads((out / "00000_stats.json").read_text())
    # img2dataset's fields, beside ours
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (5, 3, 1, 1)
    assert stats["status_dict"]["success"] == 3 and stats["end_time"] >= stats["start_time"] and "duration" in stats
    # with min_image_bytes 0 (img2dataset's default) the tiny image is kept
    again = download(urls, Storage(str(tmp_path / "all")), "", DownloadSettings(fetch=FETCH, min_image_bytes=0))
    assert again.statuses["success"] == 5


def test_reserved_and_missing_columns_are_refused(loopback, tmp_path):
    with pytest.raises(ValueError, match="img2dataset reserves these columns"):
        DownloadSettings(save_additional_columns=("uid", "caption"))
    with pytest.raises(ValueError, match="COL,ALGO"):
        DownloadSettings(verify_hash="md5")
    urls = serve(loopback, tmp_path)
    with pytest.raises(ValueError, match="no column 'sha'"):
        download(urls, Storage(str(tmp_path / "o")), "",
                 DownloadSettings(fetch=FETCH, save_additional_columns=("sha",)))


@pytest.mark.parametrize("output_format", ["files", "parquet"])
def test_files_and_parquet_output_formats(loopback, tmp_path, output_format):
    urls = serve(loopback, tmp_path)
    out = tmp_path / "out"
    settings = DownloadSettings(samples_per_shard=3, fetch=FETCH, output_format=output_format, min_image_bytes=0,
                                save_additional_columns=("uid",))
    report = download(urls, Storage(str(out)), "", settings)
    assert report.statuses["success"] == 5
    names = sorted(p.name for p in out.iterdir())
    if output_format == "files":
        assert names == ["00000", "00000.parquet", "00000_stats.json", "00001", "00001.parquet", "00001_stats.json",
                         "_manifest.json"]
        assert sorted(p.name for p in (out / "00000").iterdir()) == [
            f"00000{i}.{ext}" for i in range(3) for ext in ("jpg", "json", "txt")]
        assert (out / "00000" / "000001.txt").read_text() == "c1"
        assert json.loads((out / "00001" / "000010.json").read_text())["uid"] == "uid-3"
    else:
        assert names == ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json", "_manifest.json"]
        table = pq.read_table(out / "00001.parquet").to_pylist()
        assert [r["uid"] for r in table] == ["uid-3", "uid-tiny"] and table[0]["txt"] == "c3"
        assert Image.open(io.BytesIO(table[0]["jpg"])).size == (256, 256)


def test_a_blurred_box_changes_the_pixels_inside_it_and_not_outside(loopback, tmp_path):
    urls = serve(loopback, tmp_path)
    out, plain = tmp_path / "blur", tmp_path / "plain"
    common = {"samples_per_shard": 10, "fetch": FETCH, "resize": ResizeSettings(encode_format="png")}
    download(urls, Storage(str(out)), "", DownloadSettings(bbox_col="face_bboxes", **common))
    download(urls, Storage(str(plain)), "", DownloadSettings(**common))
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert rows[0]["face_bboxes"] == [[0.0, 0.0, 0.25, 0.25]]  # kept in the rows, as img2dataset does
    a = np.asarray(Image.open(io.BytesIO(tar_members(out / "00000.tar")["000000.png"])), dtype=int)
    b = np.asarray(Image.open(io.BytesIO(tar_members(plain / "00000.tar")["000000.png"])), dtype=int)
    # 640x480 in a 256 border: the image is 256x192 at rows 32-224; the box is its top-left quarter, grown by a
    # tenth of its side (6 px): inside it pixels change, well outside none do.
    assert np.abs(a[32:70, 0:58] - b[32:70, 0:58]).sum() > 0
    assert np.array_equal(a[140:, 140:], b[140:, 140:])
    # the other images have no boxes: the same bytes
    assert tar_members(out / "00000.tar")["000001.png"] == tar_members(plain / "00000.tar")["000001.png"]


def test_blur_boxes_alone():
    img = Image.fromarray((np.indices((100, 100)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    out = np.asarray(blur_boxes(img, [[0.5, 0.5, 1.0, 1.0]]), dtype=int)
    src = np.asarray(img, dtype=int)
    assert np.array_equal(out[:40, :40], src[:40, :40]) and not np.array_equal(out[60:, 60:], src[60:, 60:])


def test_the_reencoding_switches():
    small = jpeg_bytes(render(Scene("square", "green", "white", "center"), (200, 100), seed=0))
    keep = process_image(small, ResizeSettings(resize_only_if_bigger=True, resize_mode="keep_ratio"))
    assert (keep.width, keep.height) == (200, 100) and keep.data != small  # not resized, re-encoded
    same = process_image(small, ResizeSettings(resize_only_if_bigger=True, skip_reencode=True))
    assert same.data == small and (same.width, same.height) == (200, 100)  # no border either, as img2dataset
    bigger = process_image(small, ResizeSettings(resize_only_if_bigger=False, skip_reencode=True))
    assert bigger.data != small and (bigger.width, bigger.height) == (256, 256)
    raw = process_image(BIG[0], ResizeSettings(disable_all_reencoding=True))
    assert raw.data == BIG[0] and (raw.width, raw.height) == (640, 480) and raw.phash


def test_incremental_modes(loopback, tmp_path):
    urls = serve(loopback, tmp_path)
    out = tmp_path / "out"
    settings = DownloadSettings(samples_per_shard=3, fetch=FETCH, min_image_bytes=0)
    download(urls, Storage(str(out)), "", settings)
    (out / "stray.txt").write_text("x")
    report = download(urls, Storage(str(out)), "", DownloadSettings(samples_per_shard=3, fetch=FETCH,
                                                                    min_image_bytes=0, incremental_mode="extend"))
    assert report.shards == 2 and (out / "00003.tar").exists() and (out / "00000.tar").exists()
    assert pq.read_table(out / "00002.parquet")["key"].to_pylist()[0] == "000020"
    download(urls, Storage(str(out)), "", DownloadSettings(samples_per_shard=3, fetch=FETCH, min_image_bytes=0,
                                                           incremental_mode="overwrite"))
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json",
                                                     "00001.parquet", "00001.tar", "00001_stats.json", "_manifest.json"]


def test_exif_as_img2dataset_s_column():
    from laion_assets.core.download.resize import exif_json

    img = render(Scene("square", "green", "white", "center"), (64, 48), seed=0)
    exif = Image.Exif()
    exif[0x010F] = "Example Camera Co"  # Make
    exif[0x0110] = "Model 1"  # Model
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert json.loads(exif_json(buf.getvalue())) == {"Make": "Example Camera Co", "Model": "Model 1"}
    assert exif_json(jpeg_bytes(img)) is None and exif_json(b"not an image") is None
