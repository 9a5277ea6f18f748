"""The shapes detector that ``make models`` builds: its network (``model``), its procedural data (``data``),
the committed weights (``shapes_detector.pt``, trained by examples/train_shapes_detector.py) and labels.

They live in the product, not in examples/, because the default build (convert/detect_default.py,
quantize/default.py) needs them from an installed wheel too.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "shapes_detector.pt"
LABELS = HERE / "labels.txt"
