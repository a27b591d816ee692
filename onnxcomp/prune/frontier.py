"""Run a model piece by piece over a fixed set of feeds, each node once (the refit's executor).

The least-squares refit (:mod:`onnxcomp.prune.reconstruct`) needs, stage after stage, the inputs
of the layers it refits in the *current* pruned model, whose earlier layers it has just rewritten.
Running the whole model for every stage costs one full inference per stage and feed (onnxruntime
runs every node of a session whatever outputs are asked for). :class:`Frontier` instead keeps,
per feed, the tensors computed so far that nodes not yet run still read (the frontier), and each
:meth:`Frontier.compute` call builds a session on just the nodes still missing for the asked
tensors, fed from the frontier. Over all stages every node then runs once per feed.

A node runs only when asked for, so the caller must not change a node after it ran (the refit
changes a layer in the stage after the one that computed its input, and nothing upstream).
When the frontier would hold more than ``max_bytes``, nothing is kept: each call then runs all the
ancestors of the asked tensors from the graph inputs (still only the ancestors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import OnnxcompError

__all__ = ["Frontier", "FRONTIER_MAX_BYTES"]

#: Frontier size (all feeds) above which computed tensors are not kept between calls.
FRONTIER_MAX_BYTES = 768 << 20


def _has_subgraphs(model: ir.Model) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for node in model.graph for a in node.attributes.values())


class Frontier:
    """Piecewise execution of ``model`` (read at each call: rewrite only nodes that have not run).

    Args:
        model: the model; nodes are identified by their position in its (topological) graph order,
            which must not change between calls (weights may).
        feeds: the feeds, held in memory.
        threads: onnxruntime intra-op threads.
        max_bytes: frontier size above which nothing is kept between calls.
    """

    def __init__(self, model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], *,
                 threads: int | None = None, max_bytes: int = FRONTIER_MAX_BYTES) -> None:
        self.model = model
        self.feeds = [dict(f) for f in feeds]
        self.threads = threads
        self.max_bytes = max_bytes
        self.keep = not _has_subgraphs(model)  # subgraphs may read outer values: run from the inputs
        self._inputs = {v.name for v in model.graph.inputs}
        self._done: set[int] = set()
        self._store: list[dict[str, np.ndarray]] = [{} for _ in self.feeds]
        #: nodes run per feed, summed over calls (a measure of the work done)
        self.nodes_run = 0
        self.sessions = 0

    # -- graph walking ------------------------------------------------------------------------

    def _index(self):
        nodes = list(self.model.graph)
        producer = {}
        for i, node in enumerate(nodes):
            for v in node.outputs:
                if v.name:
                    producer[v.name] = i
        consts = {name for name, v in self.model.graph.initializers.items()}
        return nodes, producer, consts

    def _plan(self, names: Sequence[str]):
        nodes, producer, consts = self._index()
        available = set(self._inputs) | (set(self._store[0]) if self.keep and self._store else set())
        todo: set[int] = set()
        stack = [n for n in names if n not in available]
        seen = set()
        while stack:
            name = stack.pop()
            if name in seen or name in available or name in consts or not name:
                continue
            seen.add(name)
            if name not in producer:
                raise OnnxcompError(f"tensor {name!r} is neither a graph input nor produced by a node")
            i = producer[name]
            if self.keep and i in self._done:
                raise OnnxcompError(f"tensor {name!r} was computed and then dropped (internal error)")
            if i in todo:
                continue
            todo.add(i)
            stack.extend(v.name for v in nodes[i].inputs if v is not None)
        order = sorted(todo)
        produced = {v.name for i in order for v in nodes[i].outputs if v.name}
        boundary = []
        for i in order:
            for v in nodes[i].inputs:
                if v is not None and v.name and v.name not in produced and v.name not in consts and v.name not in boundary:
                    boundary.append(v.name)
        return nodes, order, boundary, produced

    def _later_uses(self, nodes, done: set[int], produced: set[str]) -> list[str]:
        """Tensors of ``produced`` that a node not in ``done`` still reads, or that the graph outputs."""
        wanted = []
        for i, node in enumerate(nodes):
            if i in done:
                continue
            for v in node.inputs:
                if v is not None and v.name in produced and v.name not in wanted:
                    wanted.append(v.name)
        return wanted

    # -- sub-model ----------------------------------------------------------------------------

    def _submodel(self, order: list[int], boundary: list[str], outputs: list[str]) -> ir.Model:
        from onnxcomp.graph import infer_types
        from onnxcomp.io import clone_model

        clone = clone_model(self.model)
        graph = clone.graph
        nodes = list(graph)
        keep = set(order)
        values = {v.name: v for n in nodes for v in n.outputs if v.name}
        for v in graph.inputs:
            values[v.name] = v
        example = self._store[0] if self.keep else {}
        fresh_inputs = []
        for name in boundary:
            old = values[name]
            if old.is_graph_input():
                fresh_inputs.append(old)
                continue
            arr = example.get(name)
            new = ir.Value(name=None, type=old.type if old.type is not None else (
                ir.TensorType(ir.DataType.from_numpy(arr.dtype)) if arr is not None else None), shape=old.shape)
            old.replace_all_uses_with(new)
            fresh_inputs.append((new, name))
        graph.outputs.clear()
        drop = [n for i, n in enumerate(nodes) if i not in keep]
        graph.remove(drop, safe=False)
        graph.inputs.clear()
        for item in fresh_inputs:
            if isinstance(item, tuple):
                new, name = item
                new.name = name
                graph.inputs.append(new)
            else:
                graph.inputs.append(item)
        kept_values = {v.name: v for n in graph for v in n.outputs if v.name}
        if any(kept_values[n].dtype is None for n in outputs):
            infer_types(clone)
            kept_values = {v.name: v for n in graph for v in n.outputs if v.name}
        for name in outputs:
            graph.outputs.append(kept_values[name])
        for name in [k for k, v in graph.initializers.items() if not list(v.uses()) and not v.is_graph_output()]:
            del graph.initializers[name]
        return clone

    # -- public -------------------------------------------------------------------------------

    def compute(self, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """Per feed, ``{name: value}`` of ``names`` in the model as it is now."""
        from onnxcomp.runtime import create_session, session_options

        names = list(dict.fromkeys(names))
        nodes, order, boundary, produced = self._plan(names)
        asked = [n for n in names if n in produced]
        later = self._later_uses(nodes, self._done | set(order), produced) if self.keep else []
        outputs = list(dict.fromkeys([*asked, *later]))
        results: list[dict[str, np.ndarray]] = []
        session = None
        if order and outputs:
            session = create_session(self._submodel(order, boundary, outputs),
                                     sess_options=session_options("basic", threads=self.threads))
            self.sessions += 1
        store_bytes = 0
        for f, feed in enumerate(self.feeds):
            have = {**feed, **self._store[f]}
            computed = dict(zip(outputs, session.run(outputs, {b: have[b] for b in boundary}))) if session else {}
            self.nodes_run += len(order)
            results.append({n: computed[n] if n in computed else have[n] for n in names})
            if self.keep:
                self._store[f].update({n: computed[n] for n in later})
                store_bytes += sum(a.nbytes for a in self._store[f].values())
        if self.keep:
            self._done |= set(order)
            # drop tensors no node still reads
            still = set(self._later_uses(nodes, self._done, set(self._store[0]) if self._store else set()))
            for store in self._store:
                for k in [k for k in store if k not in still]:
                    del store[k]
            if store_bytes > self.max_bytes:  # too large to keep: from now on run from the inputs
                self.keep = False
                self._store = [{} for _ in self.feeds]
                self._done = set()
        return results
