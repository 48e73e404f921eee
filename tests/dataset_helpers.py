"""Helpers of the dataset tests (kept outside test_*.py so subprocesses can import the model)."""
import os
import time

import numpy as np
import torch
import torch.nn as nn

from masked_ops.models import ModelInfo

INPUT = 64


class _Tiny(nn.Module):
    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.delay = delay

    def forward(self, x):
        delay = float(os.environ.get("MASKED_OPS_TEST_DELAY", "0"))  # slows the plain model down (kill tests)
        if delay:
            time.sleep(delay)
        return self.body(x)


def tiny_model():
    """A small random CNN with 10 classes at 64 x 64 (``--model dataset_helpers:tiny_model``)."""
    torch.manual_seed(0)
    model = _Tiny().eval()
    with torch.no_grad():  # a random head predicts one class for every image; spread its outputs
        model.body[-1].weight.mul_(40.0)
        model.body[-1].bias.zero_()
    return model, ModelInfo("tiny", input_size=INPUT, class_names=[f"c{i}" for i in range(10)],
                                     pretrained=False)


def _photos():
    import skimage.data
    import sklearn.datasets

    out = {name: getattr(skimage.data, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")}
    for name, img in zip(("china", "flower"), sklearn.datasets.load_sample_images().images):
        out[name] = img
    return out


def make_folder(root, size: int = 80, classes=("1", "5")) -> list:
    """Bundled photos + flipped / cropped copies in two class folders, one corrupt file (in the second).

    The class folders name classes of tiny_model, which predicts 1 or 5 on these photos.

    Returns the relative paths of the readable images. Images are shrunk to ``size`` px (short side)
    so that the tests stay fast.
    """
    from PIL import Image

    paths = []
    for k, (name, img) in enumerate(sorted(_photos().items())):
        cls = classes[k % 2]
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        im = Image.fromarray(np.ascontiguousarray(img[:, :, :3]))
        im = im.resize((max(size, round(size * im.width / im.height)), size), Image.BILINEAR)
        views = {name: im, f"{name}-flip": im.transpose(Image.FLIP_LEFT_RIGHT),
                 f"{name}-crop": im.crop((0, 0, im.width * 3 // 4, im.height * 3 // 4))}
        for i, (vname, v) in enumerate(views.items()):
            ext = ".png" if i % 2 == 0 else ".jpg"
            v.save(os.path.join(root, cls, vname + ext))
            paths.append(f"{cls}/{vname}{ext}")
    with open(os.path.join(root, classes[1], "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(os.path.join(root, classes[0], "notes.txt"), "w") as f:  # not an image: ignored
        f.write("ignored")
    return sorted(paths)
