"""Top-1 accuracy of a Fashion-MNIST model on eval.npz (2000 test images).

    python examples/fashion_mnist/evaluate.py MODEL   # MODEL is a .pt2 or .onnx file
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402


def pt2_predictor(path):
    import torch

    module = torch.export.load(path).module()

    def predict(x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return predict


def onnx_predictor(path):
    try:
        import onnxruntime as ort
    except ImportError:
        sys.exit("evaluating .onnx files needs onnxruntime (pip install onnxruntime)")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def predict(x):
        return session.run(None, {input_name: x})[0]

    return predict


def main():
    ap = argparse.ArgumentParser(description="Top-1 accuracy on examples/fashion_mnist/eval.npz")
    ap.add_argument("model", help="a .pt2 (torch.export) or .onnx file")
    ap.add_argument("--eval-data", default=os.path.join(HERE, "eval.npz"))
    ap.add_argument("--batch", type=int, default=250)
    args = ap.parse_args()

    if args.model.endswith(".pt2"):
        predict = pt2_predictor(args.model)
    elif args.model.endswith(".onnx"):
        predict = onnx_predictor(args.model)
    else:
        sys.exit(f"unsupported model file {args.model!r}: expected .pt2 or .onnx")

    ev = np.load(args.eval_data)
    images, labels = ev["images"], ev["labels"]
    correct = 0
    for i in range(0, len(images), args.batch):
        logits = predict(data.normalize(images[i:i + args.batch]))
        correct += int((np.argmax(logits, axis=1) == labels[i:i + args.batch]).sum())
    print(f"top-1 accuracy: {correct / len(images):.4f} ({correct}/{len(images)}) on {args.eval_data}")


if __name__ == "__main__":
    main()
