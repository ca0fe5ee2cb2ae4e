"""Reading MatConvNet DagNN networks saved as MATLAB .mat files (scipy.io).

`dagnn.DagNN.saveobj` stores a network as a struct with fields `vars`,
`params` (a struct array with `name`, `value`, `learningRate`,
`weightDecay`), `layers` (a struct array with `name`, `type` (the block's
MATLAB class, e.g. "dagnn.Conv"), `inputs`, `outputs` and `params` (cells of
names) and `block` (the block's properties, e.g. `size`, `pad`, `stride`)) and
`meta`. Published files hold it as the variable `net`, or as top-level
variables when saved with `save -struct`.

Convolution filters are stored height × width × in-channels × out-channels;
PyTorch wants out × in × height × width. MatConvNet's convolution is a
correlation, like PyTorch's, so no filter flip is needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.io

from extractors.checkpoints import CheckpointError


@dataclasses.dataclass(frozen=True)
class DagLayer:
    """One DagNN layer: `kind` is the block class without its package (e.g. "Conv")."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...]
    block: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DagNetwork:
    """A DagNN read from a .mat file: layers in file order and parameter arrays by name."""

    path: str
    layers: tuple[DagLayer, ...]
    params: dict[str, np.ndarray]

    def chain_from_input(self, ignore_inputs: Sequence[str] = ("label",)) -> list[DagLayer]:
        """Return the layers along the single path from the network input, in execution order.

        The input is the variable that some layer reads and no layer writes
        (`ignore_inputs`, such as a loss's label, excepted). The path follows
        each layer's first output to the one layer that reads it; it ends
        where no layer, or more than one (e.g. a descriptor feeding a loss
        and an error layer), reads the output.

        Raises:
          CheckpointError: no single input variable.
        """
        written = {name for layer in self.layers for name in layer.outputs}
        inputs = sorted({layer.inputs[0] for layer in self.layers
                         if layer.inputs and layer.inputs[0] not in written and layer.inputs[0] not in ignore_inputs})
        if len(inputs) != 1:
            raise CheckpointError(f"{self.path}: expected one network input variable, found {inputs}.")

        chain: list[DagLayer] = []
        variable = inputs[0]
        while True:
            readers = [layer for layer in self.layers if layer.inputs and layer.inputs[0] == variable]
            if len(readers) != 1 or readers[0] in chain:
                return chain
            chain.append(readers[0])
            if not readers[0].outputs:
                return chain
            variable = readers[0].outputs[0]


def read_dagnn(path: str) -> DagNetwork:
    """Read a DagNN saved by `saveobj` from a MATLAB v5/v7 .mat file.

    Raises:
      CheckpointError: the file is unreadable, MATLAB v7.3 (HDF5), or contains no DagNN struct.
    """
    try:
        contents = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=False, mat_dtype=False)
    except NotImplementedError as e:
        raise CheckpointError(
            f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save it in MATLAB with "
            f"`save(file, '-struct', 'net', '-v7')`.") from e
    except (ValueError, OSError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable MATLAB .mat file ({e}).") from e

    if "net" in contents:
        net = _scalar(contents["net"])
        fields = {name: getattr(net, name) for name in getattr(net, "_fieldnames", ())}
    else:
        fields = contents
    if "layers" not in fields or "params" not in fields:
        raise CheckpointError(
            f"{path}: no MatConvNet DagNN found (expected a struct `net` with fields `layers` and `params`, "
            f"found {sorted(k for k in contents if not k.startswith('__'))}).")

    params: dict[str, np.ndarray] = {}
    for record in np.ravel(fields["params"]):
        name = _string(record.name)
        if name in params:
            raise CheckpointError(f"{path}: parameter {name!r} appears twice.")
        params[name] = np.asarray(record.value)

    layers = []
    for record in np.ravel(fields["layers"]):
        block = _scalar(record.block) if np.size(record.block) else None
        layers.append(DagLayer(
            name=_string(record.name),
            kind=_string(record.type).rsplit(".", 1)[-1],
            inputs=_strings(record.inputs),
            outputs=_strings(record.outputs),
            params=_strings(record.params),
            block={k: _plain(getattr(block, k)) for k in getattr(block, "_fieldnames", ())},
        ))
    return DagNetwork(path=path, layers=tuple(layers), params=params)


def conv_filter_to_torch(value: np.ndarray) -> np.ndarray:
    """Convert a MatConvNet filter [H, W, C_in, C_out] (trailing singleton dims possibly dropped) to [C_out, C_in, H, W]."""
    value = np.asarray(value, dtype=np.float32)
    while value.ndim < 4:
        value = value[..., np.newaxis]
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))


def _scalar(value: Any) -> Any:
    # loadmat wraps every struct and cell in at least a 1×1 object array.
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.reshape(-1)[0]
    return value


def _string(value: Any) -> str:
    value = _scalar(value)
    if isinstance(value, np.ndarray):
        return "".join(str(v) for v in value.reshape(-1)) if value.size else ""
    return str(value)


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return tuple(_string(v) for v in value.reshape(-1))
    text = _string(value)
    return (text,) if text else ()


def _plain(value: Any) -> Any:
    # Block properties: strings stay strings, numeric arrays become flat lists.
    value = _scalar(value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        return _string(value)
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value.reshape(-1, order="F").tolist()
    return value
