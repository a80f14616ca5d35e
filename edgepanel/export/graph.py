"""A small ONNX graph builder: nodes, initializers and symbolic tensors (`Sym`) that support the
few array operations `edgepanel.model.reference.block` applies to its tensors (``x.shape[0]``,
``reshape``, ``+``, ``*``), so the one block definition emits a graph the way it runs NumPy.

Rows of the residual stream are a 2-D tensor (tokens, width): ``Sym.shape[0]`` is ROWS, which a
reshape turns into -1.  `onnx` is imported by the caller's first `Graph` (an optional extra)."""
from __future__ import annotations

import numpy as np

ROWS = object()          # the token count: dynamic, a reshape's -1


class Sym:
    """A named tensor of a `Graph`; `dims` is its static shape where known (ROWS: dynamic)."""

    def __init__(self, graph: "Graph", name: str, dims: tuple | None = None):
        self.graph, self.name, self.dims = graph, name, dims

    @property
    def shape(self) -> tuple:
        if self.dims is None:
            raise ValueError(f"the shape of {self.name} is not known to the exporter")
        return self.dims

    def reshape(self, *dims) -> "Sym":
        spec = [-1 if d is ROWS else int(d) for d in dims]
        return self.graph.op("Reshape", self, self.graph.ints(spec), dims=tuple(dims))

    def __add__(self, other: "Sym") -> "Sym":
        return self.graph.op("Add", self, other, dims=self.dims)

    def __mul__(self, other: "Sym") -> "Sym":
        return self.graph.op("Mul", self, other, dims=self.dims)

    def __sub__(self, other: "Sym") -> "Sym":
        return self.graph.op("Sub", self, other, dims=self.dims)


class Graph:
    """Collects nodes (in the order they are made: a topological order) and initializers."""

    def __init__(self):
        import onnx
        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self._used: dict[str, int] = {}
        self._consts: dict = {}

    def fresh(self, hint: str) -> str:
        n = self._used.get(hint, 0)
        self._used[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def op(self, op_type: str, *inputs, outputs: int = 1, dims=None, domain: str = "", name: str | None = None,
           **attrs):
        """Append a node; returns its output Sym (or a tuple of `outputs` Syms).  An input None is
        an omitted optional input."""
        outs = [self.fresh(name or op_type.lower()) for _ in range(outputs)]
        ins = ["" if i is None else i.name if isinstance(i, Sym) else str(i) for i in inputs]
        self.nodes.append(self.onnx.helper.make_node(op_type, ins, outs, name=outs[0], domain=domain or None, **attrs))
        syms = tuple(Sym(self, o, dims) for o in outs)
        return syms[0] if outputs == 1 else syms

    def initializer(self, array: np.ndarray, hint: str, dims=None) -> Sym:
        """A NumPy array as an initializer (dtypes NumPy has)."""
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return Sym(self, name, tuple(array.shape) if dims is None else dims)

    def packed(self, data_type: int, shape: tuple, raw: bytes, hint: str) -> Sym:
        """A sub-byte integer initializer (INT2, INT4, ...) from its packed bytes."""
        name = self.fresh(hint)
        self.initializers.append(self.onnx.helper.make_tensor(name, data_type, list(shape), raw, raw=True))
        return Sym(self, name, tuple(shape))

    def const(self, value, dtype=np.float32) -> Sym:
        """A small constant, made once per (value, dtype)."""
        arr = np.asarray(value, dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(arr, "c_" + arr.dtype.name)
        return self._consts[key]

    def ints(self, values) -> Sym:
        return self.const(list(values), np.int64)

