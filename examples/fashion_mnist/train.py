"""Train the example Fashion-MNIST ResNet and write the shipped artifacts.

    python examples/fashion_mnist/train.py [--epochs 9] [--seed 0] [--threads 2]

Writes into this folder: model.pt2, weights.safetensors, calib.npy, eval.npz.
Deterministic for a given seed and thread count (CPU).
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
import model as model_lib  # noqa: E402

BATCH = 128
PAD = 2
N_CALIB = 256
N_EVAL = 2000


def augment(images, rng):
    """Random crop (zero padding 2) and horizontal flip on a uint8 batch [B,28,28]."""
    b, h, w = images.shape
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))
    dy = rng.integers(0, 2 * PAD + 1, size=b)
    dx = rng.integers(0, 2 * PAD + 1, size=b)
    flip = rng.random(b) < 0.5
    out = np.empty_like(images)
    for i in range(b):
        crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def to_tensor(images_uint8):
    return torch.from_numpy(data.normalize(images_uint8)).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def accuracy(net, images, labels, batch=500):
    net.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = net(to_tensor(images[i:i + batch]))
        correct += (logits.argmax(1).numpy() == labels[i:i + batch]).sum()
    return correct / len(images)


def stratified_calib(images, labels, n, rng):
    """n images taken round-robin over the classes, each class in a random order."""
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(10)]
    idx = [per_class[k % 10][k // 10] for k in range(n)]
    return np.array(idx)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate (one-cycle)")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    train_x, train_y = data.load("train")
    test_x, test_y = data.load("test")

    net = model_lib.build().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"FashionResNet widths={model_lib.WIDTHS} params={n_params:,}", flush=True)

    steps_per_epoch = math.ceil(len(train_x) / BATCH)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )

    t_start = time.time()
    for epoch in range(1, args.epochs + 1):
        net.train()
        t0 = time.time()
        order = rng.permutation(len(train_x))
        loss_sum, correct = 0.0, 0
        for s in range(steps_per_epoch):
            idx = order[s * BATCH:(s + 1) * BATCH]
            x = to_tensor(augment(train_x[idx], rng))
            y = torch.from_numpy(train_y[idx])
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        train_time = time.time() - t0
        test_acc = accuracy(net, test_x, test_y)
        print(
            f"epoch {epoch}/{args.epochs}  loss {loss_sum / len(train_x):.4f}  "
            f"train acc {correct / len(train_x):.4f}  test acc {test_acc:.4f}  "
            f"epoch {train_time:.0f}s  total {time.time() - t_start:.0f}s",
            flush=True,
        )
    train_seconds = time.time() - t_start

    # Back to the default memory format so saved tensors are plain contiguous.
    net = net.to(memory_format=torch.contiguous_format).eval()
    test_acc = accuracy(net, test_x, test_y)
    eval_acc = accuracy(net, test_x[:N_EVAL], test_y[:N_EVAL])
    print(f"training time {train_seconds:.0f}s ({train_seconds / 60:.1f} min)")
    print(f"dense test accuracy (10000 images): {test_acc:.4f}")
    print(f"dense accuracy on eval.npz (first {N_EVAL} test images): {eval_acc:.4f}")

    os.makedirs(args.out, exist_ok=True)
    paths = {}

    # 1. torch.export program with a dynamic batch dimension.
    example = torch.randn(8, 1, 28, 28)
    ep = torch.export.export(
        net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},)
    )
    paths["model.pt2"] = os.path.join(args.out, "model.pt2")
    torch.export.save(ep, paths["model.pt2"])
    loaded = torch.export.load(paths["model.pt2"]).module()
    with torch.no_grad():
        for n in (1, 8, 37):
            x = torch.from_numpy(data.normalize(test_x[:n]))
            ref, got = net(x), loaded(x)
            if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"exported model mismatch at batch {n}: {(ref - got).abs().max()}")
    print("model.pt2 reloaded and matches the eager model (batch 1, 8, 37)")

    # 2. State dict as safetensors (for --model-factory ... --weights).
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    paths["weights.safetensors"] = os.path.join(args.out, "weights.safetensors")
    save_file(state, paths["weights.safetensors"])
    check = model_lib.build()
    check.load_state_dict(load_file(paths["weights.safetensors"]))
    with torch.no_grad():
        x = torch.from_numpy(data.normalize(test_x[:16]))
        assert torch.allclose(check(x), net(x), atol=1e-5)

    # 3. Calibration inputs: 256 normalized training images, stratified by class.
    calib_idx = stratified_calib(train_x, train_y, N_CALIB, np.random.default_rng(args.seed + 1))
    paths["calib.npy"] = os.path.join(args.out, "calib.npy")
    np.save(paths["calib.npy"], data.normalize(train_x[calib_idx]))

    # 4. Offline evaluation set: first 2000 test images (uint8) and labels.
    paths["eval.npz"] = os.path.join(args.out, "eval.npz")
    np.savez_compressed(paths["eval.npz"], images=test_x[:N_EVAL], labels=test_y[:N_EVAL])

    for name, p in paths.items():
        print(f"wrote {p}  ({os.path.getsize(p) / 1024:.1f} KiB)")
    if os.path.getsize(paths["model.pt2"]) > 2 * 1024 * 1024:
        print("WARNING: model.pt2 is larger than 2 MB")


if __name__ == "__main__":
    main()
