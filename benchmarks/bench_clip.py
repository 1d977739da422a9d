"""CLIP stage speed: images per second end to end from tar shards (decode included), for ViT-B/32 scoring and
ViT-L/14 embedding, on this machine's CPU or a CUDA GPU.

The architectures are open_clip's ViT-B-32 and ViT-L-14 with random weights (weights cannot be downloaded
here, and speed does not depend on their values). The shards hold synthetic 256 px JPEGs as the download
stage writes them. Besides the end-to-end figure it times decoding alone and the model alone on ready
tensors, which says where the time goes. Anchors: LAION reported 1,800 images/s (B/32) and 312 images/s
(L/14) per A100; the goal on one H100 is 10,000 and 2,500.

Usage: python benchmarks/bench_clip.py [--device auto|cpu|cuda] [--images-b32 512] [--images-l14 48]
                                       [--batch-size 64] [--workers 1]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import orjson
import torch

from laion_assets.core.clip import embeddings, models, scores, shards
from laion_assets.core.download.resize import process_image
from laion_assets.core.download.writer import write_tar
from laion_assets.core.offline.synthetic import jpeg_bytes, random_scene, render
from laion_assets.core.settings import ResizeSettings

WORK = Path(__file__).resolve().parent / "work" / "clip"
ANCHORS = {"ViT-B-32": 1800, "ViT-L-14": 312}
GOALS_H100 = {"ViT-B-32": 10_000, "ViT-L-14": 2_500}


def build_shards(n: int, per_shard: int = 256) -> list[str]:
    """Synthetic samples as image_shards writes them; reused when present."""
    WORK.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = random.Random(0)
    for shard, lo in enumerate(range(0, n, per_shard)):
        path = WORK / f"{n:06d}-{shard:05d}.tar"
        paths.append(str(path))
        if path.exists():
            continue
        samples = []
        for i in range(lo, min(n, lo + per_shard)):
            scene = random_scene(rng)
            size = (rng.randint(320, 1024), rng.randint(240, 768))
            data = process_image(jpeg_bytes(render(scene, size, seed=i)), ResizeSettings()).data
            key = f"{shard:05d}{i - lo:04d}"
            samples.append((key, {"jpg": data, "txt": scene.caption("en").encode(),
                                  "json": orjson.dumps({"key": key, "language": "en"})}))
        write_tar(str(path), samples)
    return paths


def load(arch: str, device: torch.device) -> models.LoadedClip:
    return models.load_clip(models.ClipSpec(f"{arch}/random", arch, "", 0.28), device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_only(paths: list[str], model: models.LoadedClip, batch: int, workers: int) -> float:
    start = time.perf_counter()
    n = sum(len(b.keys) for b in shards.decoded_batches(paths, model.preprocess, model.image_size, batch, workers))
    return n / (time.perf_counter() - start)


def model_only(model: models.LoadedClip, batch: int, rounds: int) -> float:
    x = torch.randn(batch, 3, model.image_size, model.image_size)
    model.encode_images(x)  # warm-up (cuDNN autotune, allocator)
    sync(model.device)
    start = time.perf_counter()
    for _ in range(rounds):
        model.encode_images(x)
    sync(model.device)
    return batch * rounds / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images-b32", type=int, default=512)
    parser.add_argument("--images-l14", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    device = models.pick_device(args.device)
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device: {device} ({what})")
    results = {}
    for arch, n in (("ViT-B-32", args.images_b32), ("ViT-L-14", args.images_l14)):
        paths = build_shards(n)
        model = load(arch, device)
        model_only(model, min(args.batch_size, 8), 1)  # warm-up
        start = time.perf_counter()
        if arch == "ViT-B-32":  # scoring: image and text towers, similarity, keep flag
            table, _ = scores.score_shards(paths, model, model, args.batch_size, args.workers)
            done = table.num_rows
        else:  # embedding: image and text embeddings of every (kept) sample
            keys = frozenset(k for p in paths for k in (s.key for s in shards.iter_shard_samples(p)))
            img, _, _, _ = embeddings.embed_shards(paths, keys, model, args.batch_size, args.workers)
            done = img.shape[0]
        sync(device)
        rate = done / (time.perf_counter() - start)
        dec = decode_only(paths, model, args.batch_size, args.workers)
        mod = model_only(model, args.batch_size, max(1, n // args.batch_size))
        results[arch] = rate
        print(f"{arch}: end to end {rate:8.1f} images/s over {done} images"
              f"  | decode alone {dec:8.1f}/s | image tower alone {mod:8.1f}/s"
              f"  | {rate / ANCHORS[arch]:.3f}x LAION's A100 figure ({ANCHORS[arch]}/s),"
              f" {rate / GOALS_H100[arch]:.4f}x the H100 goal ({GOALS_H100[arch]}/s)")
    print("ratio B/32 : L/14 =", round(results["ViT-B-32"] / results["ViT-L-14"], 2))


if __name__ == "__main__":
    main()
