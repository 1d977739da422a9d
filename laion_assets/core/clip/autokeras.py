"""LAION's original NSFW detectors, the AutoKeras SavedModels (`clip_autokeras_binary_nsfw.zip` for ViT-L/14,
`clip_autokeras_nsfw_b32.zip` for ViT-B/32), evaluated without TensorFlow.

The model is read from two files of the SavedModel: `keras_metadata.pb` (the Keras layer configs, as JSON inside a
`SavedMetadata` proto: which layers in which order, each one's activation) and the checkpoint bundle under
`variables/` (`tfbundle.py`: the weights, by the object path `layer_with_weights-N/...` that the metadata names for
each layer). The forward pass is Keras's, layer by layer:

- `MultiCategoryEncoding` (AutoKeras): the columns it marks `int` are categorical: the value as TensorFlow's
  `as_string` writes a float64 (`%f`), looked up in the `StringLookup` vocabulary that adapting learned (its
  `token_counts` table: most frequent first, ties by the larger string, from index 1), 0 when not in it; the other
  columns as they are, NaN as 0. LAION's published files carry empty tables (the vocabulary was not saved, and
  the config has none), so a loaded model maps those columns to 0, whatever the embedding: what TensorFlow computes
  with these files, and the one place where LAION's PyTorch ports (which feed the raw value) differ.
- `Normalization`: (x - mean) / max(sqrt(variance), 1e-7), Keras's epsilon.
- `Dense` with its activation, `ReLU`, `Activation`, `Dropout` (nothing at inference), in the config's order.
"""

from __future__ import annotations

import functools
import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from laion_assets.core.clip.tfbundle import Bundle, BundleError, read_bundle

KERAS_EPSILON = 1e-7
ACTIVATIONS = {"linear": lambda x: x, "relu": lambda x: np.maximum(x, 0.0),
               "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x))}


class SavedModelError(BundleError):
    """A SavedModel that is not an AutoKeras head this reader evaluates (the message says what is missing)."""


@functools.cache
def _saved_metadata() -> Any:
    """keras_metadata.pb's SavedMetadata message: nodes of (node_path, identifier, metadata JSON)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="laion_assets_keras_metadata.proto", package="laion_assets.keras",
                                              syntax="proto3")
    node = file.message_type.add(name="SavedObject")
    for name, number in (("node_path", 3), ("identifier", 4), ("metadata", 5)):
        node.field.add(name=name, number=number, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    node.field.add(name="node_id", number=2, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    meta = file.message_type.add(name="SavedMetadata")
    meta.field.add(name="nodes", number=1, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                   type_name=".laion_assets.keras.SavedObject")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("laion_assets.keras.SavedMetadata"))


def read_files(path: str | os.PathLike[str]) -> tuple[dict[str, bytes], str]:
    """The SavedModel's files (relative to its folder) from a zip of it (LAION's) or the folder itself."""
    path = str(path)
    if os.path.isdir(path):
        out = {}
        for rel in ("keras_metadata.pb", "saved_model.pb"):
            if os.path.exists(os.path.join(path, rel)):
                out[rel] = open(os.path.join(path, rel), "rb").read()  # noqa: SIM115 - read whole
        variables = os.path.join(path, "variables")
        for name in os.listdir(variables) if os.path.isdir(variables) else []:
            out[f"variables/{name}"] = open(os.path.join(variables, name), "rb").read()  # noqa: SIM115
        return out, path
    with zipfile.ZipFile(path) as archive:
        index = [n for n in archive.namelist() if n.endswith("variables/variables.index")]
        if not index:
            raise SavedModelError(f"{path}: a zip without variables/variables.index (not a SavedModel)")
        root = index[0][: -len("variables/variables.index")]
        return {n[len(root):]: archive.read(n) for n in archive.namelist()
                if n.startswith(root) and not n.endswith("/")}, path


def is_saved_model_zip(names: list[str]) -> bool:
    return any(n.endswith("variables/variables.index") for n in names)


def _config(files: dict[str, bytes], where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The root model's Keras config and {layer name: its checkpoint object path}."""
    from google.protobuf.message import DecodeError

    if "keras_metadata.pb" not in files:
        raise SavedModelError(f"{where}: no keras_metadata.pb (a SavedModel written by Keras has one)")
    try:
        nodes = _saved_metadata().FromString(files["keras_metadata.pb"]).nodes
    except DecodeError as err:
        raise SavedModelError(f"{where}: keras_metadata.pb does not parse ({err})") from err
    root, paths = None, {}
    for node in nodes:
        try:
            doc = json.loads(node.metadata) if node.metadata else {}
        except json.JSONDecodeError as err:
            raise SavedModelError(f"{where}: a layer's metadata is not JSON ({err})") from err
        if node.node_path == "root":
            root = doc
        elif node.node_path.count(".") == 1 and "name" in doc:
            paths[doc["name"]] = node.node_path.removeprefix("root.")
    if root is None or "layers" not in root.get("config", {}):
        raise SavedModelError(f"{where}: keras_metadata.pb has no functional model at its root")
    return root["config"], paths


@dataclass
class _Layer:
    kind: str
    name: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray]


