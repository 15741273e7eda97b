"""ONNX export: one ``model.onnx`` that onnxruntime runs alone, exits and gates as ONNX control flow.

The graph takes float images N x C x H x W in [0, 1] (``x``), normalises and resizes them, and returns
``logits`` (N x classes, each sample's from the exit it left at) and ``exit_index`` (N, int64; the number of
early exits means the final classifier). After each early exit the samples not yet confident are gathered
and the rest of the network runs inside an ``If`` on them only (at batch 1 it does not run once the sample
has left), their results scattered back into place. Gates and routes: :mod:`nas4dyn.export.onnx_graph`.

Files: ``model.onnx`` and ``onnx.json`` (thresholds, exit names, input layout; read by
:class:`OnnxDynamicModel`, not needed to run the graph).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from nas4dyn.errors import CheckpointError, ConfigError
from nas4dyn.export.onnx_graph import ONNX_GATES, GraphBuilder, onnx_refusal
from nas4dyn.export.runtime import ExportedModel
from nas4dyn.io import atomic_write, atomic_write_json
from search_spaces.arch import Arch
from search_spaces.space import SearchSpace
from supernet.dynamic.choice import OneOfBlock

log = logging.getLogger(__name__)

__all__ = ["ONNX_GATES", "MODEL_FILE", "MANIFEST_FILE", "check_onnx_exportable", "export_onnx", "OnnxDynamicModel"]

OPSET = 17
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "onnx.json"
MANIFEST_FORMAT = "nas4dyn-onnx/2"


def check_onnx_exportable(space: SearchSpace, arch: Arch) -> None:
    """Raises:
        ConfigError: a block of ``arch`` has a gate the ONNX graph cannot carry (one line naming it and the fix).
    """
    for c in arch.blocks():
        refusal = onnx_refusal(c.gate, space.stages[c.stage].block)
        if refusal:
            raise ConfigError(f"--format onnx: block {c.stage}.{c.block}: {refusal}; export this arch with "
                              "--format torchscript (model.ts carries every gate kind)")


@torch.no_grad()
def _one_of_shapes(model: ExportedModel) -> dict[torch.nn.Module, list[int]]:
    """C x H x W of every routed or width-gated block's output, read off a forward pass at the arch's resolution."""
    shapes: dict[torch.nn.Module, list[int]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, list(o.shape[1:])))
             for m in model.subnet.modules() if isinstance(m, OneOfBlock)]
    try:
        if hooks:
            model.subnet.forward_all(torch.zeros(1, model.channels, model.resolution, model.resolution))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _levels(g: GraphBuilder, model: ExportedModel, i: int, h: str, gates: Optional[str]) -> list[str]:
    """(logits, exit index) of the samples in ``h`` from segment ``i`` on: each runs up to the first exit it
    passes; the later segments run, inside an ``If``, on the samples still running only."""
    sub = model.subnet
    seg = sub.segments[i]
    for blk in seg.blocks:
        h = g.block(h, blk, gates)
    logits = g.head(h, seg.head)
    here = g.batch_fill(logits, i)
    if seg.final:
        return [logits, here]
    conf = g.confidence(logits, sub.criterion, sub.num_classes)
    stay = g.rows(g.op("Less", [conf, g.const(np.float32(seg.threshold))]))

    def later() -> list[str]:
        rest_gates = None if gates is None else g.op("Gather", [gates, stay], axis=0)
        rest = _levels(g, model, i + 1, g.op("Gather", [h, stay], axis=0), rest_gates)
        return [g.scatter_rows(logits, stay, rest[0]), g.scatter_rows(here, stay, rest[1])]

    return g.if_(g.nonempty(stay), later, lambda: [logits, here], [(TensorProto.FLOAT, 2), (TensorProto.INT64, 1)])


def build_onnx(model: ExportedModel, input_resolution: Optional[int] = None) -> onnx.ModelProto:
    """The whole dynamic model as one ONNX graph (passes ``onnx.checker`` with ``full_check``).

    Raises:
        ConfigError: a gate the graph cannot carry.
    """
    sub = model.subnet
    res = int(input_resolution or model.resolution)
    g = GraphBuilder(_one_of_shapes(model))
    c = model.channels
    x = normalised_input(g, "x", model.mean.numpy(), model.std.numpy(), res, sub.resolution)
    gates = g.gater(x, sub.gater) if sub.gater is not None else None
    logits, exit_index = _levels(g, model, 0, g.sequential(x, sub.stem), gates)
    outputs = [helper.make_tensor_value_info(g.output(logits, "logits"), TensorProto.FLOAT, ["N", sub.num_classes]),
               helper.make_tensor_value_info(g.output(exit_index, "exit_index"), TensorProto.INT64, ["N"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, res, res])]
    proto = make_model(g, inputs, outputs, "nas4dyn_dynamic_subnet")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def normalised_input(g: GraphBuilder, x: str, mean: np.ndarray, std: np.ndarray, input_resolution: int,
                     resolution: int) -> str:
    """The graph's images ``x`` (side ``input_resolution``) normalised and resized to the arch's ``resolution``."""
    x = g.op("Div", [g.op("Sub", [x, g.const(mean)]), g.const(std)])
    if input_resolution != resolution:
        batch_chan = g.op("Slice", [g.op("Shape", [x]), g.ints([0]), g.ints([2])])
        sizes = g.op("Concat", [batch_chan, g.ints([resolution] * 2)], axis=0)
        x = g.op("Resize", [x, "", "", sizes], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")
    return x


def make_model(g: GraphBuilder, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
               name: str) -> onnx.ModelProto:
    """The model of ``g``'s nodes and initializers (the opset and IR version every nas4dyn graph uses)."""
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nas4dyn")
    proto.ir_version = 8
    return proto


