"""How closely one bundle follows another (e.g. an int8 trunk vs its fp32 original).

    python scripts/compare_bundles.py REFERENCE OTHER IMAGES_DIR

Prints top-1 agreement and the mean Pearson correlation of the top-1 CAMs
(low resolution) over the images under IMAGES_DIR, recursively.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # export/ runs from a checkout

import npcam  # noqa: E402
from export.quantize import agreement  # noqa: E402
from npcam.files import find_images  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    reference, other = npcam.load(argv[0]), npcam.load(argv[1])
    images = [image.path for image in find_images([argv[2]]).images]
    inputs = [reference.preprocess(p) for p in images]
    result = agreement(reference, other, inputs)
    print(f"n={len(inputs)} top1_agreement={result['top1_agreement']:.4f} cam_pearson={result['cam_pearson']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
