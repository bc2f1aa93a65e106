"""Write the web demo's example pictures (`app.py`): three images of the project's synthetic PhraseCut writer.

    python examples/make_examples.py

Deterministic: the same files every time (the writer is seeded).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from phrasecut_dataset import write_synthetic_phrasecut  # noqa: E402

SEED = 11
# Positions in the written test split of the pictures kept, and their names here.
CHOSEN = {0: "shapes_1.jpg", 1: "shapes_2.jpg", 7: "shapes_3.jpg"}


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = write_synthetic_phrasecut(
            Path(scratch) / "data", {"test": 8}, seed=SEED, min_size=224, max_size=320
        )
        # The writer numbers images in the order it draws them: sorted ids are the split's order.
        images = sorted((root / "images").glob("*.jpg"), key=lambda path: int(path.stem))
        for position, name in CHOSEN.items():
            shutil.copyfile(images[position], HERE / name)
            print(f"{HERE / name}: {(HERE / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
