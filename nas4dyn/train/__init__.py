"""Supernet training: schedule, sandwich steps, distillation, budget loss, BN recalibration, checkpoints."""
