"""Data for fine-tuning and training: an image folder, the built-in synthetic set, a tensor file,
or the user's own loaders.

A data *spec* is one string, as ``dynas search --data SPEC`` and ``dynas train --data SPEC`` take it:

``DIR``, an image folder
    ``DIR/train/<class>/*.jpg|png`` and ``DIR/val/<class>/*`` (torchvision's ``ImageFolder``
    layout, classes sorted by name; :mod:`dynas.kernels.imagefolder`).  Every image is decoded
    once up front; a bad one stops with its name.  Training images get RandomResizedCrop to the
    input size and a flip, held-out ones a resize and centre crop; both are normalised.  The
    proxy decodes in its own process (no loader workers).

``synthetic`` (default)
    :func:`dynas.kernels.trainer.synthetic_images`: generated from the seed, no download.  Each
    image is background noise with one coloured square covering about a ninth of it; the class
    is the colour.  ``synthetic:N`` sets the number of training images (default 2048; the
    held-out split is a quarter of that, at least 256).
``synthetic-hard`` / ``synthetic-hard:N``
    :func:`dynas.kernels.synthetic.hard_synthetic_images`: the harder built-in set where depth
    pays (8 classes: shape x stripe orientation x image half of one target among clutter), for
    telling early exits from late ones.  Generated from the seed; ``N`` as for ``synthetic``.
``PATH`` to a ``torch.save`` file
    A dict with ``train_images`` (float [N, 3, H, W]), ``train_labels`` (int [N]),
    ``val_images`` and ``val_labels``; optionally ``num_classes``.  H x W must equal the search's
    input size.
``package.module:function``
    Called as ``function(input_size=(H, W), batch_size=B, seed=S)``; returns
    ``(train_loader, val_loader)`` or ``(train_loader, val_loader, num_classes)``.  A loader is
    any re-iterable of ``(images [B, 3, H, W], labels [B])`` batches (a ``torch.utils.data.DataLoader``
    is one).  Without ``num_classes`` it is read from ``loader.dataset.num_classes`` or
    ``len(loader.dataset.classes)``, else taken as 1 + the largest label of the held-out split.
    The module must be importable by every worker process.  (Not for ``dynas train``, which
    needs a data set it can split between processes.)

:func:`load_data` turns a spec into :class:`DataSplits` (loaders, for the finetune proxy);
:func:`load_datasets` into :class:`DataSets` (map-style data sets, for ``dynas train`` and
``dynas evaluate``); :func:`check_data_spec` validates one without loading anything (used
before a search writes its first file).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from dynas.errors import ConfigError

__all__ = ["DEFAULT_DATA", "DataSplits", "DataSets", "check_data_spec", "load_data", "load_datasets", "check_datasets"]

#: the data spec used when none is given
DEFAULT_DATA = "synthetic"
_SYNTHETIC_TRAIN = 2048
_TENSOR_KEYS = ("train_images", "train_labels", "val_images", "val_labels")


@dataclass
class DataSplits:
    """Training batches (re-iterable; cycled as long as training needs) and held-out batches."""

    train: Iterable[tuple[torch.Tensor, torch.Tensor]]
    val: Iterable[tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    seed: int = 0

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches: the train loader, epoch after epoch.

        Every call starts the same sequence: a loader's ``generator`` (a seeded
        ``torch.Generator``, as a ``DataLoader(generator=...)`` has) is re-seeded first, so
        every candidate sees the same batches in the same order.  A loader without one
        shuffles from torch's global generator, which the caller seeds.
        """
        g = getattr(self.train, "generator", None)
        if isinstance(g, torch.Generator):
            g.manual_seed(self.seed)
        while True:
            empty = True
            for batch in self.train:
                empty = False
                yield batch
            if empty:
                raise ConfigError(
                    "data: the training loader yielded no batch; allowed: a loader with at least one batch"
                )


#: built-in generated data sets (``NAME`` or ``NAME:N``; see _synthetic)
SYNTHETIC_SETS = ("synthetic", "synthetic-hard")


def _kind(spec: str) -> str:
    if any(spec == name or spec.startswith(name + ":") for name in SYNTHETIC_SETS):
        return "synthetic"
    if os.path.isdir(spec):
        return "imagefolder"
    if os.path.exists(spec):
        return "file"
    module, sep, attr = spec.partition(":")
    if sep and module and attr and all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        return "entry"
    return "unknown"


