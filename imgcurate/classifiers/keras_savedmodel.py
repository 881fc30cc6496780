"""Reads small dense Keras 2 models saved as TensorFlow SavedModels, without TensorFlow, into torch modules.

LAION publishes its CLIP ViT-B/32 NSFW detector only as an autokeras model in this format, and TensorFlow is a large
dependency to take on for one 512-d MLP; loading it through Keras would also rebuild the model from the saved
configuration (and autokeras's custom objects), which is running the file rather than reading it. No package reads
the format without TensorFlow, so this module reads the two parts a dense classifier needs, from the folder or from
the zip of it, and executes nothing from them:

- ``keras_metadata.pb`` (written by Keras 2.5 and later): a ``SavedMetadata`` protobuf whose nodes each carry a
  ``node_path`` (``root``, ``root.layer-1``, ...) and the layer's JSON metadata. The root's JSON holds the model's
  configuration: ``Sequential`` or ``Functional``, its layers, their classes and settings.
- ``variables/variables.index`` and ``variables/variables.data-NNNNN-of-NNNNN``: TensorFlow's tensor bundle. The index
  is a LevelDB-format table (blocks of prefix-compressed key/value entries, each block followed by a compression byte
  and a masked crc32c, an index block pointing at the data blocks, and a 48-byte footer ending in a magic number).
  Its values are ``BundleEntryProto`` messages (dtype, shape, shard, offset, size, crc32c) locating each tensor's raw
  little-endian bytes in a data shard; the empty key holds the ``BundleHeaderProto``. The tensor
  ``_CHECKPOINTABLE_OBJECT_GRAPH`` is a serialized ``TrackableObjectGraph``: nodes, their named children and, for a
  variable, its checkpoint key. A layer's weights are found by walking it from the root along the layer's
  ``node_path`` and taking each child variable (``kernel``, ``bias``, ``mean``, ``variance``, ...).

Protobufs are decoded field by field from the wire format (varints and length-delimited fields, with the field
numbers of TensorFlow's and Keras's ``.proto`` files), so the reader needs neither ``protobuf`` nor generated code.
Block and tensor checksums are checked. ``saved_model.pb`` (the TensorFlow graph) is not read.

The layers understood are those of a plain chain: ``InputLayer``, ``Normalization``, ``Dense`` (with a ``linear``,
``relu``, ``sigmoid``, ``tanh``, ``softmax``, ``gelu`` or ``swish`` activation), ``Dropout``, ``ReLU`` (default
settings) and ``Activation``. Anything else (another layer class, a branch, a nested model, an unexpected setting) is
a :class:`~imgcurate.errors.WeightFileError` naming the file and the layer.

Example:
    >>> from imgcurate.classifiers.keras_savedmodel import keras_to_torch, read_keras_savedmodel
    >>> model = read_keras_savedmodel("clip_autokeras_nsfw_b32.zip")  # doctest: +SKIP
    >>> [layer.class_name for layer in model.layers]  # doctest: +SKIP
    ['InputLayer', 'Normalization', 'Dense', 'ReLU', 'Dropout', 'Dense', 'Activation']
    >>> head = keras_to_torch(model).eval()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import pathlib
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imgcurate.errors import WeightFileError

if TYPE_CHECKING:
    import torch

__all__ = ["KerasLayer", "KerasModel", "is_keras_savedmodel", "read_keras_savedmodel", "keras_to_torch"]

_METADATA = "keras_metadata.pb"
_INDEX = "variables/variables.index"
_OBJECT_GRAPH = b"_CHECKPOINTABLE_OBJECT_GRAPH"
_TABLE_MAGIC = 0xDB4775248B80FB57
#: TensorFlow's DataType enum -> numpy dtype (little-endian), for the types a dense model holds.
_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 19: "<f2"}
_DT_STRING = 7


# ---------------------------------------------------------------------------------------------------- crc32c
def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TensorFlow and LevelDB use; pure Python, about 10 MB/s, ample for small heads."""
    crc, table = 0xFFFFFFFF, _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    """Undoes LevelDB's crc masking (rotate right by 15 bits after adding a constant)."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------- protobuf wire
def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WeightFileError(where, "truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, where: str) -> dict[int, list[Any]]:
    """Decodes one protobuf message: field number -> its values (ints for varint/fixed fields, bytes otherwise)."""
    out: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos : pos + size], "little"), pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos, where)
            value, pos = bytes(buf[pos : pos + size]), pos + size
        else:
            raise WeightFileError(where, f"unsupported protobuf wire type {wire} (field {number})")
        if pos > len(buf):
            raise WeightFileError(where, f"protobuf field {number} runs past the end of its message")
        out.setdefault(number, []).append(value)
    return out


def _one(message: dict[int, list[Any]], number: int, default: Any = None) -> Any:
    """The last value of a non-repeated field (protobuf's rule), or ``default``."""
    values = message.get(number)
    return values[-1] if values else default


# ---------------------------------------------------------------------------------------------------- table
def _block(data: bytes, handle: bytes, where: str) -> bytes:
    """The contents of the block a BlockHandle (varint offset, varint size) points at, its trailer checked."""
    offset, pos = _varint(handle, 0, where)
    size, _ = _varint(handle, pos, where)
    if offset + size + 5 > len(data):
        raise WeightFileError(where, f"block at {offset} (+{size}) runs past the end of the file")
    contents, kind = data[offset : offset + size], data[offset + size]
    stored = int.from_bytes(data[offset + size + 1 : offset + size + 5], "little")
    if _unmask(stored) != _crc32c(contents + bytes([kind])):
        raise WeightFileError(where, f"block at {offset} fails its crc32c check (the file is damaged)")
    if kind != 0:
        raise WeightFileError(
            where, f"block at {offset} is compressed (type {kind}); only uncompressed tables are read"
        )
    return contents


def _block_entries(block: bytes, where: str) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) entries of a block: shared-prefix length, rest of key, value; restart points ignored."""
    if len(block) < 4:
        raise WeightFileError(where, "table block too short")
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    if end < 0:
        raise WeightFileError(where, "table block has a bad restart count")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos, where)
        unshared, pos = _varint(block, pos, where)
        size, pos = _varint(block, pos, where)
        if shared > len(key) or pos + unshared + size > end:
            raise WeightFileError(where, "table entry runs past its block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + size]
        pos += size


def _read_table(data: bytes, where: str) -> dict[bytes, bytes]:
    """All key/value pairs of a LevelDB-format table (TensorFlow's ``lib/io/table``)."""
    if len(data) < 48 or int.from_bytes(data[-8:], "little") != _TABLE_MAGIC:
        raise WeightFileError(where, "not a TensorFlow checkpoint index (no table footer)")
    footer = data[-48:-8]
    _, pos = _varint(footer, 0, where)  # metaindex handle: offset, size (unused)
    _, pos = _varint(footer, pos, where)
    entries = {}
    for _, handle in _block_entries(_block(data, footer[pos:], where), where):  # the index block: data blocks
        entries.update(_block_entries(_block(data, handle, where), where))
    return entries


# ---------------------------------------------------------------------------------------------------- files
class _Files:
    """The files of one SavedModel folder, on disk or inside a zip (one folder deep, as LAION zips them)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if os.path.isdir(self.path):
            return
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as err:
            raise WeightFileError(self.path, f"neither a SavedModel folder nor a zip of one ({err})") from None
        found = [n for n in self._zip.namelist() if n.rsplit("/", 1)[-1] == "saved_model.pb"]
        if len(found) != 1:
            raise WeightFileError(self.path, f"holds {len(found)} saved_model.pb files, expected one SavedModel")
        self._prefix = found[0][: -len("saved_model.pb")]

    def name(self, relative: str) -> str:
        return f"{self.path}:{self._prefix}{relative}" if self._zip else os.path.join(self.path, relative)

    def read(self, relative: str, missing: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(self._prefix + relative)
            return pathlib.Path(self.path, relative).read_bytes()
        except (KeyError, FileNotFoundError):
            raise WeightFileError(self.name(relative), f"missing: {missing}") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def is_keras_savedmodel(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a SavedModel folder or a zip holding one (judged by its file names only)."""
    path = str(path)
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "saved_model.pb"))
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.rsplit("/", 1)[-1] == "saved_model.pb" for n in archive.namelist())


