"""The model registry: which CLIPs and heads a run uses, from `ModelSettings`.

Production (`preset` laion) uses LAION's own models: the CLIPs as open_clip tags (open_clip downloads and caches
them), and every other file (the NSFW detector, the aesthetic predictor, the watermark model, the concept file, the
search's rating embeddings and violence prompts) from its published location with its sha256 (`LAION_FILES`),
fetched into `<models_dir>/laion/` by `laion-assets models fetch` and checked before any work starts. The offline
default is a small set the project trains deterministically on its synthetic world (`laion-assets small-models`,
`laion_assets/offline/small_models.py`) into `data/models/`; the registry only reads its cards and never trains: a
missing set is a clear error naming the command that builds it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from laion_assets.core import paths
from laion_assets.core.clip.model_files import ModelFile, verify_all
from laion_assets.core.clip.specs import LAION_WATERMARK, ClipSpec, WatermarkSpec, watermark_spec_from_checkpoint
from laion_assets.core.settings import DEFAULT_MODELS_DIR, ModelSettings
from laion_assets.core.storage import Storage

# LAION-5B's models and thresholds (B/32 for filtering, 0.28 English and 0.26 for the rest; L/14 embeddings).
LAION_EN = ClipSpec("ViT-B-32/openai", "ViT-B-32", "openai", 0.28)
LAION_MULTI = ClipSpec("xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k", "xlm-roberta-base-ViT-B-32",
                       "laion5b_s13b_b90k", 0.26)
LAION_EMBED = ClipSpec("ViT-L-14/openai", "ViT-L-14", "openai")


_NSFW = "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/d6bb8fe31fd4aecbfed7dfb62df4fe5858bfc014"
_AESTHETIC_V1 = "https://github.com/LAION-AI/aesthetic-predictor/raw/6d122adad522ab246644d9dc1c6d7a3810ee255f"
_AESTHETIC_V2 = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
                 "6934dd81792f086e613a121dbce43082cb8be85e")
_RATINGS = {
    0: "ece2e6f5dffe1f81b9f488fc8a078c29462d44463448393af7b60c93bf33fb1b",
    1: "8b3970dda1475b67f9d7eaebb0f15292435ef81359aeb29bbaa56bab5a6cee9b",
    2: "2fbb46eab2240454f6d81d3e2713fe067e22ceabcdaa00a67b44148ddc4a58d7",
    3: "affc5e25225a0b8de68ebe4bf194a7c4bb33a2e3fd4ea4201e428b80490425f5",
    4: "8de9c65431d5eaa823ba3ff9db749d5f394b89456d1bee8dc32247abae075484",
    5: "630e0d67aff97eeaf60211a30cf48e26c301fb1e0f29a6977a50bc56f1f3bdf9",
    6: "ae1537d1e1c041e948ecf4c40e52cf8949d24601551c5ba72bd28566a9389473",
    7: "a34b95ce2251d072bcb950abe96728739439c7d23f84bb0b01ae61c9f389214e",
    8: "3e23cbf0bf5ba5c768fbcba3c379ce5dcc639e22bb41b3c78e24dc63a5c3f9ae",
    9: "c500ee887b3382d9c48625da1eca8635d63fb18055ed57ec95225608a1e46828",
}
# What the laion preset needs besides open_clip's weights, by its ModelSet field: published locations (pinned
# commits) and sha256. The watermark model is published without a digest and outside a pinned commit: its first
# fetch's digest is pinned beside it (model_files.ModelFile).
LAION_FILES: dict[str, list[ModelFile]] = {
    "safety_head": [ModelFile("nsfw/clip_autokeras_binary_nsfw.zip", f"{_NSFW}/clip_autokeras_binary_nsfw.zip",
                              "905520bb0336accc73ee282c605d926aef90cf14248889d44b9cee50eef71f8a",
                              "LAION's NSFW detector for ViT-L/14 (AutoKeras)")],
    "concepts": [ModelFile("nsfw/safety_settings.yml", f"{_NSFW}/safety_settings.yml",
                           "14aaef2e6aebef1504a22a43c425a65964f47bab5413207ba3e3ac0c7a34968c",
                           "LAION's concept thresholds for ViT-L/14")],
    "violence_prompts": [ModelFile("nsfw/violence_detection_vit_l_14.npy", f"{_NSFW}/violence_detection_vit_l_14.npy",
                                   "cc08f81ef50b1ef71452ddc87285fe6fbbc01b6fe8f8b8c24482c386ef2ab7e1",
                                   "clip-retrieval's violence prompts for ViT-L/14")],
    "aesthetic_head": [ModelFile("aesthetic/v2/sac+logos+ava1-l14-linearMSE.pth",
                                 f"{_AESTHETIC_V2}/sac%2Blogos%2Bava1-l14-linearMSE.pth",
                                 "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
                                 "the LAION-Aesthetics V2 predictor for ViT-L/14")],
    "rating_embeddings": [ModelFile(f"aesthetic/v1/vit_l_14_embeddings/rating{k}.npy",
                                    f"{_AESTHETIC_V1}/vit_l_14_embeddings/rating{k}.npy", digest,
                                    f"the ViT-L/14 embedding of aesthetic rating {k}")
                          for k, digest in _RATINGS.items()],
    "watermark": [ModelFile("watermark/watermark_model_v1.pt",
                            "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/"
                            "watermark_model_v1.pt", "", "LAION's watermark detector")],
}
LAION_DIR = "laion"


@dataclass(frozen=True)
class ModelSet:
    clip_en: ClipSpec
    clip_multi: ClipSpec
    embed: ClipSpec
    safety_head: str
    watermark: WatermarkSpec
    safety_threshold: float = 0.5
    aesthetic_head: str = ""
    concepts: str = ""  # the concept filter's file (concepts.py; "" for none)
    rating_embeddings: str = ""  # the search's aesthetic_score vectors: a folder of rating0..9.npy
    violence_prompts: str = ""  # the search's use_violence_detector prompts (2 x dim)


def _clip_of(spec: ClipSpec, arch: str, pretrained: str, threshold: float | None) -> ClipSpec:
    if arch or pretrained:
        spec = dataclasses.replace(spec, arch=arch or spec.arch, pretrained=pretrained or spec.pretrained)
        spec = dataclasses.replace(spec, name=f"{spec.arch}/{os.path.basename(spec.pretrained)}")
    return spec if threshold is None else dataclasses.replace(spec, threshold=threshold)


def small_files(models_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Where the small offline set's checkpoints are (each with its `.json` card beside it)."""
    root = Path(models_dir)
    return {"clip_en": root / "small-clip-en.pt", "clip_multi": root / "small-clip-multi.pt",
            "safety": root / "small-safety.pt", "watermark": root / "small-watermark.pt",
            "aesthetic": root / "small-aesthetic.pt", "concepts": root / "small-concepts.yml"}


