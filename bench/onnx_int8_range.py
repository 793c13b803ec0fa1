"""Why ``regproxy export --quantize int8`` writes 7-bit weights: one ViT-S MLP block (384 -> 1536 -> GELU -> 384,
197 tokens, random weights, inputs of std 2) exported to ONNX, quantized by onnxruntime's ``quantize_static``
(QDQ, per-channel, 4 calibration batches) with 8-bit weights, with 7-bit weights (``reduce_range``) and with uint8
activations, and run on this CPU: the largest error against the float block, over the block's largest output.

    python -m bench.onnx_int8_range

On CPUs without VNNI onnxruntime sums u8 x s8 pairs in int16, which saturates with 8-bit weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .common import machine


def main() -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384)).eval()
    x = torch.randn(1, 197, 384) * 2
    with torch.no_grad():
        want = block(x).numpy()

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": (torch.randn(1, 197, 384) * 2).numpy()} for _ in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    settings = {"8-bit weights (s8 x s8)": {}, "7-bit weights (reduce_range)": {"reduce_range": True},
                "uint8 activations (u8 x s8)": {"activation_type": QuantType.QUInt8}}
    errors = {}
    with tempfile.TemporaryDirectory() as folder:
        fp32, int8 = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        torch.onnx.export(block, x, str(fp32), input_names=["x"], output_names=["y"], dynamo=False)
        for name, options in settings.items():
            quantize_static(str(fp32), str(int8), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                            **options)
            session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
            got = session.run(None, {"x": x.numpy()})[0]
            errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
    print(json.dumps({"machine": machine(), "onnxruntime": ort.__version__, "max_error_over_max_output": errors},
                     indent=2))


if __name__ == "__main__":
    main()
