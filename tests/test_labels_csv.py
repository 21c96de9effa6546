"""--eval-set DIR with a labels.csv (file,label), as the ImageNet assets are laid out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dfq_deploy.analysis.evaluate import evaluate_top1, load_eval_set
from dfq_deploy.errors import BadInputError
from dfq_deploy.io.labels_csv import read_labels_csv

NONE = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _folder(tmp_path, csv_text: str, colours=((200, 0, 0), (0, 200, 0), (0, 0, 200))):
    """images/c<i>.png of one colour each (red, green, blue) and labels.csv with ``csv_text``."""
    (tmp_path / "images").mkdir()
    for i, colour in enumerate(colours):
        Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(tmp_path / "images" / f"c{i}.png")
    (tmp_path / "labels.csv").write_text(csv_text)
    return tmp_path


def test_rows_give_images_and_labels_in_file_order(tmp_path):
    folder = _folder(tmp_path, "file,label,wnid\nimages/c2.png,2,n3\nimages/c0.png,0,n1\nimages/c1.png,1,n2\n")
    assert read_labels_csv(folder) == [
        (folder / "images/c2.png", 2),
        (folder / "images/c0.png", 0),
        (folder / "images/c1.png", 1),
    ]
    data = load_eval_set(folder, input_shape=(3, 8, 8), mean=NONE[0], std=NONE[1], num_classes=3)
    assert data.labels.tolist() == [2, 0, 1]
    # The brightest channel is the label: a model that returns channel means scores 100%.
    assert evaluate_top1(lambda x: x.mean((2, 3)), data) == 100.0
    assert data.images[0, 2].mean() == pytest.approx(200 / 255, abs=1e-6)


@pytest.mark.parametrize(
    "text",
    [
        "images/c0.png,0\nimages/c1.png,1\nimages/c2.png,2\n",  # no header
        "label,file\n0,images/c0.png\n1,images/c1.png\n2,images/c2.png\n",  # columns swapped
        "\ufeffFile , Label\r\nimages/c0.png, 0\r\n\r\nimages/c1.png,1\r\nimages/c2.png,2\r\n",  # BOM, CRLF, blanks
    ],
)
def test_header_variants(tmp_path, text):
    folder = _folder(tmp_path, text)
    assert [label for _, label in read_labels_csv(folder)] == [0, 1, 2]


@pytest.mark.parametrize(
    "text, says",
    [
        (
            "file,label\nimages/c0.png,0\nimages/gone.png,1\nimages/lost.png,2\n",
            "2 image.s. not found.*gone.png, images/lost.png",
        ),
        ("file,label\nimages/c0.png,zero\n", "line 2: label 'zero' is not an integer"),
        ("file,label\nimages/c0.png,-1\n", "label -1 is negative"),
        ("name,kind\nimages/c0.png,x\n", "no file and label columns"),
        ("file,label\nimages/c0.png\n", "expected file,label"),
        ("", "lists no images"),
        ("file,label\n", "header but lists no images"),
    ],
)
def test_bad_files_are_user_errors(tmp_path, text, says):
    folder = _folder(tmp_path, text)
    with pytest.raises(BadInputError, match=says):
        load_eval_set(folder, input_shape=(3, 8, 8), mean=NONE[0], std=NONE[1])


def test_label_beyond_the_model_s_classes_is_refused(tmp_path):
    folder = _folder(tmp_path, "file,label\nimages/c0.png,0\nimages/c1.png,7\n")
    with pytest.raises(BadInputError, match="labels 0..7, the model has 3 output classes"):
        load_eval_set(folder, input_shape=(3, 8, 8), mean=NONE[0], std=NONE[1], num_classes=3)


def test_the_imagenet_assets_read(assets):
    folder = assets / "imagenet-750"
    if not folder.is_dir():
        pytest.skip("../shared/assets/imagenet-750 not present")
    entries = read_labels_csv(folder)
    assert len(entries) == 750 and {label for _, label in entries} <= set(range(1000))
    data = load_eval_set(folder, input_shape=(3, 224, 224), mean=NONE[0], std=NONE[1], limit=4, num_classes=1000)
    assert data.images.shape == (4, 3, 224, 224) and data.labels.tolist() == [e[1] for e in entries[:4]]
