"""Where precision goes: fidelity against the fake-quant model, the per-layer precision map, accuracy,
report comparison and layer-by-layer debugging."""
