"""ONNX Runtime pieces of a latency profile (``nas4dyn profile --runtime onnxruntime``).

Every table entry and every end-to-end subnet becomes an ONNX model written with the graph builder of
``nas4dyn export --format onnx`` (:mod:`nas4dyn.export.onnx_graph`), so a piece runs the ops that the exported
``model.onnx`` runs for that part:

- stem: the input normalisation and resize, then the stem;
- gater: the channel gater on the resized images;
- block: one gate state (channel gates narrow their convs with Gather, fed with the gate logits; a forced skip
  gate's ``If``; a routed block's router and path ``If`` nodes);
- exit: an exit not taken — head, confidence test, and the ``If`` that runs the rest of the network on the
  samples still running, with their gather and the scatter back into place;
- classifier: the final head;
- subnets: whole ``model.onnx`` graphs (:func:`nas4dyn.export.onnx.build_onnx`), forced paths with their exit
  thresholds and gates fixed.

Inputs keep a symbolic batch dimension as in ``model.onnx``, so onnxruntime optimises a piece as it does the
exported graph. Gate kinds without an ONNX translation (EMG, DFS, width, MBConv channel gates) get no entries,
and random subnets are drawn among the archs that export.

The ONNX translation lives in the export layer above; the profiler imports it (only when it times
onnxruntime) so that a table times exactly what export writes rather than a second translation of the parts.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from onnx import TensorProto, helper

from nas4dyn.cost.paths import block_gate
from nas4dyn.cost.profiler import ExitProbe, Item, ResizedStem
from nas4dyn.cost.timing import OnnxPiece
from nas4dyn.export.onnx import build_onnx, make_model, normalised_input
from nas4dyn.export.onnx_graph import GraphBuilder, onnx_refusal
from nas4dyn.export.runtime import ExportedModel
from search_spaces.arch import Arch
from supernet.dynamic.cigt import RoutedBlock
from supernet.subnet import SubNet

_NEVER_LEAVES = 2.0  # confidence lies in [0, 1]: no sample leaves at an exit with this threshold


class OnnxPieces:
    """Items as ``model.onnx`` runs them: ONNX models timed in onnxruntime sessions with ``threads`` intra-op
    threads (one piece per module and input shapes; channel-gate levels share one and differ in the logits)."""

    runtime = "onnxruntime"

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pieces: dict[tuple, tuple[torch.nn.Module, OnnxPiece, int]] = {}
        self._arrays: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def supports(self, gate: str, block_type: str) -> bool:
        return onnx_refusal(gate, block_type) is None

    def _array(self, t: torch.Tensor) -> np.ndarray:
        """The tensor as a numpy array, one array per tensor (a bundle stores each input once)."""
        if id(t) not in self._arrays:
            self._arrays[id(t)] = (t, t.detach().cpu().numpy().astype(np.float32))
        return self._arrays[id(t)][1]

    def _item(self, piece: OnnxPiece, inputs: tuple[torch.Tensor, ...]) -> Item:
        return Item(piece, tuple(self._array(t) for t in inputs))

    def part(self, kind: str, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Item:
        """The item of a table entry of ``kind`` (stem, gater, block, exit, classifier)."""
        key = (id(module), tuple(tuple(t.shape) for t in inputs))
        if key not in self._pieces:  # the module is kept with its piece, so its id stays its own
            proto, used = getattr(self, f"_{kind}")(module, *inputs)
            self._pieces[key] = (module, OnnxPiece(proto.SerializeToString(), self.threads), used)
        _, piece, used = self._pieces[key]
        return self._item(piece, inputs[:used])

    def subnet(self, sub: SubNet, arch: Arch, x: torch.Tensor) -> Item:
        """A (static or forced) subnet as the whole ``model.onnx`` graph, taking ``x`` (identity normalisation)."""
        c = x.shape[1]
        proto = build_onnx(ExportedModel(sub.eval(), [0.0] * c, [1.0] * c, arch, c), x.shape[-1])
        return self._item(OnnxPiece(proto.SerializeToString(), self.threads), (x,))

    # ---- one graph per kind of table entry: (model, number of the inputs it takes) ------------------------
    @staticmethod
    def _model(g: GraphBuilder, inputs: list[tuple[str, torch.Tensor]], outputs: list[tuple[str, int]]) -> Any:
        ins = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *t.shape[1:]]) for name, t in inputs]
        outs = [helper.make_tensor_value_info(g.output(name, f"out{i}"), elem, None)
                for i, (name, elem) in enumerate(outputs)]
        return make_model(g, ins, outs, "nas4dyn_profile_piece")

    def _stem(self, module: ResizedStem, x: torch.Tensor) -> tuple[Any, int]:
        g = GraphBuilder()
        c = x.shape[1]
        h = normalised_input(g, "x", np.zeros((1, c, 1, 1), np.float32), np.ones((1, c, 1, 1), np.float32),
                             x.shape[-1], module.resolution)
        return self._model(g, [("x", x)], [(g.sequential(h, module.stem), TensorProto.FLOAT)]), 1

    def _gater(self, gater: torch.nn.Module, x: torch.Tensor) -> tuple[Any, int]:
        g = GraphBuilder()
        return self._model(g, [("x", x)], [(g.gater("x", gater), TensorProto.FLOAT)]), 1

    def _block(self, blk: torch.nn.Module, h: torch.Tensor, logits: torch.Tensor) -> tuple[Any, int]:
        routed = {blk: list(blk(h, logits).shape[1:])} if isinstance(blk, RoutedBlock) else {}
        g = GraphBuilder(routed)
        gated = block_gate(blk) == "channel"
        inputs = [("h", h)] + ([("gates", logits)] if gated else [])
        out = g.block("h", blk, "gates" if gated else None)
        return self._model(g, inputs, [(out, TensorProto.FLOAT)]), len(inputs)

    def _exit(self, probe: ExitProbe, h: torch.Tensor) -> tuple[Any, int]:
        g = GraphBuilder()
        logits = g.head("h", probe.head)
        here = g.batch_fill(logits, 0)
        conf = g.confidence(logits, probe.criterion, probe.head.fc.out_features)
        stay = g.rows(g.op("Less", [conf, g.const(np.float32(_NEVER_LEAVES))]))

        def later() -> list[str]:  # the rest of the network would run here, on the gathered samples
            rest = [g.op("Gather", [v, stay], axis=0) for v in ("h", logits, here)]
            return [g.scatter_rows(logits, stay, rest[1]), g.scatter_rows(here, stay, rest[2]), rest[0]]

        types = [(TensorProto.FLOAT, 2), (TensorProto.INT64, 1), (TensorProto.FLOAT, 4)]
        outs = g.if_(g.nonempty(stay), later, lambda: [logits, here, "h"], types)
        return self._model(g, [("h", h)], [(o, t) for o, (t, _) in zip(outs, types)]), 1

    def _classifier(self, head: torch.nn.Module, h: torch.Tensor) -> tuple[Any, int]:
        g = GraphBuilder()
        logits = g.head("h", head)
        outputs = [(logits, TensorProto.FLOAT), (g.batch_fill(logits, 0), TensorProto.INT64)]
        return self._model(g, [("h", h)], outputs), 1