def small_model_set(models_dir: str | os.PathLike[str] = DEFAULT_MODELS_DIR) -> ModelSet:
    """The small offline set as built; FileNotFoundError naming the command that builds it when it is missing."""
    files = small_files(models_dir)
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the small models are not built yet ({', '.join(missing)}): run "
                                "`laion-assets small-models` or `make models`")
    return ModelSet(
        clip_en=ClipSpec.from_checkpoint(files["clip_en"]),
        clip_multi=ClipSpec.from_checkpoint(files["clip_multi"]),
        # The stand-in for ViT-L/14: the small multilingual CLIP (captions come in four languages).
        embed=ClipSpec.from_checkpoint(files["clip_multi"]),
        safety_head=str(files["safety"]),
        watermark=watermark_spec_from_checkpoint(files["watermark"]),
        aesthetic_head=str(files["aesthetic"]),
        concepts=str(files["concepts"]),
    )


def laion_root(models_dir: str | os.PathLike[str]) -> Path:
    return Path(models_dir) / LAION_DIR


def laion_model_set(models_dir: str | os.PathLike[str] = DEFAULT_MODELS_DIR) -> ModelSet:
    """LAION's models, their files where `models fetch` puts them (not checked here: `resolve` checks those in
    use)."""
    root = laion_root(models_dir)

    def at(field: str) -> str:
        return str(root / LAION_FILES[field][0].path)

    return ModelSet(LAION_EN, LAION_MULTI, LAION_EMBED, at("safety_head"),
                    dataclasses.replace(LAION_WATERMARK, checkpoint=at("watermark")),
                    aesthetic_head=at("aesthetic_head"), concepts=at("concepts"),
                    rating_embeddings=str(Path(at("rating_embeddings")).parent),
                    violence_prompts=at("violence_prompts"))


def preset_files(settings: ModelSettings, chosen: ModelSet, fields: Collection[str] | None = None) -> list[ModelFile]:
    """The laion preset's files that `chosen` still uses (an override replaces its file), of the ModelSet `fields`
    given (None: all); [] for the small set."""
    if settings.preset != "laion":
        return []
    base = laion_model_set(settings.models_dir)
    used = {"safety_head": chosen.safety_head == base.safety_head,
            "concepts": chosen.concepts == base.concepts,
            "violence_prompts": chosen.violence_prompts == base.violence_prompts,
            "aesthetic_head": chosen.aesthetic_head == base.aesthetic_head,
            "rating_embeddings": chosen.rating_embeddings == base.rating_embeddings,
            "watermark": chosen.watermark.checkpoint == base.watermark.checkpoint}
    return [f for field, files in LAION_FILES.items() if used[field] and (fields is None or field in fields)
            for f in files]


OFF = "none"  # a file setting that turns its model off (the concept filter: --concepts none)


