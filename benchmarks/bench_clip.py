"""CLIP stage speed: images per second end to end from tar shards (decode included) for ViT-B/32 scoring, ViT-L/14
embedding and the one pass (B/32 on every image, L/14 and LAION's watermark model on a kept 10%), with GPU
utilisation sampled during each, and issue 12's table re-measured beside them: decode alone (PIL workers; the
device path), towers alone (fp16 weights vs bf16 autocast; L/14 fp8 and its cosine to fp16), the tokenizer, and
host-to-device copies (pageable vs pinned float32, pinned uint8), and the heads on embeddings on the CPU (LAION's
NSFW detector, as its PyTorch port and as its AutoKeras SavedModel, and the aesthetic predictor). Goals on one H100:
B/32 >= 10,000 images/s, L/14 (image and text) >= 2,500 images/s, GPU busy >= 80%; device-decoded vs PIL-decoded
similarities within 0.01 with >= 99.5% of keep decisions agreeing.

The architectures are open_clip's ViT-B-32 and ViT-L-14 and timm's efficientnet_b3a with random weights (nothing
can be downloaded there; speed does not depend on the values). The shards hold synthetic 256 px JPEGs as the
download stage writes them, built once under benchmarks/work/clip.

Usage: python benchmarks/bench_clip.py [--device cpu|cuda] [--images 512] [--batch-size 64] [--workers 1]
                                       [--decode auto|pil|device] [--skip-l14]

On the lent H100 (Python 3.12, torch 2.11, torchvision, timm, pyarrow, pillow, numpy, regex, nvidia-ml-py there;
open_clip and the rest not), from this repository's root here:

    echo /.whl/ >> .git/info/exclude
    for w in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 orjson==3.13.0 torchao==0.17.0; do
      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl "$w"; done

(what the bench imports beyond the machine's packages, as listed by importing it here; torchao's release must
support torch 2.11: check its notes and pick another 0.1x if not.) then one run (carry .whl; about 10 minutes):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit; PYTHONUNBUFFERED=1 python3 benchmarks/bench_clip.py \\
      --device cuda --images 16384 --batch-size 512 --workers 15 2>&1 | tee $OUT/bench_clip.txt

The script says at its start which module is missing, if any; without torchao the fp8 line says so and the rest
runs. The output names the device, the load average and every goal's verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

WORK = Path(__file__).resolve().parent / "work" / "clip"
GOALS = {"B/32 scoring": 10_000, "L/14 embedding": 2_500}
ANCHORS = {"B/32 scoring": 1_800, "L/14 embedding": 312}  # LAION's per-A100 figures
NEEDS = ("torch", "torchvision", "open_clip", "timm", "pyarrow", "PIL", "orjson", "ftfy", "numpy")


def missing_modules() -> list[str]:
    import importlib.util

    return [m for m in NEEDS if importlib.util.find_spec(m) is None]


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _write_shard(path: str, shard: int, lo: int, hi: int) -> None:
    import orjson

    from laion_assets.core.download.resize import process_image
    from laion_assets.core.download.writer import write_tar
    from laion_assets.core.settings import ResizeSettings
    from laion_assets.offline.synthetic import jpeg_bytes, random_scene, render

    rng = random.Random(shard)
    samples = []
    for i in range(lo, hi):
        scene = random_scene(rng)
        size = (rng.randint(320, 1024), rng.randint(240, 768))
        data = process_image(jpeg_bytes(render(scene, size, seed=i)), ResizeSettings()).data
        key = f"{shard:05d}{i - lo:04d}"
        samples.append((key, {"jpg": data, "txt": scene.caption("en").encode(),
                              "json": orjson.dumps({"key": key, "language": "en"})}))
    write_tar(path + ".tmp", samples)
    os.replace(path + ".tmp", path)


def build_shards(n: int, per_shard: int = 256) -> list[str]:
    """Synthetic samples as image_shards writes them, built by every core; reused when present."""
    from concurrent.futures import ProcessPoolExecutor

    WORK.mkdir(parents=True, exist_ok=True)
    jobs = [(str(WORK / f"{n:06d}-{shard:05d}.tar"), shard, lo, min(n, lo + per_shard))
            for shard, lo in enumerate(range(0, n, per_shard))]
    todo = [j for j in jobs if not Path(j[0]).exists()]
    if todo:
        with ProcessPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:
            list(pool.map(_write_shard, *zip(*todo, strict=True)))
    return [j[0] for j in jobs]


class GpuBusy:
    """GPU utilisation sampled every 0.2 s while in the block (pynvml when importable, else nvidia-smi)."""

    def __init__(self, device: Any) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()

    def _read(self) -> float | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            return float(pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(0)).gpu)
        except Exception:  # noqa: BLE001 - fall back to the command line tool
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                return float(out.split()[0])
            except Exception:  # noqa: BLE001 - no GPU tool: nothing sampled
                return None

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> GpuBusy:
        if self.device.type == "cuda":
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()

    def text(self) -> str:
        if not self.samples:
            return "GPU busy: not sampled"
        return f"GPU busy mean {sum(self.samples) / len(self.samples):.0f}% over {len(self.samples)} samples"


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(fn: Any, items: int, device: Any, rounds: int = 3) -> float:
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    sync(device)
    return items * rounds / (time.perf_counter() - start)


def towers(arch: str, device: Any, batch: int, precision: str) -> dict[str, float]:
    """Image and text tower alone on ready inputs: fp16/bf16/fp8 weights, or fp32 weights under bf16 autocast."""
    import open_clip
    import torch

    from laion_assets.core.clip import models

    if precision == "autocast":
        model, _, _ = open_clip.create_model_and_transforms(arch, device=device)
        model = model.eval()
        dtype, ctx = torch.float32, (lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                                            enabled=device.type == "cuda"))
    else:
        loaded = models.load_clip(models.ClipSpec(arch, arch, ""), device, precision)
        model, dtype, ctx = loaded.model, loaded.dtype, (lambda: torch.autocast(device.type, enabled=False))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(batch, 3, size, size, device=device).to(dtype)
    tokens = open_clip.get_tokenizer(arch)(["a photo of a red square on a blue background"] * batch).to(device)

    @torch.inference_mode()
    def image() -> Any:
        with ctx():
            return model.encode_image(x)

    @torch.inference_mode()
    def text() -> Any:
        with ctx():
            return model.encode_text(tokens)

    return {"image": rate(image, batch, device), "text": rate(text, batch, device)}


def fp8_cosine(device: Any, batch: int) -> str:
    """Cosine of L/14 fp8 image embeddings to fp16 ones on the same images, and the fp8 image tower's rate."""
    import torch

    from laion_assets.core.clip import models

    if device.type != "cuda":
        return "fp8: needs CUDA (unmeasured)"
    spec = models.ClipSpec("ViT-L-14", "ViT-L-14", "")
    torch.manual_seed(0)
    fp16 = models.load_clip(spec, device, "fp16")
    try:
        fp8 = models.load_clip(spec, device, "fp16")
        fp8.model.load_state_dict(fp16.model.state_dict())
        models.to_fp8(fp8.model)
    except models.PrecisionError as err:
        return f"fp8: {err}"
    x = torch.randn(batch, 3, 224, 224, device=device)
    a, b = fp16.encode_pixels(x), fp8.encode_pixels(x)
    cos = (a * b).sum(1)
    speed = rate(lambda: fp8.encode_pixels(x), batch, device)
    verdict = "meets" if cos.min() >= 0.999 else "misses"
    return (f"fp8 L/14 image tower {speed:,.0f} images/s; cosine to fp16 min {cos.min():.5f} mean {cos.mean():.5f}"
            f" ({verdict} the 0.999 bound)")


