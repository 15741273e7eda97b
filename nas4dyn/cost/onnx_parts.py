"""ONNX Runtime pieces of a latency profile (``nas4dyn profile --runtime onnxruntime``).

Every table entry and every end-to-end subnet becomes an ONNX model written with the graph builder of
``nas4dyn export --format onnx`` (:mod:`nas4dyn.export.onnx_graph`), so a piece runs the ops that the exported
``model.onnx`` runs for that part:

- stem: the input normalisation and resize, then the stem;
- gater: the channel gater on the resized images;
- block: one gate state (channel gates narrow their convs with Gather, fed with the gate logits; a forced skip
  gate's ``If``; a routed block's router, a width-gated block's gate, and their branch ``If`` nodes; an EMG
  block's centre kernels and the full kernels of its forced filters);
- exit: an exit not taken — head, confidence test, and the ``If`` that runs the rest of the network on the
  samples still running, with their gather and the scatter back into place;
- classifier: the final head;
- subnets: whole ``model.onnx`` graphs (:func:`nas4dyn.export.onnx.build_onnx`), forced paths with their exit
  thresholds and gates fixed.

Inputs keep a symbolic batch dimension as in ``model.onnx``, so onnxruntime optimises a piece as it does the
exported graph. Gate kinds without an ONNX translation (DFS, MBConv channel gates) get no entries, and random
subnets are drawn among the archs that export.

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
from supernet.dynamic.choice import OneOfBlock
from supernet.subnet import SubNet

_NEVER_LEAVES = 2.0  # confidence lies in [0, 1]: no sample leaves at an exit with this threshold


# Output (element type, rank) of each kind of piece.
_FLOAT4, _FLOAT2, _INT1 = (TensorProto.FLOAT, 4), (TensorProto.FLOAT, 2), (TensorProto.INT64, 1)
_OUTPUTS = {"stem": [_FLOAT4], "gater": [_FLOAT2], "block": [_FLOAT4], "exit": [_FLOAT2, _INT1, _FLOAT4],
            "classifier": [_FLOAT2, _INT1], "call": [_FLOAT4]}


class OnnxPieces:
    """Items as ``model.onnx`` runs them: ONNX models timed in onnxruntime sessions with ``threads`` intra-op
    threads (one piece per module and input shapes; channel-gate levels share one and differ in the logits).

    ``nested``: the parts that run after an early exit (blocks, exits, classifier) are also timed inside an
    ``If``, as the exported graph runs them: onnxruntime runs a subgraph's convolutions markedly slower (a
    block 1.3-1.8x at batch 1 in one measurement), so those get entries of their own (``block_nested``...).
    ``call_item``: an empty piece, whose time (the session call's own) is taken off every entry.
    """

    runtime = "onnxruntime"
    nested = True

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

    def part(self, kind: str, module: Any, inputs: tuple[torch.Tensor, ...], nested: bool = False) -> Item:
        """The item of a table entry of ``kind`` (stem, gater, block, exit, classifier; call: ``module`` is
        ignored), inside an ``If`` when ``nested``."""
        key = (id(module), tuple(tuple(t.shape) for t in inputs), nested)
        if key not in self._pieces:  # the module is kept with its piece, so its id stays its own
            proto, used = self._piece(kind, module, inputs, nested)
            self._pieces[key] = (module, OnnxPiece(proto.SerializeToString(), self.threads), used)
        _, piece, used = self._pieces[key]
        return self._item(piece, inputs[:used])

    def call_item(self, x: torch.Tensor) -> Item:
        return self.part("call", None, (x,))

    def subnet(self, sub: SubNet, arch: Arch, x: torch.Tensor) -> Item:
        """A (static or forced) subnet as the whole ``model.onnx`` graph, taking ``x`` (identity normalisation)."""
        c = x.shape[1]
        proto = build_onnx(ExportedModel(sub.eval(), [0.0] * c, [1.0] * c, arch, c), x.shape[-1])
        return self._item(OnnxPiece(proto.SerializeToString(), self.threads), (x,))

    def _piece(self, kind: str, module: Any, inputs: tuple[torch.Tensor, ...], nested: bool) -> tuple[Any, int]:
        """(ONNX model of the piece, how many of ``inputs`` it takes)."""
        g = GraphBuilder({module: list(module(*inputs).shape[1:])} if isinstance(module, OneOfBlock) else {})
        gated = kind == "block" and block_gate(module) == "channel"
        names = ["x" if kind in ("stem", "gater", "call") else "h"] + (["gates"] if gated else [])
        types = _OUTPUTS[kind]

        def body() -> list[str]:
            return getattr(self, f"_{kind}")(g, module, inputs, *names)

        if nested:  # as the exported graph runs a part after an exit: inside an If on the samples still running
            def nothing() -> list[str]:
                return [g.const(np.zeros((1,) * rank), dtype=np.float32 if elem == TensorProto.FLOAT else np.int64)
                        for elem, rank in types]

            outs = g.if_(g.op("Greater", [g.op("Size", [names[0]]), g.ints(0)]), body, nothing, types)
        else:
            outs = body()
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", *t.shape[1:]]) for n, t in zip(names, inputs)]
        outs = [helper.make_tensor_value_info(g.output(o, f"out{i}"), elem, None)
                for i, (o, (elem, _)) in enumerate(zip(outs, types))]
        return make_model(g, ins, outs, "nas4dyn_profile_piece"), len(names)

    # ---- the graph of each kind of piece (on the graph inputs named after ``inputs``): its output names ---
    @staticmethod
    def _call(g: GraphBuilder, module: None, inputs: Any, x: str) -> list[str]:
        return [g.op("Identity", [x])]

    @staticmethod
    def _stem(g: GraphBuilder, module: ResizedStem, inputs: Any, x: str) -> list[str]:
        _, c, _, size = inputs[0].shape
        h = normalised_input(g, x, np.zeros((1, c, 1, 1), np.float32), np.ones((1, c, 1, 1), np.float32), size,
                             module.resolution)
        return [g.sequential(h, module.stem)]

    @staticmethod
    def _gater(g: GraphBuilder, gater: torch.nn.Module, inputs: Any, x: str) -> list[str]:
        return [g.gater(x, gater)]

    @staticmethod
    def _block(g: GraphBuilder, blk: torch.nn.Module, inputs: Any, h: str, gates: str | None = None) -> list[str]:
        return [g.block(h, blk, gates)]

    @staticmethod
    def _exit(g: GraphBuilder, probe: ExitProbe, inputs: Any, h: str) -> list[str]:
        logits = g.head(h, probe.head)
        here = g.batch_fill(logits, 0)
        conf = g.confidence(logits, probe.criterion, probe.head.fc.out_features)
        stay = g.rows(g.op("Less", [conf, g.const(np.float32(_NEVER_LEAVES))]))

        def later() -> list[str]:  # the rest of the network would run here, on the gathered samples
            rest = [g.op("Gather", [v, stay], axis=0) for v in (h, logits, here)]
            return [g.scatter_rows(logits, stay, rest[1]), g.scatter_rows(here, stay, rest[2]), rest[0]]

        return g.if_(g.nonempty(stay), later, lambda: [logits, here, h], _OUTPUTS["exit"])

    @staticmethod
    def _classifier(g: GraphBuilder, head: torch.nn.Module, inputs: Any, h: str) -> list[str]:
        logits = g.head(h, head)
        return [logits, g.batch_fill(logits, 0)]
