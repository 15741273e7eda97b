"""ONNX export: one graph per segment (blocks up to an exit, and that exit's head) and a small onnxruntime
driver that emits the samples passing each exit and runs the next segment on the rest only.

The graphs are written directly with ``onnx.helper`` from the extracted subnet's plain modules (BatchNorm
folded into the preceding conv), so the dynamic parts are explicit ONNX, not whatever a tracer keeps:

- exits: the driver compacts the batch between segment graphs (at batch 1 the later graphs do not run);
- channel gates of residual (``basic``) blocks: the active filters are found with NonZero over the batch and
  the convs' weights are indexed with Gather, so the conv runs only the filters on for some sample (exactly
  the sample's filters at batch 1); samples whose own gates are off are masked to zero, as in TorchScript;
- channel gates of MBConv blocks: ONNX ``Conv`` fixes its ``group`` count in the graph, so a depthwise conv
  cannot be narrowed at run time; these blocks compute every hidden filter and multiply by the gates (the
  same function, without the saving — TorchScript does skip them);
- skip gates: an ``If`` node runs the branch on the whole batch, on the gathered samples whose gate is on
  (scattered back into place), or on no sample.

Files: ``model.seg<i>.onnx`` per segment and ``onnx.json`` (the driver's manifest).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from nas4dyn.errors import CheckpointError, ConfigError
from nas4dyn.export.runtime import ExportedModel
from nas4dyn.io import atomic_write, atomic_write_json
from supernet.static_blocks import StaticBasicBlock, StaticBlock, StaticMBConvBlock

log = logging.getLogger(__name__)

ONNX_GATES = ("none", "channel", "skip")  # gate kinds with an ONNX translation
OPSET = 17
MANIFEST_FILE = "onnx.json"
MANIFEST_FORMAT = "nas4dyn-onnx-segments/1"
_ACT_OPS = {nn.ReLU: "Relu", nn.Hardswish: "HardSwish"}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _fold(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of ``bn(conv(x))`` as one conv (eval-mode BatchNorm folded in)."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        w = w * scale[:, None, None, None]
        b = (b - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()
    return w.float().numpy(), b.float().numpy()


class _GraphBuilder:
    """Collects nodes and initializers; ``branch()`` collects the nodes of an ``If`` subgraph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: Optional[str] = None, **attrs: Any) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def output(self, x: str, name: str) -> str:
        """Expose ``x`` under the fixed graph-output ``name``."""
        self.nodes.append(helper.make_node("Identity", [x], [name]))
        return name

    @contextlib.contextmanager
    def branch(self) -> Iterator[list[onnx.NodeProto]]:
        saved, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = saved

    # ---- layers -----------------------------------------------------------------------------------------
    def conv(self, x: str, w: str, b: str, conv: nn.Conv2d, groups: Optional[int] = None) -> str:
        p = conv.padding[0]
        return self.op("Conv", [x, w, b], strides=list(conv.stride), pads=[p, p, p, p],
                       group=conv.groups if groups is None else groups)

    def conv_bn(self, x: str, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> str:
        w, b = _fold(conv, bn)
        return self.conv(x, self.const(w, "w"), self.const(b, "b"), conv)

    def act(self, x: str, module: nn.Module) -> str:
        for kind, op_type in _ACT_OPS.items():
            if isinstance(module, kind):
                return self.op(op_type, [x])
        raise TypeError(f"no ONNX translation for activation {type(module).__name__}")

    def sequential(self, x: str, seq: nn.Sequential) -> str:
        """conv [-> BN] [-> activation] runs, as built by the supernet's stems, shortcuts, heads and gater."""
        mods = list(seq)
        i = 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, nn.Conv2d):
                bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d) else None
                x = self.conv_bn(x, m, bn)
                i += 2 if bn is not None else 1
            else:
                x = self.act(x, m)
                i += 1
        return x

    def linear(self, x: str, fc: nn.Linear) -> str:
        return self.op("Gemm", [x, self.const(_np(fc.weight), "fc_w"), self.const(_np(fc.bias), "fc_b")], transB=1)

    def pooled(self, x: str) -> str:
        return self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1)

    def head(self, x: str, head: nn.Module) -> str:
        return self.linear(self.pooled(self.sequential(x, head.features)), head.fc)

    def gater(self, x: str, gater: nn.Module) -> str:
        h = self.op("Relu", [self.linear(self.pooled(self.sequential(x, gater.features)), gater.fc1)])
        return self.linear(h, gater.fc2)

    def confidence(self, logits: str, criterion: str, num_classes: int) -> str:
        p = self.op("Softmax", [logits], axis=1)
        if criterion == "entropy":
            logp = self.op("Log", [self.op("Max", [p, self.const(1e-12)])])
            ent = self.op("ReduceSum", [self.op("Mul", [p, logp]), self.const([1], dtype=np.int64)], keepdims=0)
            # 1 - H / log(C) with H = -sum p log p
            return self.op("Add", [self.const(1.0), self.op("Div", [ent, self.const(math.log(num_classes))])])
        return self.op("ReduceMax", [p], axes=[1], keepdims=0)

    # ---- blocks -----------------------------------------------------------------------------------------
    def block(self, x: str, blk: StaticBlock, gates: Optional[str]) -> str:
        if blk.gate_kind not in ONNX_GATES:
            raise ConfigError(f"ONNX export: gate kind {blk.gate_kind!r} has no ONNX translation (supported: "
                              f"{', '.join(ONNX_GATES)}); export this arch with --format torchscript")
        if blk.gate_kind == "channel":
            assert gates is not None
            mask = self.op("Slice", [gates, self.const([blk.gate_start], dtype=np.int64),
                                     self.const([blk.gate_end], dtype=np.int64), self.const([1], dtype=np.int64)])
            maskf = self.op("Cast", [self.op("Greater", [mask, self.const(0.0)])], to=TensorProto.FLOAT)
            return self.run(x, blk, maskf)
        if blk.skip_gate is not None:
            return self.skipped(x, blk)
        return self.run(x, blk, None)

    def post(self, x: str, blk: StaticBlock) -> str:
        """What a block outputs when its branch is skipped."""
        return self.op("Relu", [x]) if isinstance(blk, StaticBasicBlock) else self.op("Identity", [x])

    def run(self, x: str, blk: StaticBlock, maskf: Optional[str]) -> str:
        if isinstance(blk, StaticBasicBlock):
            return self.basic(x, blk, maskf)
        if isinstance(blk, StaticMBConvBlock):
            return self.mbconv(x, blk, maskf)
        raise TypeError(f"no ONNX translation for block {type(blk).__name__}")

    def active_filters(self, maskf: str, n_filters: int) -> str:
        """Indices of the filters on for some sample (filter 0 when none is: it is then masked to zero)."""
        any_on = self.op("ReduceMax", [maskf], axes=[0], keepdims=0)
        none_on = self.op("Sub", [self.const(1.0), self.op("ReduceMax", [any_on], keepdims=0)])
        first = np.zeros(n_filters, dtype=np.float32)
        first[0] = 1.0
        any_on = self.op("Max", [any_on, self.op("Mul", [self.const(first), none_on])])
        keep = self.op("NonZero", [self.op("Greater", [any_on, self.const(0.0)])])
        return self.op("Reshape", [keep, self.const([-1], dtype=np.int64)], hint="keep")

    def gated_mask(self, h: str, maskf: str, keep: Optional[str]) -> str:
        m = maskf if keep is None else self.op("Gather", [maskf, keep], axis=1)
        return self.op("Mul", [h, self.op("Unsqueeze", [m, self.const([2, 3], dtype=np.int64)])])

    def basic(self, x: str, blk: StaticBasicBlock, maskf: Optional[str]) -> str:
        short = self.sequential(x, blk.shortcut)
        if maskf is None:
            h = self.op("Relu", [self.conv_bn(x, blk.conv1, blk.bn1)])
            h = self.conv_bn(h, blk.conv2, blk.bn2)
        else:
            w1, b1 = _fold(blk.conv1, blk.bn1)
            w2, b2 = _fold(blk.conv2, blk.bn2)
            keep = self.active_filters(maskf, w1.shape[0])
            w1g = self.op("Gather", [self.const(w1, "w"), keep], axis=0)
            b1g = self.op("Gather", [self.const(b1, "b"), keep], axis=0)
            h = self.gated_mask(self.op("Relu", [self.conv(x, w1g, b1g, blk.conv1)]), maskf, keep)
            w2g = self.op("Gather", [self.const(w2, "w"), keep], axis=1)
            h = self.conv(h, w2g, self.const(b2, "b"), blk.conv2)
        return self.op("Relu", [self.op("Add", [short, h])])

    def mbconv(self, x: str, blk: StaticMBConvBlock, maskf: Optional[str]) -> str:
        h = self.act(self.conv_bn(x, blk.expand, blk.bn1), blk.act)
        h = self.act(self.conv_bn(h, blk.dw, blk.bn2), blk.act)
        if maskf is not None:  # every filter computed, then masked: see the module docstring
            h = self.gated_mask(h, maskf, None)
        h = self.conv_bn(h, blk.project, blk.bn3)
        return self.op("Add", [h, x]) if blk.residual else h

    def skipped(self, x: str, blk: StaticBlock) -> str:
        """Skip gate: run the branch on all samples, on the samples whose gate is on, or on none."""
        gate = blk.skip_gate
        h = self.op("Relu", [self.linear(self.pooled(x), gate.fc1)])
        logit = self.op("Reshape", [self.linear(h, gate.fc2), self.const([-1], dtype=np.int64)])
        onf = self.op("Cast", [self.op("Greater", [logit, self.const(0.0)])], to=TensorProto.FLOAT)
        all_on = self.op("Greater", [self.op("ReduceMin", [onf], keepdims=0), self.const(0.5)])
        any_on = self.op("Greater", [self.op("ReduceMax", [onf], keepdims=0), self.const(0.5)])

        def subgraph(build: Any, label: str) -> onnx.GraphProto:
            with self.branch() as nodes:
                out = build()
            return helper.make_graph(nodes, self.name(label), [],
                                     [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None] * 4)])

        def some() -> str:
            idx = self.op("Reshape", [self.op("NonZero", [onf]), self.const([-1], dtype=np.int64)])
            ran = self.run(self.op("Gather", [x, idx], axis=0), blk, None)
            rows = self.op("Unsqueeze", [idx, self.const([1], dtype=np.int64)])
            return self.op("ScatterND", [self.post(x, blk), rows, ran])

        def some_or_none() -> str:
            out = self.name("skip_out")
            self.nodes.append(helper.make_node("If", [any_on], [out], then_branch=subgraph(some, "some"),
                                               else_branch=subgraph(lambda: self.post(x, blk), "none")))
            return out

        out = self.name("skip_out")
        self.nodes.append(helper.make_node("If", [all_on], [out],
                                           then_branch=subgraph(lambda: self.run(x, blk, None), "all"),
                                           else_branch=subgraph(some_or_none, "partial")))
        return out