def _variable(bundle: Bundle, path: str, name: str) -> np.ndarray:
    return bundle.tensor(f"{path}/{name}/.ATTRIBUTES/VARIABLE_VALUE")


def _vocabulary(bundle: Bundle, path: str, column: int) -> dict[bytes, int]:
    """A StringLookup's learned vocabulary as Keras builds it from its token counts: most frequent first, ties by
    the larger token, indices from 1 (0 is the out-of-vocabulary index)."""
    table = f"{path}/encoding_layers/{column}/token_counts/.ATTRIBUTES"
    tokens, counts = bundle.tensor(f"{table}/table-keys"), bundle.tensor(f"{table}/table-values")
    order = sorted(range(len(tokens)), key=lambda i: (int(counts[i]), bytes(tokens[i])), reverse=True)
    return {bytes(tokens[i]): rank + 1 for rank, i in enumerate(order)}


class AutoKerasHead:
    """An AutoKeras structured-data classifier over embeddings, evaluated in float32 numpy as Keras does."""

    def __init__(self, layers: list[_Layer], dim: int) -> None:
        self.layers, self.dim = layers, dim

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """The model's output for each row (N, dim) -> (N,)."""
        x = np.asarray(embeddings, np.float64)  # the InputLayer's dtype: float64, then each layer's float32
        for layer in self.layers:
            x = _apply(layer, x)
        return np.asarray(x, np.float32).reshape(len(x), -1)[:, 0]


def _encode(layer: _Layer, x: np.ndarray) -> np.ndarray:
    out = np.where(np.isnan(x), 0.0, x).astype(np.float32)
    for column, vocabulary in layer.weights.items():
        col = int(column)
        out[:, col] = [vocabulary.get(b"%f" % v, 0) for v in x[:, col]]  # type: ignore[attr-defined]
    return out


def _apply(layer: _Layer, x: np.ndarray) -> np.ndarray:
    if layer.kind == "MultiCategoryEncoding":
        return _encode(layer, x)
    x = np.asarray(x, np.float32)
    if layer.kind == "Normalization":
        w = layer.weights
        return (x - w["mean"]) / np.maximum(np.sqrt(w["variance"]), np.float32(KERAS_EPSILON))
    if layer.kind == "Dense":
        x = x @ layer.weights["kernel"]
        if "bias" in layer.weights:
            x = x + layer.weights["bias"]
        return ACTIVATIONS[layer.config.get("activation", "linear")](x).astype(np.float32)
    if layer.kind == "ReLU":
        return np.maximum(x, 0.0)
    if layer.kind == "Activation":
        return ACTIVATIONS[layer.config["activation"]](x).astype(np.float32)
    return x  # Dropout: nothing at inference


SUPPORTED = ("InputLayer", "Custom>MultiCategoryEncoding", "Normalization", "Dense", "ReLU", "Activation", "Dropout")


def load_autokeras(path: str | os.PathLike[str]) -> AutoKerasHead:
    """An AutoKeras SavedModel (zip or folder) as a head; SavedModelError naming what is not supported."""
    files, where = read_files(path)
    config, object_paths = _config(files, where)
    bundle = read_bundle({k.removeprefix("variables/"): v for k, v in files.items() if k.startswith("variables/")},
                         where=where)
    layers, previous, dim = [], None, 0
    for spec in config["layers"]:
        kind, cfg, name = spec["class_name"], spec.get("config", {}), spec.get("name", "")
        if kind not in SUPPORTED:
            raise SavedModelError(f"{where}: layer {name!r} is a {kind}, which this reader does not evaluate")
        inbound = spec.get("inbound_nodes") or []
        if previous is not None and (len(inbound) != 1 or len(inbound[0]) != 1 or inbound[0][0][0] != previous):
            raise SavedModelError(f"{where}: layer {name!r} does not follow {previous!r}: only a chain of layers is "
                                  "evaluated")
        previous = name
        if kind == "InputLayer":
            dim = int(cfg["batch_input_shape"]["items"][-1])
            continue
        kind = kind.removeprefix("Custom>")
        weights: dict[str, Any] = {}
        path_of = object_paths.get(name, "")
        if kind == "MultiCategoryEncoding":
            weights = {str(i): _vocabulary(bundle, path_of, i) for i, e in enumerate(cfg["encoding"]) if e == "int"}
            if any(e not in ("int", "none") for e in cfg["encoding"]):
                raise SavedModelError(f"{where}: a one-hot column in {name!r} is not evaluated here")
        elif kind == "Normalization":
            weights = {"mean": _variable(bundle, path_of, "mean"), "variance": _variable(bundle, path_of, "variance")}
        elif kind == "Dense":
            weights = {"kernel": _variable(bundle, path_of, "kernel")}
            if cfg.get("use_bias", True):
                weights["bias"] = _variable(bundle, path_of, "bias")
        if cfg.get("activation", "linear") not in ACTIVATIONS:
            raise SavedModelError(f"{where}: activation {cfg['activation']!r} of {name!r} is not evaluated here")
        layers.append(_Layer(kind, name, cfg, weights))
    if not dim:
        raise SavedModelError(f"{where}: no InputLayer with the embedding dimension")
    return AutoKerasHead(layers, dim)


def zip_names(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.namelist()
