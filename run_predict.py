"""Segment images with a trained model: masks, overlays and scores per image and prompt.

    python run_predict.py --model demo_output --images photos/ --prompts "red circle" "blue square"

The command itself is `clipseg_tools/predict_command.py`, also installed as `clipseg-predict`.
"""

import sys

from clipseg_tools.predict_command import main

if __name__ == "__main__":
    sys.exit(main())