def copies(device: Any, batch: int) -> str:
    import torch

    if device.type != "cuda":
        return "host to device: no CUDA (unmeasured)"
    f32 = torch.randn(batch, 3, 224, 224)
    pinned, u8 = f32.pin_memory(), torch.zeros(batch, 224, 224, 3, dtype=torch.uint8).pin_memory()
    out = [rate(lambda t=t: t.to(device, non_blocking=True), batch, device, 5) for t in (f32, pinned, u8)]
    return (f"host to device, images/s: float32 pageable {out[0]:,.0f} / pinned {out[1]:,.0f};"
            f" uint8 pinned {out[2]:,.0f}")


def decode_alone(paths: list[str], arch: str, device: Any, batch: int, workers: int, path: str) -> float:
    """Images/s through the loader and preprocessing alone (no model): PIL workers, or device decoding."""
    import open_clip

    from laion_assets.core.clip import onepass

    _, _, preprocess = open_clip.create_model_and_transforms(arch, device="cpu")
    view = onepass.split_transform(preprocess, 224)
    start, n = time.perf_counter(), 0
    for b in onepass.batches(paths, [view], {}, batch, workers, raw=path == "device", pin=device.type == "cuda"):
        if path == "device":
            from laion_assets.core.clip.preprocess import device_views

            onepass.normalize(device_views(b, [view], device)[view.key], view)
        else:
            onepass.normalize(b.pixels[view.key].to(device, non_blocking=True).permute(0, 3, 1, 2), view)
        n += len(b.keys)
    sync(device)
    return n / (time.perf_counter() - start)


