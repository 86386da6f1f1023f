"""A small ResNet for Fashion-MNIST (28x28 grayscale, 10 classes).

Layout (channel widths 32 / 64 / 128, every count a multiple of 4 so the
convolutions are 2:4-sparsifiable along the input-channel axis):

    stem    conv3x3(1 -> 32) + BN + ReLU                       28x28
    stage1  BasicBlock(32 -> 32)                               28x28
    stage2  BasicBlock(32 -> 64, stride 2, 1x1 conv+BN proj)   14x14
    stage3  BasicBlock(64 -> 128, stride 2, 1x1 conv+BN proj)   7x7
    head    global average pool -> flatten -> Linear(128 -> 10)

BasicBlock = conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.
Convolutions followed by BatchNorm have no bias.
"""

from torch import nn

# Normalization applied to images scaled to [0, 1] (Fashion-MNIST training-set
# pixel mean and standard deviation).
MEAN = 0.2860
STD = 0.3530

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

WIDTHS = (32, 64, 128)


def conv3x3(in_ch, out_ch, stride=1):
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class FashionResNet(nn.Module):
    def __init__(self, widths=WIDTHS, num_classes=len(CLASSES)):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(conv3x3(1, w1), nn.BatchNorm2d(w1), nn.ReLU(inplace=True))
        self.stage1 = BasicBlock(w1, w1)
        self.stage2 = BasicBlock(w1, w2, stride=2)
        self.stage3 = BasicBlock(w2, w3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        return self.fc(self.flatten(self.pool(x)))


def build() -> nn.Module:
    """Return a randomly initialised model in eval mode (load weights into it)."""
    return FashionResNet().eval()