def export_onnx(model: ExportedModel, out_dir: str | Path, input_resolution: Optional[int] = None) -> list[Path]:
    """Write ``model.onnx`` and its ``onnx.json`` description into ``out_dir``; returns both paths.

    ``input_resolution`` is the side of the images the graph takes (default: the arch's resolution); other
    sizes are resized to the arch's resolution inside the graph.

    Raises:
        ConfigError: a gate the graph cannot carry.
    """
    out_dir = Path(out_dir)
    res = int(input_resolution or model.resolution)
    proto = build_onnx(model, res)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / MODEL_FILE, lambda f: f.write(proto.SerializeToString()))
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": MODEL_FILE,
        "inputs": {"x": f"float32 N x {model.channels} x {res} x {res}, values in [0, 1]"},
        "outputs": {"logits": f"float32 N x {model.subnet.num_classes}",
                    "exit_index": f"int64 N; {len(model.thresholds)} = the final classifier"},
        "thresholds": list(model.thresholds),
        "exit_names": list(model.exit_names),
        "channels": model.channels,
        "input_resolution": res,
        "num_classes": model.subnet.num_classes,
        "opset": OPSET,
    }
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    log.info("wrote %s (one graph, exits and gates as ONNX control flow) to %s", MODEL_FILE, out_dir)
    return [out_dir / MODEL_FILE, out_dir / MANIFEST_FILE]


def _inside(export_dir: Path, name: object) -> Path:
    """``export_dir / name`` for a plain file name of the manifest; anything reaching outside is refused.

    Raises:
        CheckpointError: ``name`` is not a string, is absolute, or leaves ``export_dir``.
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute() or Path(name).name != name:
        raise CheckpointError(f"{export_dir / MANIFEST_FILE}: model path {name!r} must be a file name inside the "
                              "export folder; export again")
    path = export_dir / name
    if not path.resolve().is_relative_to(export_dir.resolve()):
        raise CheckpointError(f"{export_dir / MANIFEST_FILE}: model path {name!r} leaves the export folder; export again")
    return path


class OnnxDynamicModel:
    """Runs an export folder's ``model.onnx`` with onnxruntime (what a deployment needs is only the graph:
    ``ort.InferenceSession("model.onnx").run(None, {"x": images})``; this adds the input check)."""

    def __init__(self, export_dir: str | Path, threads: Optional[int] = None):
        """Raises:
            CheckpointError: no or a damaged ``onnx.json``, or a model path in it leaving the folder.
        """
        import onnxruntime as ort

        export_dir = Path(export_dir)
        path = export_dir / MANIFEST_FILE
        if not path.is_file():
            raise CheckpointError(f"{export_dir}: no {MANIFEST_FILE} here; export with `--format onnx`")
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc}); export again") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{path}: not a nas4dyn ONNX manifest (expected format {MANIFEST_FORMAT}); export again")
        model_path = _inside(export_dir, self.manifest.get("model"))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.thresholds: list[float] = [float(t) for t in self.manifest["thresholds"]]
        self.num_classes: int = int(self.manifest["num_classes"])

    def forward_with_exits(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits N x classes, exit index per sample) for float images N x C x H x W in [0, 1]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        c, res = self.manifest["channels"], self.manifest["input_resolution"]
        if x.ndim != 4 or x.shape[1:] != (c, res, res):
            raise ValueError(f"the ONNX graph takes images N x {c} x {res} x {res} in [0, 1], got shape {list(x.shape)}; "
                             "resize them, or export with data of this size")
        logits, exit_index = self.session.run(["logits", "exit_index"], {"x": x})
        return logits, exit_index

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward_with_exits(x)[0]
