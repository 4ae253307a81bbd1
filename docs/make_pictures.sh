#!/usr/bin/env bash
# Redraw the pictures in docs/ from the synthetic demo data: CPU only, a few minutes.
#
#   bash docs/make_pictures.sh            # PYTHON=/path/to/python to choose the interpreter
#
# The screenshot of evaluate.py's HTML page needs a headless Chromium (Debian: apt-get install
# chromium); without one the page is written and the old screenshot kept.
#
# Trains the demo ViT (train.py --demo) into demo_weights/docs/, predicts flowers it has
# never seen (drawn with another seed), and evaluates it on its validation split. The
# pictures are of cartoon flowers and a 0.8M-parameter model: they show what the tools
# draw, not how ViT-B/16 does on flower_photos.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=demo_weights/docs
CKPT=$WORK/weights/best.pth

"$PY" train.py --demo --epochs 10 --workers 0 --output-dir "$WORK/weights" --log-dir "$WORK/runs"

# Unseen images: the same generator with another seed, two per class.
"$PY" -c "from demo_data import make_demo_flowers; make_demo_flowers('$WORK/unseen', per_class=2, seed=1)"
"$PY" predict.py "$WORK/unseen" --weights "$CKPT" --device cpu --topk 2 \
    --save-fig docs/prediction_grid.png
"$PY" predict.py "$WORK/unseen/sunflowers/sunflowers_0000.jpg" --weights "$CKPT" --device cpu \
    --attention docs/attention.png
"$PY" predict.py "$WORK/unseen/roses/roses_0001.jpg" --weights "$CKPT" --device cpu \
    --grad-cam docs/grad_cam.png

"$PY" evaluate.py --weights "$CKPT" --device cpu --workers 0 --output-dir "$WORK/evaluation" \
    --html "$WORK/evaluation/report.html"
cp "$WORK/evaluation/confusion_matrix.png" "$WORK/evaluation/class_distribution.png" docs/
CHROMIUM=$(command -v chromium || command -v chromium-headless-shell || true)
if [ -n "$CHROMIUM" ]; then
    # The top of the page at laptop width, halved: about 100 KB once quantised below.
    "$CHROMIUM" --headless --no-sandbox --hide-scrollbars --window-size=1280,2300 \
        --screenshot="$PWD/docs/evaluation_report.png" "file://$PWD/$WORK/evaluation/report.html"
    "$PY" -c "from PIL import Image; i = Image.open('docs/evaluation_report.png'); \
i.resize((i.width // 2, i.height // 2), Image.Resampling.LANCZOS).save(i.filename)"
else
    echo "No chromium: docs/evaluation_report.png is not redrawn." >&2
fi

# A 256-colour palette keeps each PNG at about 100 KB or less (the page's screenshot is the
# largest) with no visible loss at this size.
"$PY" - <<'PYTHON'
from pathlib import Path

from PIL import Image

for path in sorted(Path("docs").glob("*.png")):
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KB")
PYTHON
