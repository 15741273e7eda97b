"""Gating-pattern analysis (`nas4dyn analyze gates`): do a dynamic CNN's gates carry class semantics?

After "Semantic Information in Gating Patterns of Dynamic CNNs": per-class gating patterns, their distances
against a class hierarchy (Spearman + Mantel test), and per-sample gate vectors as compact retrieval
descriptors next to the CNN's own features.
"""
from nas4dyn.analyze.analysis import GateAnalysis, analyze_gates
from nas4dyn.analyze.patterns import ExportedProbe, GateGroup, GateModel
from nas4dyn.analyze.report import write_report
from nas4dyn.analyze.semantics import Hierarchy, builtin_hierarchy, load_hierarchy, mantel

__all__ = ["ExportedProbe", "GateAnalysis", "GateGroup", "GateModel", "Hierarchy", "analyze_gates",
           "builtin_hierarchy", "load_hierarchy", "mantel", "write_report"]
