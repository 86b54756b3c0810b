"""Lowering of qfx graphs: the torch.compile backend and its kernels."""
