"""img2dataset's interface: the Python API called exactly as DataComp's download_upstream.py calls img2dataset, and
the command line of img2dataset's dataset examples; against servers on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner

from laion_assets import img2dataset
from laion_assets.cli import main
from laion_assets.offline.synthetic import Scene, jpeg_bytes, render

# The _stats.json fields img2dataset 1.47 writes (its logger.write_stats).
IMG2DATASET_STATS = {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
                     "end_time", "status_dict"}


def serve_images(loopback, n: int) -> list[str]:
    for i in range(n):
        loopback.static(f"/img/{i}.jpg", jpeg_bytes(render(Scene("circle", "blue", "white", "left"),
                                                           (300 + 20 * i, 200), seed=i)), "image/jpeg")
    return [f"{loopback.base}/img/{i}.jpg" for i in range(n)]


def test_datacomp_download_upstream(loopback, tmp_path, monkeypatch):
    """download_upstream.py's call, argument for argument, with its command line's defaults."""
    monkeypatch.setenv("LAION_ASSETS_ALLOW_NETWORKS", "127.0.0.1/32")  # the guard's exception, as for `download`
    urls = serve_images(loopback, 6) + [f"{loopback.base}/img/missing.jpg"]
    metadata_dir = tmp_path / "metadata"
    metadata_dir.mkdir()
    for part, rows in enumerate((range(0, 4), range(4, 7))):
        pq.write_table(pa.table({
            "uid": [f"{i:032x}" for i in rows], "url": [urls[i] for i in rows], "text": [f"text {i}" for i in rows],
            "original_width": [300] * len(rows), "original_height": [200] * len(rows),
            "face_bboxes": [[[0.1, 0.1, 0.3, 0.4]] if i == 1 else [] for i in rows]}), metadata_dir / f"{part}.parquet")
    args = argparse.Namespace(data_dir=tmp_path, image_size=512, processes_count=2, thread_count=8,
                              resize_mode="keep_ratio_largest", no_resize_only_if_bigger=False, encode_format="jpg",
                              output_format="webdataset", retries=2, enable_wandb=False, wandb_project="datacomp",
                              skip_bbox_blurring=False)
    shard_dir = args.data_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    bbox_col = None if args.skip_bbox_blurring else "face_bboxes"

    img2dataset.download(
        url_list=str(metadata_dir),
        image_size=args.image_size,
        output_folder=str(shard_dir),
        processes_count=args.processes_count,
        thread_count=args.thread_count,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=not args.no_resize_only_if_bigger,
        encode_format=args.encode_format,
        output_format=args.output_format,
        input_format="parquet",
        url_col="url",
        caption_col="text",
        bbox_col=bbox_col,
        save_additional_columns=["uid"],
        number_sample_per_shard=10000,
        oom_shard_count=8,
        retries=args.retries,
        enable_wandb=args.enable_wandb,
        wandb_project=args.wandb_project,
    )

    names = sorted(os.listdir(shard_dir))
    assert {"00000000.tar", "00000000.parquet", "00000000_stats.json"} <= set(names)
    rows = pq.read_table(shard_dir / "00000000.parquet").to_pylist()
    assert [r["key"] for r in rows] == [f"00000000{i:04d}" for i in range(7)]
    assert [r["uid"] for r in rows] == [f"{i:032x}" for i in range(7)]
    assert [r["status"] for r in rows] == ["success"] * 6 + ["failed_to_download"]
    assert rows[1]["face_bboxes"] == [[0.1, 0.1, 0.3, 0.4]] and rows[0]["exif"] is None  # extract_exif: a column
    assert (rows[0]["width"], rows[0]["height"]) == (300, 200)  # resize_only_if_bigger: 300x200 stays
    stats = json.loads((shard_dir / "00000000_stats.json").read_text())
    assert IMG2DATASET_STATS <= set(stats) and (stats["count"], stats["successes"]) == (7, 6)
    # webdataset's reader (what DataComp's resharder and training read)
    samples = list(wds.WebDataset(str(shard_dir / "00000000.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"00000000{i:04d}" for i in range(6)]
    assert samples[2]["json"]["uid"] == f"{2:032x}" and samples[2]["txt"] == "text 2"


CC12M = ('--url_list cc12m.tsv --input_format "tsv" --url_col "url" --caption_col "caption" --output_format webdataset '
         '--output_folder cc12m --processes_count 16 --thread_count 64 --image_size 256 --enable_wandb True')


def command(text: str) -> list[str]:
    import shlex

    return shlex.split(text)


def test_the_command_line_of_img2dataset_s_cc12m_example(loopback, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    urls = serve_images(loopback, 3)
    Path("cc12m.tsv").write_text("url\tcaption\n" + "".join(f"{u}\tcaption {i}\n" for i, u in enumerate(urls)))
    runner = CliRunner()
    refused = runner.invoke(main, ["img2dataset", *command(CC12M)])
    assert refused.exit_code != 0 and "enable_wandb=True is not supported" in refused.output
    assert not Path("cc12m").exists()  # refused before anything was written
    # The example itself, with wandb off and our guard's exception for the loopback server.
    ran = runner.invoke(main, ["img2dataset", *command(CC12M.replace("True", "False")),
                               "--allow_networks", "127.0.0.1/32", "--processes_count", "2"])
    assert ran.exit_code == 0, ran.output
    with tarfile.open("cc12m/00000.tar") as tar:
        assert sorted(tar.getnames()) == sorted(f"00000{i:04d}.{e}" for i in range(3) for e in ("jpg", "json", "txt"))
    stats = json.loads(Path("cc12m/00000_stats.json").read_text())
    assert IMG2DATASET_STATS <= set(stats) and stats["successes"] == 3


def test_unhonourable_parameters_are_refused_by_name(tmp_path):
    for kwargs, word in (({"distributor": "pyspark"}, "distributor='pyspark'"),
                         ({"enable_wandb": True}, "enable_wandb=True"),
                         ({"output_format": "tfrecord"}, "output_format='tfrecord'"),
                         ({"downscale_interpolation": "cubic"}, "interpolation")):
        with pytest.raises(img2dataset.UnsupportedParameter, match=word):
            img2dataset.download(url_list=str(tmp_path), output_folder=str(tmp_path / "o"), **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword"):
        img2dataset.download(url_list=str(tmp_path), thread_counts=3)
    with pytest.raises(ValueError, match="verify_hash and compute_hash must be the same"):
        img2dataset.download(url_list=str(tmp_path), verify_hash=["md5", "md5"])
    with pytest.raises(ValueError, match="img2dataset reserves"):
        img2dataset.download(url_list=str(tmp_path), save_additional_columns=["status"])


def test_the_mapping_of_img2dataset_s_parameters():
    settings, columns = img2dataset.settings_from({**img2dataset.DEFAULTS, "thread_count": 32, "timeout": 7,
                                                   "retries": 3, "verify_hash": ["md5", "md5"],
                                                   "compute_hash": "md5", "disallowed_header_directives": []})
    assert (settings.fetch.connections, settings.in_flight, settings.fetch.connect_timeout_s) == (32, 64, 7.0)
    assert settings.fetch.retries == 3 and settings.verify() == ("md5", "md5") and settings.compute_hash == "md5"
    assert not settings.fetch.respect_x_robots_tag and settings.fetch.respect_robots_txt  # the rest stays polite
    assert settings.min_image_bytes == 0 and settings.output_format == "files" and settings.extract_exif
    assert columns.input_format == "txt" and settings.resize.max_aspect_ratio == 0.0
    assert img2dataset.parse_command_line(["--url_list", "x", "--save_additional_columns", '["uid"]',
                                           "--noextract_exif", "--image_size=64"]) == {
        "url_list": "x", "save_additional_columns": ["uid"], "extract_exif": False, "image_size": 64}
