"""Test-wide settings: everything offline, nothing from the Hub."""

import os
import sys
from pathlib import Path

# Must be set before transformers / datasets / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
