"""Export of a chosen subnet as a standalone dynamic model that really skips work (TorchScript, ONNX), its
card, and the measurements behind it."""
from nas4dyn.export.onnx import OnnxDynamicModel, export_onnx
from nas4dyn.export.runtime import ExportedModel, export_subnet
from nas4dyn.export.torchscript import load_exported

__all__ = ["ExportedModel", "OnnxDynamicModel", "export_onnx", "export_subnet", "load_exported"]