# ---------------------------------------------------------------------------------------------------- bundle
class _Bundle:
    """A tensor bundle: the index table's entries, and tensors read from the data shards on request."""

    def __init__(self, files: _Files):
        self.files = files
        self.where = files.name(_INDEX)
        table = _read_table(files.read(_INDEX, "the checkpoint index, which holds the weights"), self.where)
        header = _fields(table.pop(b"", b""), self.where)  # BundleHeaderProto
        self.shards = _one(header, 1, 1)
        if _one(header, 2, 0) != 0:
            raise WeightFileError(self.where, "big-endian checkpoints are not read")
        self.entries = table
        self._data: dict[int, bytes] = {}

    def _shard(self, shard: int) -> bytes:
        if shard not in self._data:
            name = f"variables/variables.data-{shard:05d}-of-{self.shards:05d}"
            self._data[shard] = self.files.read(name, f"data shard {shard} of the checkpoint")
        return self._data[shard]

    def raw(self, key: bytes) -> tuple[int, tuple[int, ...], bytes]:
        """(dtype enum, shape, bytes) of one tensor, its crc32c checked."""
        if key not in self.entries:
            raise WeightFileError(self.where, f"no tensor {key.decode(errors='replace')!r}")
        entry = _fields(self.entries[key], self.where)  # BundleEntryProto
        if entry.get(7):
            raise WeightFileError(self.where, f"tensor {key.decode()!r} is partitioned (slices are not read)")
        shape = _fields(_one(entry, 2, b""), self.where)  # TensorShapeProto: repeated Dim dim = 2
        dims = tuple(_one(_fields(dim, self.where), 1, 0) for dim in shape.get(2, []))
        shard, offset, size = _one(entry, 3, 0), _one(entry, 4, 0), _one(entry, 5, 0)
        data = self._shard(shard)[offset : offset + size]
        if len(data) != size:
            raise WeightFileError(self.where, f"tensor {key.decode()!r} runs past the end of data shard {shard}")
        dtype, crc = _one(entry, 1, 0), _unmask(_one(entry, 6, 0))
        if dtype == _DT_STRING:  # the checksum covers the lengths as fixed-width integers, not as written
            size, pos = _varint(data, 0, self.where) if data else (0, 0)
            checked = [_crc32c(size.to_bytes(n, "little") + data[pos:]) for n in (4, 8) if size < 1 << (8 * n)]
        else:
            checked = [_crc32c(data)]
        if crc not in checked:
            raise WeightFileError(self.where, f"tensor {key.decode()!r} fails its crc32c check (the file is damaged)")
        return dtype, dims, data

    def array(self, key: bytes) -> np.ndarray:
        dtype, dims, data = self.raw(key)
        if dtype not in _DTYPES:
            raise WeightFileError(self.where, f"tensor {key.decode()!r} has TensorFlow dtype {dtype}, not read")
        count = int(np.prod(dims, dtype=np.int64))
        if len(data) != count * np.dtype(_DTYPES[dtype]).itemsize:
            raise WeightFileError(self.where, f"tensor {key.decode()!r}: {len(data)} bytes for shape {dims}")
        return np.frombuffer(data, dtype=_DTYPES[dtype]).reshape(dims).copy()

    def string(self, key: bytes) -> bytes:
        """A scalar string tensor: varint length, a 4-byte checksum of the length, the bytes. TensorFlow's entry
        checksum covers the length as a 4-byte integer (``uint32``) in the versions tried; 8 bytes is accepted too."""
        dtype, dims, data = self.raw(key)
        if dtype != _DT_STRING or dims:
            raise WeightFileError(self.where, f"tensor {key.decode()!r} is not a scalar string")
        size, pos = _varint(data, 0, self.where)
        return data[pos + 4 : pos + 4 + size]


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class KerasLayer:
    """One layer of a saved Keras model: its name, class, configuration and weights by variable name."""

    name: str
    class_name: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class KerasModel:
    """A saved Keras model read as a chain of layers, input first."""

    path: str
    class_name: str
    layers: list[KerasLayer]


