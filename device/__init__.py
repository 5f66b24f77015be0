"""edgeseg.device: the on-device agent (Python 3.8+, numpy, onnxruntime, pillow; opencv optional).

Nothing in this package may import torch, onnx, onnxsim or fabric.
"""

__version__ = "0.1.0"
