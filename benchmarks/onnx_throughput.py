"""Batch inference images/s on this CPU: PyTorch eager against ONNX Runtime, for the same exported model.

    python benchmarks/onnx_throughput.py                          # airbench (the fast net), seed_cnn, resnet18
    python benchmarks/onnx_throughput.py --models airbench --seconds 5 --rounds 5

Both run the same computation: the ONNX model is `cifar10 export --format onnx` of the PyTorch model (uint8
NHWC in, normalisation inside), verified to match within 1e-4 first. The rounds alternate between the two, so
that a busy shared machine slows both alike; the figure is the median over rounds. PyTorch runs in eval mode
under inference_mode, fp32, in both memory formats (channels_last is its faster one on CPU); its input is
normalised beforehand, so the eager time is the model alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from cifar10_cnn import augment
from cifar10_cnn.export import onnx_bytes, verification_images, verify_onnx
from cifar10_cnn.models import count_params, create_model
from cifar10_cnn.predict import OnnxPredictor
from cifar10_cnn.weights import ModelMeta


def rate(step, seconds: float, images: int) -> float:
    """images/s of step() over about `seconds`, after one warm-up call."""
    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["airbench", "seed_cnn", "resnet18"])
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--data-dir", help="CIFAR-10 (default $CIFAR10_DATA, else ./data); random images without it"
    )
    args = ap.parse_args()

    import onnxruntime as ort

    images, what = verification_images(args.data_dir, required=False, n=args.batch_size)
    images = np.resize(images, (args.batch_size, 32, 32, 3))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads | onnxruntime {ort.__version__} | "
        f"{os.cpu_count()} CPUs | batch {args.batch_size} of {what} | median of {args.rounds} rounds of {args.seconds:g} s"
    )
    print(
        f"\n{'model':<16}{'params':>12}{'eager NCHW':>12}{'eager CL':>10}{'ONNX RT':>10}{'ORT/eager':>11}{'ORT/CL':>8}"
    )
    x = augment.normalize(torch.from_numpy(images).permute(0, 3, 1, 2)).contiguous()
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        meta = ModelMeta(architecture=name, name=name, version="bench")
        data = onnx_bytes(model, meta)
        verify_onnx(data, model, images[:64])
        session = OnnxPredictor(data, meta)
        model_cl = create_model(name).eval()
        model_cl.load_state_dict(model.state_dict())
        model_cl = model_cl.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def eager(m=model, inp=x) -> None:
            with torch.inference_mode():
                m(inp)

        def eager_cl(m=model_cl, inp=x_cl) -> None:
            with torch.inference_mode():
                m(inp)

        def onnx(s=session) -> None:
            s.session.run(None, {s.input_name: images})

        rates: dict[str, list[float]] = {"eager": [], "cl": [], "onnx": []}
        for _ in range(args.rounds):
            for key, step in (("eager", eager), ("cl", eager_cl), ("onnx", onnx)):
                rates[key].append(rate(step, args.seconds, len(images)))
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(
            f"{name:<16}{count_params(model):>12,}{med['eager']:>12.0f}{med['cl']:>10.0f}{med['onnx']:>10.0f}"
            f"{med['onnx'] / med['eager']:>10.2f}x{med['onnx'] / med['cl']:>7.2f}x",
            flush=True,
        )
    print(
        "\nimages/s; eager NCHW: contiguous memory format, eager CL: channels_last; ORT: ONNX Runtime CPU provider."
    )


if __name__ == "__main__":
    main()
