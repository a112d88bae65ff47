"""Class galleries for selection by clicking (protocol Steps 16, 20, 21).

A classification result (``run_itNNN_data.star`` or ``_model.star`` of class2d/class3d)
becomes one card per class: its average (2D) or central z-slice (3D) as a PNG, its number,
its share of the particles (``rlnClassDistribution``), its particle count and estimated
resolution; cards come sorted by size, as Step 16 recommends. "Save selection" then runs an
ordinary ``select`` job with the clicked class numbers.
"""

from __future__ import annotations

import base64
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from subtomo.em.class_selection import class_table
from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet
from subtomo.jobs._class_results import class_images, data_and_model_paths, read_model_classes

_RESULT = re.compile(r"run_(it\d+_)?(data|model)\.star$")


@dataclass
class ClassCard:
    """One class of a classification, as shown in the gallery."""

    number: int
    fraction: float
    particles: int
    resolution_A: float | None
    image: str  # PNG data URI ("" if the class image is missing)


def is_classification_result(path: str) -> bool:
    """Whether a file name is a classification's data or model STAR (offered for selection)."""
    return bool(_RESULT.search(path)) and ("Class2D/" in path or "Class3D/" in path)


def image_png_uri(image: np.ndarray, size: int = 128) -> str:
    """A 2D image, contrast-stretched (0.5-99.5 percentiles), as a PNG data URI; first axis drawn upwards."""
    low, high = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    grey = np.clip((image - low) / ((high - low) or 1.0) * 255, 0, 255).astype(np.uint8)
    picture = Image.fromarray(np.flipud(grey))
    if picture.width < size:
        picture = picture.resize((size, size * picture.height // picture.width), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def class_cards(path: Path, project: Path) -> tuple[Path, list[ClassCard]]:
    """(the data STAR to select from, its classes sorted by size, largest first).

    Raises
    ------
    SubtomoError
        The file is not a classification result with class numbers.
    """
    data_path, model_path = data_and_model_paths(path)
    particles = ParticleSet.read(data_path, project)
    if "rlnClassNumber" not in particles.table.columns:
        raise SubtomoError(f"{data_path}: no rlnClassNumber column, so it is not a classification result. "
                           "Open a run_itNNN_data.star of a class2d or class3d job.")
    numbers = particles.table["rlnClassNumber"].to_numpy(int)
    model_classes = read_model_classes(model_path)
    table = class_table(model_classes, numbers)
    images = class_images(model_classes, model_path, project) if model_path is not None else None
    cards = []
    for j, k in enumerate(table.number):
        image = ""
        if images is not None and j < len(images[0]):
            picture = images[0][j]
            image = image_png_uri(picture[picture.shape[0] // 2] if picture.ndim == 3 else picture)
        res = float(table.resolution_A[j])
        cards.append(ClassCard(int(k), float(table.fraction[j]), int((numbers == k).sum()),
                               None if math.isnan(res) or math.isinf(res) else res, image))
    return data_path, sorted(cards, key=lambda c: (-c.fraction, c.number))
