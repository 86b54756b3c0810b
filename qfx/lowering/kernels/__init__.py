"""Kernel families, one file each: Triton kernel, checking wrapper, plain-PyTorch *_ref."""
