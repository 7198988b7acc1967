"""Bad data in an ImageFolder tree: the error names the file; --skip-bad-images skips and lists.

A truncated JPEG and an empty file stand beside images PIL decodes after a conversion (CMYK,
grayscale, RGBA saved as PNG under a .JPEG name, a 1x1 image), which must keep working.
"""

import io
import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from recipes.engine import cli  # noqa: E402
from recipes.vision import input_pipeline  # noqa: E402
from recipes.vision.classification_task import ClassificationTask  # noqa: E402


def write_tree(root: str) -> dict[str, str]:
    """Two classes of small JPEGs (train and val) plus the odd and the bad files in train/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label in range(2):
            folder = os.path.join(root, split, f"n0{label}")
            os.makedirs(folder)
            for index in range(count):
                pixels = rng.integers(0, 255, size=(40, 48, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img{index}.JPEG"))
    train = os.path.join(root, "train", "n00")
    odd = {"cmyk": Image.new("CMYK", (36, 30), (10, 20, 30, 40)),
           "gray": Image.new("L", (33, 41), 128), "tiny": Image.new("RGB", (1, 1), (1, 2, 3))}
    for name, image in odd.items():
        image.save(os.path.join(train, f"{name}.JPEG"), format="JPEG")
    Image.new("RGBA", (30, 30), (1, 2, 3, 4)).save(os.path.join(train, "rgba.JPEG"), format="PNG")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(buffer, "JPEG")
    bad = {"truncated": os.path.join(train, "truncated.JPEG"),
           "empty": os.path.join(train, "empty.JPEG")}
    with open(bad["truncated"], "wb") as f:
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    open(bad["empty"], "wb").close()
    return bad


def test_odd_formats_decode_and_bad_files_name_themselves(tmp_path):
    bad = write_tree(str(tmp_path))
    source = input_pipeline.ImageFolderSource(str(tmp_path / "train"))
    for path, _ in source.samples:
        if path in bad.values():
            with pytest.raises(input_pipeline.UndecodableImageError) as error:
                input_pipeline.open_rgb(path)
            assert path in str(error.value) and "--skip-bad-images" in str(error.value)
        else:
            image = input_pipeline.open_rgb(path)
            assert image.mode == "RGB" and min(image.size) >= 1
    truncated = str(pytest.raises(input_pipeline.UndecodableImageError,
                                  input_pipeline.open_rgb, bad["truncated"]).value)
    assert "truncated" in truncated.lower()


def test_default_run_stops_at_the_bad_file_with_its_path(tmp_path):
    bad = write_tree(str(tmp_path / "data"))
    with pytest.raises(Exception) as error:
        cli.main(ClassificationTask, "resnet50", "t", "", argv=[
            "--smoke", "--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "run"),
            "--batch-size", "8", "--no-control", "--devices", "1"])
    message = str(error.value)
    assert bad["truncated"] in message or bad["empty"] in message, message
    assert "cannot decode image" in message


@pytest.mark.slow
def test_skip_bad_images_trains_and_reports_the_skipped_paths(tmp_path):
    bad = write_tree(str(tmp_path / "data"))
    source = input_pipeline.ImageFolderSource(str(tmp_path / "data" / "train"),
                                              skipped_log=str(tmp_path / "log.txt"))
    index = [p for p, _ in source.samples].index(bad["empty"])
    # The bad file is replaced by the next decodable one of the split, label and all.
    assert source[index]["path"] == source.samples[index + 1][0]
    results = cli.main(ClassificationTask, "resnet50", "t", "", argv=[
        "--smoke", "--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "run"),
        "--batch-size", "8", "--no-control", "--devices", "1", "--steps", "2", "--skip-bad-images"])
    assert results["exactly_nm_sparse"] and results["steps"]["retrain"] == 2
    skipped = results["skipped_images"]
    assert skipped["count"] == 2 and set(skipped["files"]) == set(bad.values())
    assert "truncated" in skipped["files"][bad["truncated"]].lower()
