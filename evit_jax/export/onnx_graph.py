"""ONNX graph clean-up: every shape operand a constant, also with a dynamic batch.

jax2onnx lowers a reshape whose target has the symbolic batch to `Shape -> Gather -> Concat -> Reshape`.
Such runtime shape arithmetic is what TensorRT's parser rejected in the official model's LiteMLA (its
dynamic Pad/Reshape, mit-han-lab/efficientvit issue #73). Reshape already says it with constants: 0 copies
the input's dimension at the same position and -1 is inferred from the others, so each such reshape gets a
constant target and the shape subgraph goes away. `dynamic_shape_nodes` lists what is left (the tests
require it to be empty).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Operands that carry shapes, sizes or indices (input positions per op type).
SHAPE_OPERANDS = {"Reshape": (1,), "Expand": (1,), "Pad": (1, 2, 3), "Tile": (1,), "ConstantOfShape": (0,),
                  "Resize": (1, 2, 3), "Slice": (1, 2, 3, 4), "Range": (0, 1, 2), "Unsqueeze": (1,),
                  "Squeeze": (1,), "Split": (1,), "TopK": (1,), "OneHot": (1,)}
SHAPE_OPS = ("Shape", "Size", "NonZero")


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _eval_small(node: onnx.NodeProto, inputs: list[np.ndarray]) -> np.ndarray | None:
    """Value of an index-arithmetic node whose inputs are constants (None for other nodes)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Concat":
        return np.concatenate(inputs, axis=attrs.get("axis", 0))
    if node.op_type == "Unsqueeze" and len(inputs) == 2:
        return np.expand_dims(inputs[0], tuple(int(a) for a in inputs[1]))
    if node.op_type == "Squeeze" and len(inputs) == 2:
        return np.squeeze(inputs[0], tuple(int(a) for a in inputs[1]))
    if node.op_type == "Gather":
        return np.take(inputs[0], inputs[1], axis=attrs.get("axis", 0))
    if node.op_type == "Cast" and inputs[0].dtype.kind in "iu":
        return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    return None


def fold_index_constants(model: onnx.ModelProto) -> None:
    """Replaces integer Concat/Unsqueeze/Squeeze/Gather/Cast nodes of constant inputs by initializers."""
    graph = model.graph
    values = _constants(graph)
    changed = True
    while changed:
        changed = False
        for node in list(graph.node):
            if node.op_type == "Constant" or not node.input or not all(i in values for i in node.input):
                continue
            if any(values[i].dtype.kind not in "iu" for i in node.input[:1]):
                continue
            result = _eval_small(node, [values[i] for i in node.input])
            if result is None:
                continue
            graph.initializer.append(numpy_helper.from_array(np.asarray(result), node.output[0]))
            values[node.output[0]] = np.asarray(result)
            graph.node.remove(node)
            changed = True


def _batch_dim_source(name: str, producers: dict[str, onnx.NodeProto], values: dict[str, np.ndarray]):
    """(tensor, axis) when `name` is Gather(Shape(tensor), axis), possibly under Squeeze/Unsqueeze; else None."""
    node = producers.get(name)
    while node is not None and node.op_type in ("Unsqueeze", "Squeeze"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Gather" or node.input[1] not in values:
        return None
    shape_node = producers.get(node.input[0])
    if shape_node is None or shape_node.op_type != "Shape" or len(shape_node.attribute):
        return None
    return shape_node.input[0], int(np.asarray(values[node.input[1]]).reshape(-1)[0])


def _shape_target(name: str, producers, values, like: str | None = None) -> list | None:
    """The entries of a shape tensor `Concat(constants, copied dimensions)`: ints, 0 for a copy of `like`'s
    dimension at the same position, None for another copied dimension; None when it is anything else."""
    concat = producers.get(name)
    if concat is None or concat.op_type != "Concat":
        return None
    target: list[int | None] = []
    for part in concat.input:
        if part in values:
            target.extend(int(v) for v in np.asarray(values[part]).reshape(-1))
            continue
        source = _batch_dim_source(part, producers, values)
        if source is None:
            return None
        tensor, axis = source
        target.append(0 if tensor == like and axis == len(target) else None)
    return target


def constant_reshape_targets(model: onnx.ModelProto) -> None:
    """Gives every Reshape fed by a `Concat` of constants and copied input dimensions a constant target."""
    graph = model.graph
    values = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in values:
            continue
        target = _shape_target(node.input[1], producers, values, like=node.input[0])
        if target is None:
            continue
        unknown = [i for i, v in enumerate(target) if v is None]
        if len(unknown) > 1 or (unknown and -1 in target):
            continue
        shape = np.array([-1 if v is None else v for v in target], np.int64)
        name = f"{node.output[0]}__static_shape"
        graph.initializer.append(numpy_helper.from_array(shape, name))
        node.input[1] = name


def _value_shapes(graph: onnx.GraphProto) -> dict[str, list]:
    """Known shapes by value name: ints, and strings for symbolic dimensions."""
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in infos
            if v.type.tensor_type.HasField("shape")}


def constant_concat_as_pad(model: onnx.ModelProto) -> None:
    """`Concat(x, Expand(scalar, shape of x with k at the axis))` -> `Pad(x, constant pads, scalar)` (either order)."""
    graph = model.graph
    values = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    shapes = _value_shapes(graph)
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "Concat" or len(node.input) != 2:
            continue
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        for position in (0, 1):
            expand, data = producers.get(node.input[position]), node.input[1 - position]
            if expand is None or expand.op_type != "Expand" or expand.input[0] not in values:
                continue
            fill = np.asarray(values[expand.input[0]])
            target = _shape_target(expand.input[1], producers, values)
            data_shape = shapes.get(data)
            if fill.size != 1 or target is None or data_shape is None or len(target) != len(data_shape):
                continue
            rank, ax = len(target), axis % len(target)
            same_elsewhere = all((t is None and isinstance(d, str)) or t == d
                                 for i, (t, d) in enumerate(zip(target, data_shape)) if i != ax)
            if not same_elsewhere or target[ax] is None:
                continue
            pads = np.zeros(2 * rank, np.int64)
            pads[ax + (rank if position == 1 else 0)] = target[ax]
            pads_name, fill_name = f"{node.output[0]}__pads", f"{node.output[0]}__fill"
            graph.initializer.extend([numpy_helper.from_array(pads, pads_name),
                                      numpy_helper.from_array(fill.reshape(()), fill_name)])
            pad = onnx.helper.make_node("Pad", [data, pads_name, fill_name], list(node.output),
                                        name=f"{node.name}__pad", mode="constant")
            graph.node.remove(node)
            graph.node.insert(index, pad)
            break


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drops nodes whose outputs nothing reads, then unused initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for node in dead:
            graph.node.remove(node)
        changed = bool(dead)
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)


def static_shape_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (changed in place) with constant shape operands wherever a batch copy or -1 can express them."""
    fold_index_constants(model)
    constant_reshape_targets(model)
    constant_concat_as_pad(model)
    remove_dead_nodes(model)
    return model


def dynamic_shape_nodes(model: onnx.ModelProto) -> list[str]:
    """'op name' of every shape-computing node and of every op whose shape operand is not a constant."""
    graph = model.graph
    constants = set(_constants(graph))
    found = [f"{n.op_type} {n.name}" for n in graph.node if n.op_type in SHAPE_OPS]
    for node in graph.node:
        for position in SHAPE_OPERANDS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] and node.input[position] not in constants:
                found.append(f"{node.op_type} {node.name} (operand {position})")
    return found