def read_keras_savedmodel(path: str | os.PathLike) -> KerasModel:
    """Reads the layer chain and weights of a Keras 2 SavedModel (a folder, or a zip holding one folder).

    Args:
        path: the SavedModel folder (``saved_model.pb``, ``keras_metadata.pb``, ``variables/``) or a zip of it.

    Returns:
        The model's layers in the order data flows through them, each with its configuration and weights.

    Raises:
        WeightFileError: a file is missing, damaged or not in the format described in this module's docstring, or
            the model is not a single chain of layers; the message names the file (and the layer).
    """
    files = _Files(path)
    try:
        where = files.name(_METADATA)
        missing = "the layer configuration (before Keras 2.5 SavedModels kept it in saved_model.pb, which is not read)"
        nodes = _keras_nodes(files.read(_METADATA, missing), where)
        root = nodes.get("root")
        if root is None or not isinstance(root.get("config"), dict) or "layers" not in root["config"]:
            raise WeightFileError(where, "holds no model configuration with layers (a subclassed model?)")
        class_name = root.get("class_name", "?")
        # the model's layers are the root's direct children (``root.layer-1``, ``root.layer_with_weights-0``)
        paths = {meta.get("name"): node_path for node_path, meta in nodes.items() if node_path.count(".") == 1}
        bundle = _Bundle(files)
        graph = _object_graph(bundle.string(_OBJECT_GRAPH), bundle.where)
        layers = []
        for spec in _chain(class_name, root["config"], where):
            layer = KerasLayer(_name(spec), spec.get("class_name", "?"), spec.get("config", {}))
            if layer.name in paths:
                for variable, key in _variables(graph, paths[layer.name], bundle.where).items():
                    layer.weights[variable] = bundle.array(key)
            layers.append(layer)
        return KerasModel(str(path), class_name, layers)
    finally:
        files.close()


