"""Image folders (``DIR/train/<class>/*``, ``DIR/val/<class>/*``): scanning, checking, transforms.

The layout is torchvision's ``ImageFolder``: one folder per class, classes sorted by name,
images anywhere below a class folder (files with the extensions in :data:`IMAGE_EXTENSIONS`;
other and hidden files are ignored).  :func:`load_imagefolder` lists the splits and decodes
every image once before training, so that a corrupt file stops the run at the start (or, with
``skip_bad``, is left out and counted).

Augmentations: written here over Pillow in a few lines, no library.  torchvision is not an
option (its index wheels are CUDA builds; next to the CPU torch ``import torchvision`` fails),
albumentations pulls in OpenCV, and kornia works on batched tensors of one size, so it would
crop an already-resized image and draw from torch's global generator, which breaks
resume-equals-uninterrupted.  Here each sample's crop and flip come from its own
``random.Random`` seeded by (key, index) (:class:`ImageFolderDataset`), so the same epoch gives
the same crops in any number of processes and loader workers.

* training (:func:`random_resized_crop`): torchvision's RandomResizedCrop (area 8-100 % of the
  image, aspect ratio 3/4-4/3, 10 tries, else the largest centre crop within the ratios),
  bilinear, to the config's input size; then a horizontal flip with probability 0.5;
* evaluation (:func:`centre_crop`): resize so the image covers 1/0.875 (~1.14) times the input
  size, keeping its aspect ratio, then the central crop (torchvision's Resize(256) +
  CenterCrop(224) at 224);
* normalisation with the ImageNet mean and std, by :func:`normalise` on the device, so loader
  workers ship uint8 tensors (a quarter of the bytes).
"""

from __future__ import annotations

import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dynas.errors import ConfigError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MEAN",
    "STD",
    "ImageFolder",
    "scan_imagefolder",
    "check_images",
    "scan_splits",
    "check_splits",
    "load_imagefolder",
    "drop_bad",
    "random_resized_crop",
    "centre_crop",
    "pil_to_uint8",
    "normalise",
    "ImageFolderDataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: evaluation resize: the image covers this many times the input size before the centre crop
EVAL_RESIZE = 1 / 0.875
_LAYOUT = "DIR/train/<class>/*.jpg|png and DIR/val/<class>/*"