def resolve(settings: ModelSettings, check: bool | Collection[str] = True) -> ModelSet:
    """The preset's models with the settings' overrides applied. FileNotFoundError when the small set is not
    built, or when a laion file in use is missing (naming `laion-assets models fetch`); ModelFileError when one's
    sha256 is not the published one. `check`: every file in use (True), none (False), or those of the ModelSet
    fields named (what one command needs, e.g. ("aesthetic_head",))."""
    base = small_model_set(settings.models_dir) if settings.preset == "small" else laion_model_set(settings.models_dir)
    watermark = base.watermark
    if settings.watermark_arch or settings.watermark_checkpoint or settings.watermark_image_size:
        watermark = dataclasses.replace(
            watermark, arch=settings.watermark_arch or watermark.arch,
            checkpoint=settings.watermark_checkpoint or watermark.checkpoint,
            image_size=settings.watermark_image_size or watermark.image_size)
    s = settings
    chosen = ModelSet(
        clip_en=_clip_of(base.clip_en, s.clip_en_arch, s.clip_en_pretrained, s.threshold_en),
        clip_multi=_clip_of(base.clip_multi, s.clip_multi_arch, s.clip_multi_pretrained, s.threshold_multi),
        embed=_clip_of(base.embed, s.embed_arch, s.embed_pretrained, None),
        safety_head=s.safety_head or base.safety_head,
        watermark=watermark,
        aesthetic_head=s.aesthetic_head or base.aesthetic_head,
        concepts="" if s.concepts == OFF else s.concepts or base.concepts,
        rating_embeddings=s.rating_embeddings or base.rating_embeddings,
        violence_prompts=s.violence_prompts or base.violence_prompts,
    )
    if check:
        verify_all(laion_root(settings.models_dir), preset_files(settings, chosen, None if check is True else check),
                   settings.preset, settings.models_dir)
    return chosen


# --- the registry file: what operators change at run time ------------------------------------------------------

class RegistryError(ValueError):
    """A registry entry that is not a model setting, or of the wrong type."""


def load_overrides(store: Storage) -> dict[str, Any]:
    """The registry file's overrides of the model settings ({} when there is none)."""
    key = paths.model_registry()
    return store.read_json(key)["overrides"] if store.exists(key) else {}


def apply_overrides(settings: ModelSettings, overrides: dict[str, Any]) -> ModelSettings:
    fields = {f.name: f for f in dataclasses.fields(ModelSettings)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise RegistryError(f"not model settings: {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    return dataclasses.replace(settings, **overrides)


def save_overrides(store: Storage, overrides: dict[str, Any], note: str = "") -> dict[str, Any]:
    """Validate and store the registry's overrides (the whole set: later calls replace earlier ones)."""
    apply_overrides(ModelSettings(), overrides)  # refuse an unknown or mistyped entry before writing
    doc = {"overrides": overrides, "note": note, "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    store.write_json(paths.model_registry(), doc)
    return doc


def identity(chosen: ModelSet) -> dict[str, Any]:
    """What the CLIP stage's outputs depend on: each model's weights and each threshold. Its hash is the model
    registry's data version: when it changes, the stage is re-run (a threshold change only re-filters)."""
    from laion_assets.core.clip.specs import file_sha256, weights_id

    def head(path: str) -> str:
        return f"sha256:{file_sha256(path)}" if path and os.path.isfile(path) else path

    return {
        "clip_en": weights_id(chosen.clip_en.arch, chosen.clip_en.pretrained),
        "threshold_en": chosen.clip_en.threshold,
        "clip_multi": weights_id(chosen.clip_multi.arch, chosen.clip_multi.pretrained),
        "threshold_multi": chosen.clip_multi.threshold,
        "embed": weights_id(chosen.embed.arch, chosen.embed.pretrained),
        "safety_head": head(chosen.safety_head),
        "safety_threshold": chosen.safety_threshold,
        "watermark": head(chosen.watermark.checkpoint),
        "watermark_threshold": chosen.watermark.threshold,
        "aesthetic_head": head(chosen.aesthetic_head),
        "concepts": head(chosen.concepts),
    }


# The registry's parts, each a set of the identity's entries: each CLIP-stage output depends on one part, so that a
# change re-runs only what it touches.
PARTS = {
    "filter": ("clip_en", "threshold_en", "clip_multi", "threshold_multi"),
    "embed": ("embed",),
    "safety": ("safety_head", "safety_threshold", "concepts"),
    "watermark": ("watermark", "watermark_threshold"),
    "aesthetic": ("aesthetic_head",),
}


def versions(settings: ModelSettings) -> dict[str, str]:
    """The data version of each part of the registry, without building anything ("<preset>:unbuilt" while the
    small set is missing)."""
    import hashlib
    import json

    from laion_assets.core.clip.model_files import ModelFileError

    try:
        doc = identity(resolve(settings, check=False))  # a file not fetched yet: its path stands for it
    except (FileNotFoundError, ModelFileError):
        return {part: f"{settings.preset}:unbuilt" for part in PARTS}
    return {part: hashlib.sha256(json.dumps({k: doc[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]
            for part, keys in PARTS.items()}