def tokenizer_rate(n: int = 4096) -> float:
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    captions = [f"a photo of {i} red squares on a blue background" for i in range(n)]
    start = time.perf_counter()
    tok(captions)
    return n / (time.perf_counter() - start)


def heads_line(rows: int = 65_536) -> str:
    """The heads on embeddings, on the CPU (where the safety and aesthetic assets run): LAION's NSFW detector (the
    PyTorch port's shape; the AutoKeras SavedModel evaluated in numpy when ../shared/realmodels has it) and the
    LAION-Aesthetics V2 predictor, with random weights of their shapes."""
    import numpy as np
    import torch

    from laion_assets.core.clip import heads

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 768)).astype(np.float32)
    state = {"norm.mean": torch.zeros(768), "norm.variance": torch.ones(768)}
    for i, (a, b) in enumerate(((768, 64), (64, 512), (512, 256), (256, 1)), start=1):
        state[f"linear_{i}.weight"], state[f"linear_{i}.bias"] = torch.randn(b, a) / a ** 0.5, torch.zeros(b)
    made = {"safety (NSFW port)": heads.Head("safety", "laion-nsfw-pytorch", 768, "port", "",
                                             heads._torch_scorer(heads.LaionNsfwHead(state))),
            "aesthetic (V2)": heads.Head("aesthetic", "laion-aesthetic-v2", 768, "v2", "",
                                         heads._torch_scorer(heads.AestheticMLP(768)))}
    zip_path = Path(__file__).resolve().parents[2] / "shared/realmodels/nsfw/clip_autokeras_binary_nsfw.zip"
    if zip_path.exists():
        made["safety (AutoKeras, numpy)"] = heads.load_head(zip_path, "safety")
    out = []
    for name, head in made.items():
        start = time.perf_counter()
        head.predict(x)
        out.append(f"{name} {rows / (time.perf_counter() - start):,.0f}")
    return f"heads on the CPU ({torch.get_num_threads()} threads), embeddings/s: " + ", ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--images", type=int, default=512, help="images in the shards (16384 on the H100)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="decode workers (15 on the 16-core H100 machine)")
    parser.add_argument("--decode", default="auto", help="auto (device on CUDA), pil or device")
    parser.add_argument("--skip-l14", action="store_true", help="leave out the L/14 figures (a quick CPU run)")
    args = parser.parse_args()
    if missing := missing_modules():
        raise SystemExit(f"bench_clip needs {', '.join(missing)} (see the docstring for the H100's wheels)")
    import numpy as np
    import torch

    from laion_assets.core.clip import embeddings, models, scores, shards, watermark
    from laion_assets.core.clip.onepass import Models, one_pass
    from laion_assets.core.clip.specs import LAION_WATERMARK

    device = models.pick_device(args.device)
    path = args.decode if args.decode != "auto" else ("device" if device.type == "cuda" else "pil")
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device: {device} ({what}); {args.images} images, batch {args.batch_size}, {args.workers} workers, "
          f"{path} decoding; torch {torch.__version__}; load average {load_avg()}", flush=True)
    paths = build_shards(args.images)
    b32 = models.load_clip(models.ClipSpec("ViT-B-32/random", "ViT-B-32", "", 0.0), device)
    ends: dict[str, float] = {}

    # End to end: B/32 scoring of every image.
    with GpuBusy(device) as busy:
        start = time.perf_counter()
        table = scores.score_table(one_pass(paths, Models(b32, b32), None, args.batch_size, args.workers, path))
        sync(device)
        ends["B/32 scoring"] = table.num_rows / (time.perf_counter() - start)
    print(f"B/32 scoring end to end: {ends['B/32 scoring']:,.1f} images/s over {table.num_rows} | {busy.text()}",
          flush=True)
    sims = np.array([s for s in table["similarity"].to_pylist() if s is not None], np.float32)
    # Device vs PIL decoding: the same similarities and keeps (threshold at the median).
    other = "pil" if path == "device" else "device"
    other_table = scores.score_table(one_pass(paths, Models(b32, b32), None, args.batch_size, args.workers, other))
    a, b = np.array(table["similarity"].to_pylist(), float), np.array(other_table["similarity"].to_pylist(), float)
    median = float(np.median(sims))
    agree = np.mean((a >= median) == (b >= median))
    print(f"{path} vs {other} decoding: max |similarity difference| {np.nanmax(np.abs(a - b)):.4f} (goal < 0.01),"
          f" keep agreement at the median threshold {agree:.4f} (goal >= 0.995)", flush=True)

    if not args.skip_l14:
        l14 = models.load_clip(models.ClipSpec("ViT-L-14/random", "ViT-L-14", ""), device)
        keys = frozenset(k for p in paths for k in (s.key for s in shards.iter_shard_samples(p)))
        with GpuBusy(device) as busy:
            start = time.perf_counter()
            img, _, _, _ = embeddings.embedding_arrays(
                one_pass(paths, Models(embed=l14), keys, args.batch_size, args.workers, path), l14)
            sync(device)
            ends["L/14 embedding"] = img.shape[0] / (time.perf_counter() - start)
        print(f"L/14 embedding (image and text) end to end: {ends['L/14 embedding']:,.1f} images/s over "
              f"{img.shape[0]} | {busy.text()}", flush=True)
        # The one pass: B/32 on all, L/14 and the watermark classifier on a kept 10% (threshold at the 90th pct).
        kept_b32 = models.LoadedClip(models.ClipSpec("ViT-B-32/random", "ViT-B-32", "",
                                                     float(np.quantile(sims, 0.9))), b32.model, b32.preprocess,
                                     b32.tokenizer, device)
        # LAION's watermark model's shape (efficientnet_b3a with its 1536-625-256-2 head), as the laion preset runs it
        mark = watermark.create_laion_watermark_model().to(device).eval()
        if device.type == "cuda":
            mark = mark.half().to(memory_format=torch.channels_last)
        mark_spec = dataclasses.replace(LAION_WATERMARK, name="efficientnet_b3a/random")
        with GpuBusy(device) as busy:
            result = one_pass(paths, Models(kept_b32, kept_b32, l14, mark, mark_spec), None, args.batch_size,
                              args.workers, path)
            sync(device)
        ends["one pass"] = result.score_report.samples / result.seconds
        print(f"one pass (B/32 on all, L/14 + watermark on {result.score_report.kept} kept): "
              f"{ends['one pass']:,.1f} images/s over {result.score_report.samples} | {busy.text()}", flush=True)

    # The table, re-measured.
    batch = args.batch_size
    print(f"decode alone, PIL workers: {decode_alone(paths, 'ViT-B-32', device, batch, args.workers, 'pil'):,.0f}"
          f" images/s | device decoding + resize + normalize: "
          f"{decode_alone(paths, 'ViT-B-32', device, batch, args.workers, 'device'):,.0f} images/s", flush=True)
    print(f"open_clip tokenizer, one process: {tokenizer_rate():,.0f} captions/s", flush=True)
    for arch in ("ViT-B-32",) + (() if args.skip_l14 else ("ViT-L-14",)):
        for precision in ("fp16", "autocast") if device.type == "cuda" else ("fp32",):
            t = towers(arch, device, batch, "fp16" if precision == "fp32" else precision)
            print(f"{arch} towers alone ({precision}): image {t['image']:,.0f} / text {t['text']:,.0f} images/s",
                  flush=True)
    if not args.skip_l14:
        print(fp8_cosine(device, min(batch, 256)), flush=True)
    print(copies(device, batch), flush=True)
    print(heads_line(), flush=True)
    for name, value in ends.items():
        goal = GOALS.get(name)
        if goal:
            verdict = "meets" if value >= goal else "misses"
            print(f"goal {name}: {value:,.1f} / {goal:,} images/s = {value / goal:.3f} ({verdict}; "
                  f"{value / ANCHORS[name]:.2f}x LAION's A100 figure)")
    print(f"load average at the end: {load_avg()}")


if __name__ == "__main__":
    main()