_ALLOWED = (
    "an image folder DIR (DIR/train/<class>/*, DIR/val/<class>/*), synthetic[:N], synthetic-hard[:N], "
    "a torch.save file, or package.module:function"
)


def check_data_spec(spec: Any) -> str:
    """``spec`` stripped, or :class:`ConfigError` naming it; loads nothing."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"data={spec!r} is not a data spec; allowed: {_ALLOWED}")
    spec = spec.strip()
    kind = _kind(spec)
    if kind == "unknown" and "/" in spec.replace(os.sep, "/"):
        raise ConfigError(f"data={spec!r} does not exist; allowed: {_ALLOWED}")
    if kind == "unknown":
        raise ConfigError(f"data={spec!r} is neither a file nor a known data set; allowed: {_ALLOWED}")
    if kind == "synthetic" and ":" in spec:
        name, _, n = spec.partition(":")
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(
                f"data={spec!r}: the number of training images must be an integer >= 1; allowed: {name}:N"
            )
    return spec


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    ds = torch.utils.data.TensorDataset(x, y)  # x [N, 3, H, W], y [N]
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=shuffle and len(ds) >= batch_size
    )


def _synthetic_tensors(spec: str, input_size: tuple[int, int], seed: int) -> dict[str, Any]:
    name, _, n = spec.partition(":")
    n_train = int(n or _SYNTHETIC_TRAIN)
    n_val = max(256, n_train // 4)
    if name == "synthetic-hard":
        from dynas.kernels.synthetic import HARD_CLASSES, hard_synthetic_images

        x, y = hard_synthetic_images(n_train + n_val, input_size, seed)  # [n, 3, H, W], [n]
        classes = HARD_CLASSES
    else:
        from dynas.kernels.trainer import synthetic_images

        x, y = synthetic_images(n_train + n_val, input_size, 10, seed)  # [n, 3, H, W], [n]
        classes = 10
    return {
        "train_images": x[:n_train],
        "train_labels": y[:n_train],
        "val_images": x[n_train:],
        "val_labels": y[n_train:],
        "num_classes": classes,
    }


def _synthetic(spec: str, input_size: tuple[int, int], batch_size: int, seed: int) -> DataSplits:
    data = _synthetic_tensors(spec, input_size, seed)
    return DataSplits(
        _loader(data["train_images"], data["train_labels"], batch_size, True, seed),
        _loader(data["val_images"], data["val_labels"], 256, False, seed),
        data["num_classes"],
        seed,
    )


def _tensor_file(spec: str, input_size: tuple[int, int], batch_size: int, seed: int) -> DataSplits:
    data = _read_tensor_file(spec, input_size)
    return DataSplits(
        _loader(data["train_images"], data["train_labels"], batch_size, True, seed),
        _loader(data["val_images"], data["val_labels"], 256, False, seed),
        data["num_classes"],
        seed,
    )


def _read_tensor_file(spec: str, input_size: tuple[int, int]) -> dict[str, Any]:
    try:
        data = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and I/O errors all mean "not a tensor file"
        raise ConfigError(
            f"data={spec!r} cannot be loaded ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"allowed: a torch.save file with keys {', '.join(_TENSOR_KEYS)}"
        ) from None
    if not isinstance(data, dict) or any(k not in data for k in _TENSOR_KEYS):
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"data={spec!r} holds {have}; allowed: a dict with keys {', '.join(_TENSOR_KEYS)}")
    for split in ("train", "val"):
        x, y = data[f"{split}_images"], data[f"{split}_labels"]
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == 3 and x.is_floating_point()):
            raise ConfigError(
                f"data={spec!r}: {split}_images has shape {tuple(getattr(x, 'shape', ()))}; "
                "allowed: a float tensor [N, 3, H, W]"
            )
        if tuple(x.shape[2:]) != tuple(input_size):
            raise ConfigError(
                f"data={spec!r}: {split}_images are {x.shape[2]}x{x.shape[3]}; allowed: the search's "
                f"input size {input_size[0]}x{input_size[1]}"
            )
        if not (isinstance(y, torch.Tensor) and y.dim() == 1 and len(y) == len(x) and not y.is_floating_point()):
            raise ConfigError(f"data={spec!r}: {split}_labels must be an integer tensor [N] with N = {len(x)}")
        if len(x) == 0 or int(y.min()) < 0:
            raise ConfigError(
                f"data={spec!r}: {split} split is empty or has negative labels; allowed: N >= 1, labels >= 0"
            )
    num_classes = int(data.get("num_classes", 1 + max(int(data["train_labels"].max()), int(data["val_labels"].max()))))
    return {**{k: data[k] for k in _TENSOR_KEYS}, "num_classes": num_classes}


def _entry(spec: str, input_size: tuple[int, int], batch_size: int, seed: int) -> DataSplits:
    module, _, attr = spec.partition(":")
    try:
        fn: Any = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"data={spec!r} cannot be loaded ({str(exc).splitlines()[0]}); allowed: package.module:function on sys.path"
        ) from None
    if not callable(fn):
        raise ConfigError(f"data={spec!r} is a {type(fn).__name__}; allowed: a function(input_size, batch_size, seed)")
    try:
        got = fn(input_size=tuple(input_size), batch_size=batch_size, seed=seed)
    except TypeError as exc:  # most often a signature that does not take these keywords
        raise ConfigError(
            f"data={spec!r} failed when called as function(input_size=(H, W), batch_size=B, seed=S): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(got, tuple) or len(got) not in (2, 3):
        raise ConfigError(
            f"data={spec!r} returned a {type(got).__name__}; allowed: (train_loader, val_loader[, num_classes])"
        )
    train, val = got[0], got[1]
    num_classes = got[2] if len(got) == 3 else _classes_of(train) or _classes_of(val)
    if num_classes is None:
        num_classes = 1 + max(int(y.max()) for _, y in val)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"data={spec!r}: num_classes={num_classes!r}; allowed: an integer >= 2")
    return DataSplits(train, val, num_classes, seed)


def _classes_of(loader: Any) -> int | None:
    ds = getattr(loader, "dataset", None)
    if isinstance(getattr(ds, "num_classes", None), int):
        return ds.num_classes
    classes = getattr(ds, "classes", None)
    return len(classes) if classes is not None else None


def load_data(spec: str, input_size: tuple[int, int], batch_size: int, seed: int = 0) -> DataSplits:
    """The :class:`DataSplits` of ``spec`` (see the module docstring) at ``input_size`` (H, W)."""
    spec = check_data_spec(spec)
    kind = _kind(spec)
    if kind == "synthetic":
        return _synthetic(spec, input_size, batch_size, seed)
    if kind == "file":
        return _tensor_file(spec, input_size, batch_size, seed)
    if kind == "imagefolder":
        return _imagefolder(spec, input_size, batch_size, seed)
    return _entry(spec, input_size, batch_size, seed)


# -- image folders -----------------------------------------------------------------------------


class KeyedShuffle(torch.utils.data.Sampler):
    """A new permutation of ``n`` indices per pass, drawn from ``generator``, as ``(index, key)``
    items (the key seeds each sample's augmentation, see
    :class:`~dynas.kernels.imagefolder.ImageFolderDataset`).  Re-seeding the generator restarts
    the same sequence of passes, as :meth:`DataSplits.train_batches` does."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __iter__(self) -> Iterator[tuple[int, int]]:
        key = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        for i in torch.randperm(self.n, generator=self.generator).tolist():
            yield i, key

    def __len__(self) -> int:
        return self.n


