"""Per-layer quantization algorithms as pure tensor math (no FX, no modules)."""