def _keras_nodes(data: bytes, where: str) -> dict[str, dict[str, Any]]:
    """``SavedMetadata`` (repeated SavedObject nodes = 1; SavedObject: node_path = 3, metadata = 5): path -> JSON."""
    out = {}
    for node in _fields(data, where).get(1, []):
        message = _fields(node, where)
        node_path = _one(message, 3, b"").decode()
        try:
            out[node_path] = json.loads(_one(message, 5, b"{}"))
        except ValueError as err:
            raise WeightFileError(where, f"node {node_path!r} has metadata that is not JSON ({err})") from None
    return out


def _object_graph(data: bytes, where: str) -> list[dict[str, Any]]:
    """``TrackableObjectGraph``: per node, its children (ObjectReference: node_id = 1, local_name = 2) and the
    checkpoint keys of its attributes (SerializedTensor: name = 1, checkpoint_key = 3)."""
    nodes = []
    for node in _fields(data, where).get(1, []):
        message = _fields(node, where)
        children = {}
        for child in message.get(1, []):
            ref = _fields(child, where)
            children[_one(ref, 2, b"").decode()] = _one(ref, 1, 0)
        attributes = {}
        for attribute in message.get(2, []):
            tensor = _fields(attribute, where)
            attributes[_one(tensor, 1, b"").decode()] = _one(tensor, 3, b"")
        nodes.append({"children": children, "attributes": attributes})
    return nodes


def _variables(graph: list[dict[str, Any]], node_path: str, where: str) -> dict[str, bytes]:
    """The checkpoint keys of the variables directly under the object at ``node_path`` (``root.layer-1``)."""
    node = 0
    for step in node_path.split(".")[1:]:
        children = graph[node]["children"] if node < len(graph) else {}
        if step not in children:
            raise WeightFileError(where, f"the checkpoint's object graph has no {node_path!r}")
        node = children[step]
    out = {}
    for name, child in graph[node]["children"].items():
        key = graph[child]["attributes"].get("VARIABLE_VALUE") if child < len(graph) else None
        if key:
            out[name] = key
    return out


