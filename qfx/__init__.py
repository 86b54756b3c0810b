"""qfx: post-training quantization of causal language models as torch.fx graph passes."""

from importlib.metadata import PackageNotFoundError, version as _version

from qfx import ops as _ops  # noqa: F401  (registers the qfx:: custom ops)
from qfx.learn_rotations import learn_rotations
from qfx.api import QuantizeError, convert, needs_calibration, prepare, quantize
from qfx.calibrate import calibrate
from qfx.capture import CaptureError, capture
from qfx.graph import decoder_blocks
from qfx.config import ConfigError, LayerRule, QuantSpec, Recipe
from qfx.generate import GenerationError, GenerationOutput, Generator, generate
from qfx.generation_graph import generation_graph
from qfx.io import CheckpointError, export, load, load_exported, save
from qfx.stream import quantize_streaming
from qfx.tasks import evaluate
from qfx.lowering import backend as _backend  # noqa: F401  (registers torch.compile backend "qfx")

try:
    __version__ = _version("qfx")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "unknown"

__all__ = [
    "CaptureError",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "GenerationOutput",
    "Generator",
    "LayerRule",
    "QuantSpec",
    "QuantizeError",
    "Recipe",
    "calibrate",
    "capture",
    "convert",
    "decoder_blocks",
    "evaluate",
    "export",
    "generate",
    "generation_graph",
    "load",
    "learn_rotations",
    "load_exported",
    "needs_calibration",
    "prepare",
    "quantize",
    "quantize_streaming",
    "save",
]
