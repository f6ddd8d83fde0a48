from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from cdm.data import (digits_uint8, heldout_split, load_folder, load_image_bytes, partition, save_grid,
                      write_demo_owners)


def png(image: Image.Image) -> bytes:
    buf = BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_conversions_to_grey_in_range():
    grey = np.zeros((8, 8), dtype=np.uint8)
    grey[2:6, 3] = 255
    expected = load_image_bytes(png(Image.fromarray(grey, "L")), 8, 1)
    assert expected.shape == (1, 8, 8) and expected.min() == -1 and expected.max() == 1
    rgb = Image.fromarray(np.stack([grey] * 3, -1), "RGB")
    assert torch.allclose(load_image_bytes(png(rgb), 8, 1), expected)
    palette = Image.fromarray(grey, "L").convert("P")
    assert torch.allclose(load_image_bytes(png(palette), 8, 1), expected)
    rgba = Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], -1), "RGBA")
    assert torch.allclose(load_image_bytes(png(rgba), 8, 1), expected)
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    assert torch.allclose(load_image_bytes(png(sixteen), 8, 1), expected, atol=1 / 127.5)
    big = Image.fromarray(np.kron(grey, np.ones((4, 4), dtype=np.uint8)), "L")
    assert load_image_bytes(png(big), 8, 1).shape == (1, 8, 8)
    assert load_image_bytes(png(rgb), 16, 3).shape == (3, 16, 16)


def test_load_folder_and_label_set(tmp_path):
    img = Image.fromarray(np.full((8, 8), 128, dtype=np.uint8), "L")
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "a.png").write_bytes(png(img))
    ds = load_folder(tmp_path, 8, 1, labels=range(10))
    assert len(ds) == 1 and ds.y.tolist() == [3] and len(ds.ids[0]) == 64
    (tmp_path / "12").mkdir()
    with pytest.raises(ValueError, match="label '12'"):
        load_folder(tmp_path, 8, 1, labels=range(10))


def test_partitions_cover_every_sample_once():
    _, labels = digits_uint8()
    for kind in ("iid", "by-class"):
        parts = partition(labels, 4, kind, seed=0)
        allidx = np.concatenate(parts)
        assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    iid = partition(labels, 4, "iid", seed=0)
    assert len({len(p) for p in iid}) > 1  # owner sizes differ
    by_class = partition(labels, 5, "by-class")
    assert [sorted(set(labels[p])) for p in by_class] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError):
        partition(labels, 11, "by-class")


def test_heldout_split_is_fixed_and_disjoint():
    _, labels = digits_uint8()
    own, held = heldout_split(labels)
    own2, held2 = heldout_split(labels)
    assert np.array_equal(held, held2) and not set(own) & set(held)
    assert abs(len(held) / len(labels) - 0.2) < 0.01


def test_demo_owners_and_grid(tmp_path):
    folders = write_demo_owners(tmp_path / "src", 3, "by-class")
    assert sorted(folders) == ["heldout", "owner-00", "owner-01", "owner-02"]
    ds = load_folder(folders["owner-00"], 8, 1, labels=range(10))
    assert set(ds.y.tolist()) == {0, 1, 2, 3}
    grid = save_grid(ds.x[:10], tmp_path / "grid.png")
    assert Image.open(grid).size[0] > 8


def test_a_bundled_digit_has_the_content_id_of_its_file(tmp_path):
    """One content id: the bundled arrays, the folders written from them and a manifest of those folders agree
    (the evaluation leaves the shared initialization's public images out of its unseen data by these ids)."""
    from cdm.data import digits_dataset, digits_uint8, load_folder, write_class_folders

    images, labels = digits_uint8()
    write_class_folders(images[:30], labels[:30], tmp_path / "public")
    from_files = load_folder(tmp_path / "public", 8, 1, range(10))
    assert set(from_files.ids) == set(digits_dataset(np.arange(30)).ids)


def test_bundled_mnist_has_256_levels_and_a_disjoint_three_way_split():
    from cdm.data import mnist_uint8, public_split

    images, labels = mnist_uint8(16)
    assert images.shape == (5000, 16, 16) and images.dtype == np.uint8 and len(np.unique(images)) > 200
    public, owners, held = public_split(labels)
    assert len(public) + len(owners) + len(held) == 5000
    assert not (set(public) & set(owners) or set(public) & set(held) or set(owners) & set(held))
    assert abs(len(public) - 1000) <= 10 and abs(len(held) - 1000) <= 10
    for part in (public, owners, held):  # stratified: every class in every part
        assert set(labels[part]) == set(range(10))


def test_demo_owners_with_a_public_share_keep_it_apart_from_owners_and_heldout(tmp_path):
    from cdm.data import sha256_bytes

    folders = write_demo_owners(tmp_path / "src", 4, "iid", public_fraction=0.2)
    ids = {name: {sha256_bytes(f.read_bytes()) for f in folder.glob("*/*.png")} for name, folder in folders.items()}
    owners = set().union(*(v for k, v in ids.items() if k.startswith("owner-")))
    assert not ids["public"] & owners and not ids["public"] & ids["heldout"] and not owners & ids["heldout"]
    plain = write_demo_owners(tmp_path / "plain", 4, "iid")
    assert set(plain) == set(folders) - {"public"}
    total = sum(len(v) for v in ids.values())
    assert len(ids["public"]) == pytest.approx(0.2 * (total - len(ids["heldout"])), abs=10)
    assert {len(list(f.glob("*"))) for f in (folders["public"],)} == {10}  # every digit is public