@dataclass
class ImageFolder:
    """One split: sorted class names and ``(path, label)`` samples sorted by path."""

    root: str
    split: str
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)  # bad images left out by load_imagefolder(skip_bad=True)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_imagefolder(root: str, split: str) -> ImageFolder:
    """List ``root/split``: class folders and their images; :class:`ConfigError` when the folder
    is missing, has no class folder, or holds no image at all."""
    where = os.path.join(root, split)
    if not os.path.isdir(where):
        raise ConfigError(f"data={root!r} has no {split}/ folder; allowed: the layout {_LAYOUT}")
    classes = sorted(e.name for e in os.scandir(where) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(f"data={root!r}: {split}/ has no class folder; allowed: the layout {_LAYOUT}")
    samples = []
    for label, name in enumerate(classes):
        for folder, dirs, files in os.walk(os.path.join(where, name), followlinks=True):
            dirs.sort()
            samples.extend((os.path.join(folder, f), label) for f in sorted(files) if _is_image(f))
    if not samples:
        raise ConfigError(
            f"data={root!r}: split {split}/ has no images (extensions {', '.join(IMAGE_EXTENSIONS)}); "
            f"allowed: the layout {_LAYOUT}"
        )
    return ImageFolder(root, split, classes, samples)


def _decode_error(path: str) -> str | None:
    """None if ``path`` decodes as an image, else why not (one line)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (64, 64))  # decode at 1/8 scale: the whole stream is read, 8x less work
            im.load()
        return None
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return " ".join(f"{type(exc).__name__}: {exc}".split())


def check_images(folder: ImageFolder, threads: int = 1, shard: tuple[int, int] = (0, 1)) -> list[tuple[str, str]]:
    """Decode the images of shard ``(rank, world)`` (every world-th sample from ``rank``);
    return ``(path, why)`` for each that fails."""
    rank, world = shard
    paths = [p for p, _ in folder.samples[rank::world]]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # Pillow decodes without the GIL
        errors = list(pool.map(_decode_error, paths, chunksize=64))
    return [(p, e) for p, e in zip(paths, errors) if e is not None]


def scan_splits(root: str, splits: Sequence[str] = ("train", "val")) -> dict[str, ImageFolder]:
    """List the ``splits`` of ``root`` (no image is opened).  One-line :class:`ConfigError` when
    ``root`` is missing, not a folder or empty; a split is missing or has no images; train and
    val have different class lists; there are fewer than 2 classes."""
    if not os.path.exists(root):
        raise ConfigError(f"data={root!r} does not exist; allowed: a folder with the layout {_LAYOUT}")
    if not os.path.isdir(root):
        raise ConfigError(f"data={root!r} is not a folder; allowed: a folder with the layout {_LAYOUT}")
    if not any(True for _ in os.scandir(root)):
        raise ConfigError(f"data={root!r} is an empty folder; allowed: the layout {_LAYOUT}")
    folders = {s: scan_imagefolder(root, s) for s in splits}
    if "train" in folders and "val" in folders and folders["train"].classes != folders["val"].classes:
        a, b = set(folders["train"].classes), set(folders["val"].classes)
        raise ConfigError(
            f"data={root!r}: train/ and val/ have different class folders (only in train: "
            f"{sorted(a - b)[:3]}, only in val: {sorted(b - a)[:3]}); allowed: the same class folders in both"
        )
    if len(next(iter(folders.values())).classes) < 2:
        raise ConfigError(f"data={root!r} has 1 class folder; allowed: at least 2")
    return folders


def check_splits(
    folders: dict[str, ImageFolder],
    *,
    skip_bad: bool = False,
    threads: int = 1,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[Any], list[Any]] = lambda x: [x],
) -> dict[str, ImageFolder]:
    """Decode every image of ``folders``; raise naming the first that fails, or with ``skip_bad``
    return the folders without them.  In a distributed run each process checks its ``shard``
    and ``gather`` (an all-gather of Python objects) combines the failures, so every process
    raises the same error or drops the same files."""
    out = {}
    for split, folder in folders.items():
        bad = sorted(b for part in gather(check_images(folder, threads, shard)) for b in part)
        if bad and not skip_bad:
            path, why = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ConfigError(
                f"data: image {path!r}{more} cannot be read ({why}); allowed: readable images, "
                "or --skip-bad-images to leave such files out"
            )
        out[split] = drop_bad(folder, [p for p, _ in bad]) if bad else folder
    return out


def load_imagefolder(
    root: str, splits: Sequence[str] = ("train", "val"), *, skip_bad: bool = False, threads: int = 1
) -> dict[str, ImageFolder]:
    """:func:`scan_splits` then :func:`check_splits`, in one process."""
    return check_splits(scan_splits(root, splits), skip_bad=skip_bad, threads=threads)


def drop_bad(folder: ImageFolder, bad: Sequence[str]) -> ImageFolder:
    """``folder`` without the ``bad`` paths (recorded in ``skipped``); a split left with no image raises."""
    gone = set(bad)
    kept = [s for s in folder.samples if s[0] not in gone]
    if not kept:
        raise ConfigError(f"data={folder.root!r}: split {folder.split}/ has no readable image; allowed: at least one")
    return ImageFolder(folder.root, folder.split, folder.classes, kept, sorted(gone))


# -- transforms ------------------------------------------------------------------------------


def random_resized_crop(
    img: Any,
    size: tuple[int, int],
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Any:
    """A PIL image: a random crop of ``scale`` of the area and ``ratio`` aspect, resized to ``size`` (H, W)."""
    from PIL import Image

    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            box = (left, top, left + cw, top + ch)
            break
    if box is None:  # the largest central crop within the ratio range
        aspect = w / h
        cw, ch = (
            (w, round(w / ratio[0])) if aspect < ratio[0] else (round(h * ratio[1]), h) if aspect > ratio[1] else (w, h)
        )
        left, top = (w - cw) // 2, (h - ch) // 2
        box = (left, top, left + cw, top + ch)
    return img.resize((size[1], size[0]), Image.BILINEAR, box=box)


def centre_crop(img: Any, size: tuple[int, int], resize: float = EVAL_RESIZE) -> Any:
    """A PIL image scaled to cover ``resize`` x ``size`` (aspect kept), then its central ``size`` (H, W)."""
    from PIL import Image

    w, h = img.size
    s = max(resize * size[0] / h, resize * size[1] / w)
    sw, sh = max(size[1], round(w * s)), max(size[0], round(h * s))
    img = img.resize((sw, sh), Image.BILINEAR)
    left, top = (sw - size[1]) // 2, (sh - size[0]) // 2
    return img.crop((left, top, left + size[1], top + size[0]))


def pil_to_uint8(img: Any) -> torch.Tensor:
    """An RGB PIL image -> uint8 tensor [3, H, W]."""
    w, h = img.size
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)  # [H * W * 3]
    return x.view(h, w, 3).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> float, ImageNet mean/std normalised; float input is returned as is."""
    if x.dtype != torch.uint8:
        return x
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255  # [1, 3, 1, 1]
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


class ImageFolderDataset(torch.utils.data.Dataset):
    """Samples of an :class:`ImageFolder` as ``(image, label)``.

    ``train``: an item is ``(index, key)`` (as :class:`~dynas.kernels.distributed.EpochSampler`
    yields them) and gets the training transforms drawn from ``random.Random`` seeded by
    (key, index); a plain ``index`` uses key 0.  Otherwise the evaluation transforms.  Images are
    uint8 [3, H, W] (see :func:`normalise`), or normalised float with ``as_float``.
    """

    def __init__(self, folder: ImageFolder, size: tuple[int, int], train: bool, as_float: bool = False):
        self.folder, self.size, self.train, self.as_float = folder, tuple(size), train, as_float
        self.classes = folder.classes
        self.num_classes = len(folder.classes)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, item: "int | tuple[int, int]") -> tuple[torch.Tensor, int]:
        from PIL import Image

        index, key = item if isinstance(item, tuple) else (item, 0)
        path, label = self.folder.samples[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - see _decode_error
            raise ConfigError(
                f"data: image {path!r} cannot be read ({type(exc).__name__}: {exc}); "
                "allowed: a readable image".splitlines()[0]
            ) from None
        if self.train:
            rng = random.Random(key * 2**32 + index)
            img = random_resized_crop(img, self.size, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = centre_crop(img, self.size)
        x = pil_to_uint8(img)  # [3, H, W]
        return (normalise(x[None])[0] if self.as_float else x), label