def _segment_graph(model: ExportedModel, i: int, input_resolution: int) -> onnx.ModelProto:
    """The ONNX model of segment ``i`` (segment 0 also normalises, resizes, runs the gater and the stem)."""
    sub = model.subnet
    seg = sub.segments[i]
    g = _GraphBuilder()
    n_gates = sub.gater.fc2.out_features if sub.gater is not None else 0
    inputs, outputs = [], []
    if i == 0:
        c = model.channels
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, input_resolution, input_resolution]))
        x = g.op("Div", [g.op("Sub", ["x", g.const(_np(model.mean))]), g.const(_np(model.std))])
        if input_resolution != sub.resolution:
            batch_chan = g.op("Slice", [g.op("Shape", [x]), g.const([0], dtype=np.int64), g.const([2], dtype=np.int64)])
            sizes = g.op("Concat", [batch_chan, g.const([sub.resolution] * 2, dtype=np.int64)], axis=0)
            x = g.op("Resize", [x, "", "", sizes], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")
        gates: Optional[str] = None
        if n_gates:
            gates = g.output(g.gater(x, sub.gater), "gates")
            outputs.append(helper.make_tensor_value_info(gates, TensorProto.FLOAT, ["N", n_gates]))
        h = g.sequential(x, sub.stem)
    else:
        h = "h"
        inputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", None, None, None]))
        gates = None
        if n_gates:
            gates = "gates"
            inputs.append(helper.make_tensor_value_info("gates", TensorProto.FLOAT, ["N", n_gates]))
    for blk in seg.blocks:
        h = g.block(h, blk, gates)
    logits = g.output(g.head(h, seg.head), "logits")
    outputs.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", sub.num_classes]))
    if not seg.final:
        conf = g.output(g.confidence(logits, sub.criterion, sub.num_classes), "conf")
        h_out = g.output(h, "h_out")
        outputs += [helper.make_tensor_value_info(conf, TensorProto.FLOAT, ["N"]),
                    helper.make_tensor_value_info(h_out, TensorProto.FLOAT, ["N", None, None, None])]
    graph = helper.make_graph(g.nodes, f"nas4dyn_segment{i}", inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nas4dyn")
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: ExportedModel, out_dir: str | Path, input_resolution: Optional[int] = None) -> list[Path]:
    """Write ``model.seg<i>.onnx`` for every segment and the driver's ``onnx.json`` into ``out_dir``.

    ``input_resolution`` is the side of the images the graphs take (default: the arch's resolution); other
    sizes are resized to the arch's resolution inside the first graph. Every graph passes ``onnx.checker``.
    """
    out_dir = Path(out_dir)
    res = int(input_resolution or model.resolution)
    sub = model.subnet
    files = []
    for i in range(len(sub.segments)):
        proto = _segment_graph(model, i, res)
        path = out_dir / f"model.seg{i}.onnx"
        atomic_write(path, lambda f, p=proto: f.write(p.SerializeToString()))
        files.append(path)
    manifest = {
        "format": MANIFEST_FORMAT,
        "segments": [p.name for p in files],
        "thresholds": list(model.thresholds),
        "exit_names": list(model.exit_names),
        "criterion": sub.criterion,
        "has_gates": sub.gater is not None,
        "channels": model.channels,
        "input_resolution": res,
        "num_classes": sub.num_classes,
        "opset": OPSET,
    }
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    log.info("wrote %d ONNX segment graphs to %s", len(files), out_dir)
    return files + [out_dir / MANIFEST_FILE]


class OnnxDynamicModel:
    """onnxruntime driver of the segment graphs: runs segment 0 on the batch, emits the samples that pass each
    exit's threshold and runs the next segment on the rest only. Batch order is preserved."""

    def __init__(self, export_dir: str | Path, threads: Optional[int] = None):
        import onnxruntime as ort

        export_dir = Path(export_dir)
        path = export_dir / MANIFEST_FILE
        if not path.is_file():
            raise CheckpointError(f"{export_dir}: no {MANIFEST_FILE} here; export with `--format onnx`")
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc}); export again") from None
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{path}: not a nas4dyn ONNX manifest (expected format {MANIFEST_FORMAT})")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.sessions = [ort.InferenceSession(str(export_dir / name), opts, providers=["CPUExecutionProvider"])
                         for name in self.manifest["segments"]]
        self.thresholds: list[float] = [float(t) for t in self.manifest["thresholds"]]
        self.has_gates: bool = bool(self.manifest["has_gates"])
        self.num_classes: int = int(self.manifest["num_classes"])

    def forward_with_exits(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits N x classes, exit index per sample) for float images N x C x H x W in [0, 1]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        c, res = self.manifest["channels"], self.manifest["input_resolution"]
        if x.ndim != 4 or x.shape[1:] != (c, res, res):
            raise ValueError(f"the ONNX graphs take images N x {c} x {res} x {res} in [0, 1], got shape {list(x.shape)}; "
                             "resize them, or export with data of this size")
        n = x.shape[0]
        logits_out = np.zeros((n, self.num_classes), dtype=np.float32)
        exit_index = np.full(n, -1, dtype=np.int64)
        idx = np.arange(n)
        feeds: dict[str, np.ndarray] = {"x": x}
        gates: Optional[np.ndarray] = None
        for i, sess in enumerate(self.sessions):
            outs = dict(zip((o.name for o in sess.get_outputs()), sess.run(None, feeds)))
            if i == 0 and self.has_gates:
                gates = outs["gates"]
            logits = outs["logits"]
            if i == len(self.sessions) - 1:
                logits_out[idx] = logits
                exit_index[idx] = i
                break
            conf, h = outs["conf"], outs["h_out"]
            done = conf >= np.float32(self.thresholds[i])
            logits_out[idx[done]] = logits[done]
            exit_index[idx[done]] = i
            stay = ~done
            if not stay.any():
                break
            idx = idx[stay]
            feeds = {"h": np.ascontiguousarray(h[stay])}
            if gates is not None:
                gates = np.ascontiguousarray(gates[stay])
                feeds["gates"] = gates
        return logits_out, exit_index

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward_with_exits(x)[0]