def _chain(class_name: str, config: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The layer specs of a Sequential model, or of a Functional one whose layers form one chain, input first."""
    layers = config["layers"]
    if class_name == "Sequential":
        return list(layers)
    if class_name not in ("Functional", "Model"):
        raise WeightFileError(where, f"the model is a {class_name}, not a Sequential or Functional model")
    by_name = {_name(spec): spec for spec in layers}
    inputs, outputs = config.get("input_layers", []), config.get("output_layers", [])
    if len(inputs) != 1 or len(outputs) != 1:
        raise WeightFileError(where, f"the model has {len(inputs)} inputs and {len(outputs)} outputs, not one each")
    following: dict[str, str] = {}
    for name, spec in by_name.items():
        nodes = spec.get("inbound_nodes", [])
        if not nodes:
            continue
        if len(nodes) != 1 or len(nodes[0]) != 1:
            raise WeightFileError(where, f"layer {name!r} is called more than once or on several tensors")
        source = nodes[0][0][0]
        if source in following:
            raise WeightFileError(where, f"the model branches after layer {source!r} (into {following[source]!r} "
                                         f"and {name!r}); only a chain of layers is read")  # fmt: skip
        following[source] = name
    chain, name = [], inputs[0][0]
    if name not in by_name:
        raise WeightFileError(where, f"the input layer {name!r} is not among the layers")
    while True:
        chain.append(by_name[name])
        if name == outputs[0][0]:
            break
        if name not in following:
            raise WeightFileError(where, f"layer {name!r} does not lead to the output layer {outputs[0][0]!r}")
        name = following[name]
    if len(chain) != len(by_name):
        unused = sorted(set(by_name) - {_name(spec) for spec in chain})
        raise WeightFileError(where, f"layers {unused} are not on the path from input to output")
    return chain


def _name(spec: dict[str, Any]) -> str:
    return spec.get("name") or spec.get("config", {}).get("name", "?")


# ---------------------------------------------------------------------------------------------------- torch
def keras_to_torch(model: KerasModel | str | os.PathLike) -> torch.nn.Module:
    """Builds a torch module computing the same function as a saved Keras chain (in eval mode: no dropout).

    Args:
        model: a :class:`KerasModel`, or the path of a SavedModel folder or zip to read first.

    Returns:
        An ``nn.Sequential`` whose children are named after the Keras layers; its attributes ``input_size`` and
        ``output_size`` are the widths it takes and gives.

    Raises:
        WeightFileError: a layer this builder does not know, an unsupported setting or a weight of the wrong shape,
            naming the file and the layer.
    """
    import torch
    from torch import nn

    if not isinstance(model, KerasModel):
        model = read_keras_savedmodel(model)
    modules: dict[str, nn.Module] = {}
    input_size = width = _input_width(model)
    for layer in model.layers:
        built, width_in, width = _build_layer(model.path, layer, width)
        input_size = input_size or width_in
        for suffix, module in built:
            modules[f"{layer.name}{suffix}".replace(".", "_")] = module
    if input_size is None:
        raise WeightFileError(model.path, "the input width cannot be told (no input shape, no weights)")
    seq = nn.Sequential(OrderedDict(modules))
    seq.input_size = input_size
    seq.output_size = width
    return seq.to(torch.float32)


def _input_width(model: KerasModel) -> int | None:
    for layer in model.layers:
        shape = layer.config.get("batch_input_shape") or layer.config.get("batch_shape")
        if isinstance(shape, dict):
            shape = shape.get("items")
        if shape:
            if len(shape) != 2 or not isinstance(shape[-1], int):
                raise WeightFileError(model.path, f"layer {layer.name!r}: input shape {shape} is not (batch, width)")
            return shape[-1]
    return None


def _activation(path: str, layer: KerasLayer, name: str) -> list[tuple[str, torch.nn.Module]]:
    from torch import nn

    table = {
        "linear": None,
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "swish": nn.SiLU,
        "silu": nn.SiLU,
        "softmax": lambda: nn.Softmax(dim=-1),
    }
    if name not in table:
        raise WeightFileError(path, f"layer {layer.name!r} ({layer.class_name}): activation {name!r} is not supported")
    return [] if table[name] is None else [(f"_{name}", table[name]())]


def _build_layer(
    path: str, layer: KerasLayer, width: int | None
) -> tuple[list[tuple[str, Any]], int | None, int | None]:
    """Torch modules (name suffix, module) for one Keras layer, and the widths before and after it (None: not known
    yet, before the first layer with weights of a model that declares no input shape)."""
    import torch
    from torch import nn

    config, kind = layer.config, layer.class_name

    def fail(problem: str) -> WeightFileError:
        return WeightFileError(path, f"layer {layer.name!r} ({kind}): {problem}")

    def weight(name: str) -> np.ndarray:
        if name not in layer.weights:
            raise fail(f"no weight {name!r} in the checkpoint (has {sorted(layer.weights)})")
        return layer.weights[name].astype(np.float32)

    if kind == "InputLayer":
        return [], width, width
    if kind == "Dropout":
        return [("", nn.Dropout(float(config.get("rate", 0.0))))], width, width
    if kind == "Activation":
        return _activation(path, layer, config.get("activation", "linear")), width, width
    if kind == "ReLU":
        if config.get("max_value") is not None or config.get("negative_slope", 0) or config.get("threshold", 0):
            raise fail("only a plain ReLU (no max_value, negative_slope or threshold) is supported")
        return [("", nn.ReLU())], width, width
    if kind == "Dense":
        kernel = weight("kernel")
        if kernel.ndim != 2 or (width is not None and kernel.shape[0] != width):
            raise fail(f"kernel of shape {kernel.shape} does not take {width}-d input")
        linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=bool(config.get("use_bias", True)))
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            if linear.bias is not None:
                linear.bias.copy_(torch.from_numpy(weight("bias").reshape(-1)))
        return (
            [("", linear), *_activation(path, layer, config.get("activation", "linear"))],
            kernel.shape[0],
            kernel.shape[1],
        )
    if kind == "MultiCategoryEncoding":
        # autokeras's structured-data input layer (LAION's B/32 detector starts with one): a numerical column
        # ("none") is the number with NaN made 0; a categorical one ("int") goes through a string lookup table
        encoding = list(config.get("encoding") or [])
        categorical = sum(e != "none" for e in encoding)
        if categorical:
            raise fail(f"{categorical} of {len(encoding)} columns use a categorical encoding (a string lookup table), "
                       "which is not supported; only numerical ('none') columns are")  # fmt: skip
        size = len(encoding) or width
        if width is not None and size != width:
            raise fail(f"encodes {size} columns, not the {width}-d input")
        return [("", _NanToZero())], size, size
    if kind == "Normalization":
        axis = config.get("axis", -1)
        axis = axis.get("items") if isinstance(axis, dict) else axis
        if axis not in (-1, 1, [-1], [1]) or config.get("invert", False):
            raise fail(f"only a per-feature normalization of 2-d input is supported (axis={axis!r}, invert)")
        stats = []
        for name in ("mean", "variance"):
            value = config.get(name)
            stats.append(weight(name) if value is None else np.asarray(value, dtype=np.float32))
        size = width or max(s.size for s in stats)
        try:
            mean, variance = (np.broadcast_to(s.reshape(-1), (size,)).copy() for s in stats)
        except ValueError:
            raise fail(f"mean/variance of sizes {[s.size for s in stats]} do not fit {size}-d input") from None
        return [("", _Normalization(mean, variance))], size, size
    raise fail(
        "this layer class is not supported (the reader builds chains of InputLayer, autokeras's "
        "MultiCategoryEncoding, Normalization, Dense, Dropout, ReLU and Activation layers)"
    )


def _NanToZero() -> torch.nn.Module:  # noqa: N802 - a module factory
    """autokeras's numerical columns: the value, with NaN replaced by 0."""
    from torch import nn

    class _Impute(nn.Module):
        def forward(self, x):
            return x.nan_to_num(nan=0.0, posinf=float("inf"), neginf=float("-inf"))

    return _Impute()


def _Normalization(mean: np.ndarray, variance: np.ndarray) -> torch.nn.Module:  # noqa: N802 - a module factory
    """Keras's ``Normalization``: ``(x - mean) / max(sqrt(variance), 1e-7)`` (Keras's epsilon)."""
    import torch
    from torch import nn

    class _Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean))
            self.register_buffer("variance", torch.from_numpy(variance))

        def forward(self, x):
            return (x - self.mean) / self.variance.sqrt().clamp_min(1e-7)

    return _Norm()