def _imagefolder(spec: str, input_size: tuple[int, int], batch_size: int, seed: int) -> DataSplits:
    from dynas.kernels.imagefolder import ImageFolderDataset, load_imagefolder

    folders = load_imagefolder(spec, threads=os.cpu_count() or 1)  # raises on any bad image
    train = ImageFolderDataset(folders["train"], input_size, train=True, as_float=True)
    val = ImageFolderDataset(folders["val"], input_size, train=False, as_float=True)
    g = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(
        train,
        batch_size=batch_size,
        sampler=KeyedShuffle(len(train), g),
        generator=g,
        drop_last=len(train) >= batch_size,
    )
    val_loader = torch.utils.data.DataLoader(val, batch_size=256)
    return DataSplits(train_loader, val_loader, train.num_classes, seed)


# -- map-style data sets (dynas train, dynas evaluate) -------------------------------------------


class TensorItems(torch.utils.data.Dataset):
    """Images [N, 3, H, W] and labels [N] as a data set whose items may be ``(index, key)`` (key unused)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: "int | tuple[int, int]") -> tuple[torch.Tensor, int]:
        index = item[0] if isinstance(item, tuple) else item
        return self.images[index], int(self.labels[index])  # [3, H, W], label


@dataclass
class DataSets:
    """Map-style data sets for ``dynas train`` / ``dynas evaluate``; ``train`` is None when not asked for.

    Items are ``(image, label)``: uint8 [3, H, W] from an image folder (normalise on the device
    with :func:`~dynas.kernels.imagefolder.normalise`), float from tensors.
    """

    train: torch.utils.data.Dataset | None
    val: torch.utils.data.Dataset
    classes: list[str]
    source: str  # what the data is, for logs and RUN/config.json
    skipped: list[str]  # bad images left out (--skip-bad-images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def decodes(self) -> bool:
        """Whether items are decoded from files (then loader workers help), not read from memory."""
        return not isinstance(self.val, TensorItems)


def load_datasets(
    spec: str,
    input_size: tuple[int, int],
    seed: int = 0,
    *,
    splits: Sequence[str] = ("train", "val"),
    check: bool = True,
    skip_bad: bool = False,
    threads: int = 1,
) -> DataSets:
    """The :class:`DataSets` of ``spec`` (an image folder, ``synthetic[:N]`` or a tensor file) at
    ``input_size``.  Raises a one-line :class:`ConfigError` for anything it cannot use, before any
    training.  With ``check`` every image is decoded once (:func:`check_datasets`); a
    distributed caller passes ``check=False`` and calls :func:`check_datasets` with its shard."""
    spec = check_data_spec(spec)
    kind = _kind(spec)
    if kind == "imagefolder":
        from dynas.kernels.imagefolder import scan_splits

        data = _folder_sets(spec, scan_splits(spec, splits), input_size)
        return check_datasets(data, skip_bad=skip_bad, threads=threads) if check else data
    if kind == "entry":
        raise ConfigError(
            f"data={spec!r} is a loader function; allowed here: an image folder DIR, synthetic[:N] or a "
            "torch.save file (a data set that can be split between processes)"
        )
    data = _synthetic_tensors(spec, input_size, seed) if kind == "synthetic" else _read_tensor_file(spec, input_size)
    classes = [str(c) for c in range(data["num_classes"])]
    train = TensorItems(data["train_images"], data["train_labels"]) if "train" in splits else None
    return DataSets(
        train,
        TensorItems(data["val_images"], data["val_labels"]),
        classes,
        f"{spec} ({len(data['train_labels'])} train, {len(data['val_labels'])} val images)",
        [],
    )


def _folder_sets(spec: str, folders: dict[str, Any], input_size: tuple[int, int]) -> DataSets:
    from dynas.kernels.imagefolder import ImageFolderDataset

    sets = {s: ImageFolderDataset(f, input_size, train=s == "train") for s, f in folders.items()}
    first = next(iter(folders.values()))
    counts = ", ".join(f"{len(f.samples)} {s}" for s, f in folders.items())
    return DataSets(
        sets.get("train"),
        sets["val"],
        first.classes,
        f"image folder {spec} ({len(first.classes)} classes, {counts} images)",
        sorted(p for f in folders.values() for p in f.skipped),
    )


def check_datasets(
    data: DataSets,
    *,
    skip_bad: bool = False,
    threads: int = 1,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[Any], list[Any]] = lambda x: [x],
) -> DataSets:
    """``data`` with every image decoded once (image folders; tensors need no check): see
    :func:`~dynas.kernels.imagefolder.check_splits` for ``skip_bad``, ``shard`` and ``gather``."""
    from dynas.kernels.imagefolder import ImageFolderDataset, check_splits

    if not isinstance(data.val, ImageFolderDataset):
        return data
    folders = {s: d.folder for s, d in (("train", data.train), ("val", data.val)) if d is not None}
    checked = check_splits(folders, skip_bad=skip_bad, threads=threads, shard=shard, gather=gather)
    root = next(iter(folders.values())).root
    return _folder_sets(root, checked, data.val.size)
