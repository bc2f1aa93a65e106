"""Segment a folder of images with a trained model: masks, overlays and scores per image and prompt.

    clipseg-predict --model demo_output --images photos/ --prompts "red circle" "blue square"
    python run_predict.py --model CIDAS/clipseg-rd64-refined --images "shots/*.jpg" --prompts_file prompts.txt

For every image and prompt, in `--output_dir`: `<image stem>/<prompt slug>.png` (the mask: 8-bit, 255 where
the probability exceeds `--threshold`, at the image's own size), `<prompt slug>_overlay.jpg` (the photo with
the mask tinted and outlined) and, with `--save_probabilities`, `<prompt slug>_probability.png` (16-bit: the
probability times 65535); then `scores.csv` and `scores.json` for the whole run.

Each image's files are written as soon as its batch is done, each under a temporary name and then renamed, and
last a record of them (`<image stem>/.scores.json`): a rerun, also of a run that was killed, skips the images
whose record matches the model, prompts and threshold asked and whose files are all there whole.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import os
import re
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from .cli import ArgumentParser, plural, run_command, setup_logging, worker_count
from .errors import CommandError
from .files import partial_path, removed_if_left_empty, write_text_atomically
from .metrics import OFFICIAL_THRESHOLD
from .onnx_runtime import PRECISIONS, SETTINGS_FILE, onnx_folder
from .sources import load_error, model_source_problem

logger = logging.get_logger(__name__)

SCORE_HELP = (
    "score: the highest probability of the prompt's map in the image (0 to 1; low when what the prompt "
    "names is absent); mask_area: the fraction of the image's pixels above --threshold"
)
DESCRIPTION = (
    "Segment images with a trained model. For each image and prompt, in --output_dir: <image stem>/<prompt "
    "slug>.png (the mask: 255 where the probability exceeds --threshold, at the image's own size), <prompt "
    "slug>_overlay.jpg (the photo with the mask tinted and outlined), with --save_probabilities <prompt "
    "slug>_probability.png; and scores.csv, scores.json for the whole run. A rerun skips the images done "
    "before with the same model, prompts and threshold (--overwrite redoes them)."
)
BACKENDS = ("pytorch", "onnxruntime")
RECORD = ".scores.json"  # per image: its rows and files, written last (the image's outputs are complete)
CSV_COLUMNS = ("image", "prompt", "prompt_type", "score", "mask_area", "mask", "overlay", "probabilities")
MAX_SLUG = 80
# Names Windows refuses for a file, whatever the extension.
RESERVED_NAMES = {"con", "prn", "aux", "nul"} | {f"{port}{i}" for port in ("com", "lpt") for i in range(10)}
# Overlay colours, one per prompt in turn: strong hues that stand out on most photos.
COLOURS = ((255, 0, 170), (0, 200, 255), (255, 190, 0), (0, 220, 90), (150, 80, 255), (255, 90, 40))
TINT = 0.45  # the colour's share of a masked pixel in the overlay
DIM = 0.6  # the brightness left to the overlay's pixels outside the mask


@dataclass(frozen=True)
class Prompt:
    """A phrase or an example image, and the slug its files are named by."""

    name: str  # the phrase, or the example image's file stem
    kind: str  # "text" or "image"
    source: str  # the phrase, or the example image's path
    value: Any  # what predict() takes: the phrase or the decoded image
    slug: str


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=DESCRIPTION, epilog=f"In scores.csv and scores.json, {SCORE_HELP}.")
    parser.add_argument(
        "--model",
        required=True,
        metavar="FOLDER_OR_HUB_ID",
        help="a model of ours or a CIDAS checkpoint (e.g. CIDAS/clipseg-rd64-refined)",
    )
    images = parser.add_argument_group("images (give --images, --image_list or both)")
    images.add_argument(
        "--images",
        nargs="+",
        default=[],
        metavar="PATH",
        help="folders (their image files, by extension), glob patterns in quotes (** spans subfolders) or "
        "image files",
    )
    images.add_argument(
        "--image_list",
        metavar="FILE",
        help="a text file of image paths, one a line (relative ones from the file's folder; blank lines and "
        "# comments skipped)",
    )
    images.add_argument("--recursive", action="store_true", help="search the folders' subfolders too")
    prompts = parser.add_argument_group("prompts (any mix of the three)")
    prompts.add_argument(
        "--prompts", nargs="+", default=[], metavar="PHRASE", help='e.g. --prompts "a cat" "the sky"'
    )
    prompts.add_argument(
        "--prompts_file",
        metavar="FILE",
        help="a text file of phrases, one a line (blank lines and # comments skipped)",
    )
    prompts.add_argument(
        "--example_images",
        nargs="+",
        default=[],
        metavar="IMAGE",
        help="images used as visual prompts (segment what they show), named by their file stem",
    )
    parser.add_argument("--output_dir", default="predictions", help="where the masks, overlays and scores go")
    parser.add_argument(
        "--threshold", type=float, default=OFFICIAL_THRESHOLD, help="masks: probability above this"
    )
    parser.add_argument(
        "--save_probabilities",
        action="store_true",
        help="also write each probability map (16-bit PNG: probability x 65535)",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument(
        "--num_workers",
        type=int,
        help="threads that read images and write outputs beside the model (default: this machine's CPUs less "
        "one, at most 16; 0: all in the main thread)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument("--bf16", action="store_true", help="run under bf16 autocast (CUDA only)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pytorch",
        help="onnxruntime: run the model's exported graphs (--model: an export folder, or a model folder or Hub "
        "repository holding them in onnx/), with the same pre- and post-processing",
    )
    parser.add_argument(
        "--onnx_precision",
        choices=PRECISIONS,
        default="fp32",
        help="which exported graphs --backend onnxruntime runs: fp32 (PyTorch's maps), int8 (about twice as fast "
        "on a CPU, masks nearly the same), fp16",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo the images done before")
    args = parser.parse_args(argv)
    args.device_given = args.device
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check a flag's value allows before any image or model is read; each ends with one sentence."""
    if not args.images and not args.image_list:
        parser.error("give the images: --images (folders, patterns or files) or --image_list FILE")
    for flag, file in (("--image_list", args.image_list), ("--prompts_file", args.prompts_file)):
        if file and not Path(file).is_file():
            parser.error(f"{flag} {file}: no such file")
    if not (args.prompts or args.prompts_file or args.example_images):
        parser.error("give at least one prompt: --prompts, --prompts_file or --example_images")
    for k, phrase in enumerate(args.prompts, start=1):
        if not phrase.strip():
            parser.error(f"--prompts: prompt {k} is empty (give a phrase, or --example_images for an image)")
    if not 0 < args.threshold < 1:
        parser.error("--threshold must lie strictly between 0 and 1")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir} is a file, not a folder")
    args.device = pick_device(parser, args.device)
    args.num_workers = worker_count(parser, args.num_workers, "--num_workers")
    if args.backend == "onnxruntime":
        check_onnx_args(parser, args)
        return
    if args.bf16 and args.device.type != "cuda":
        parser.error(f"--bf16 runs on CUDA only, and this run uses {args.device}")
    problem = model_source_problem(args.model)
    if problem:
        parser.error(f"--model {args.model}: {problem}")


def check_onnx_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The onnxruntime backend: the runtime installed, graphs of the precision asked, a provider for the
    device. Sets `args.onnx_folder` and `args.providers`."""
    try:
        import onnxruntime as ort
    except ImportError:
        parser.error("--backend onnxruntime needs onnxruntime: pip install -e '.[onnx]'")
    if args.bf16:
        parser.error("--bf16 is the pytorch backend's: with onnxruntime choose --onnx_precision fp16 or int8")
    try:
        args.onnx_folder = onnx_folder(args.model)
    except ValueError as error:
        parser.error(f"--model {error}")
    settings = json.loads((args.onnx_folder / SETTINGS_FILE).read_text(encoding="utf-8"))
    if args.onnx_precision not in settings.get("graphs", {}):
        parser.error(
            f"--onnx_precision {args.onnx_precision}: {args.onnx_folder} holds {', '.join(settings['graphs'])} "
            f"graphs only (export with --quantize {args.onnx_precision})"
        )
    available = ort.get_available_providers()
    if args.device.type == "cuda" and "CUDAExecutionProvider" not in available:
        if args.device_given == "auto":
            args.device = torch.device("cpu")
        else:
            parser.error(
                f"--device {args.device}: this onnxruntime has no CUDA provider ({', '.join(available)})"
            )
    args.providers = ["CUDAExecutionProvider"] if args.device.type == "cuda" else []
    args.providers.append("CPUExecutionProvider")


def pick_device(parser: argparse.ArgumentParser, given: str) -> torch.device:
    if given == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(given)
    except (RuntimeError, ValueError):
        parser.error(f"--device {given} is not a device (auto, cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {given}: this machine has no CUDA GPU (torch sees none)")
    return device


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """A list file's entries with their line numbers: stripped, blank lines and # comments left out."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [
        (n, line.strip())
        for n, line in enumerate(lines, start=1)
        if line.strip() and not line.strip().startswith("#")
    ]


# ----------------------------------------------------------------------------------------------------
# Prompts and the names of their files
# ----------------------------------------------------------------------------------------------------


def load_prompts(args: argparse.Namespace) -> list[Prompt]:
    """The phrases, then the prompts file's, then the example images (read now: a bad one ends the run)."""
    from modeling_clipseg_custom import is_url, read_image

    phrases = [p.strip() for p in args.prompts]
    if args.prompts_file:
        phrases += [line for _, line in read_lines(args.prompts_file)]
    for phrase in phrases:
        if is_url(phrase):  # predict() would read it as an example image
            raise CommandError(f"the prompt {phrase} is a URL: give an example image with --example_images")
    entries = [(p, "text", p, p) for p in phrases]
    for path in args.example_images:
        try:
            image = read_image(path, f"--example_images {path}")
        except ValueError as error:
            raise CommandError(str(error)) from error
        entries.append((Path(path).stem, "image", path, image))
    if not entries:
        raise CommandError(
            f"--prompts_file {args.prompts_file} holds no prompt (only blank lines or comments)"
        )
    slugs = unique_slugs([name for name, *_ in entries])
    return [
        Prompt(name, kind, source, value, slug) for (name, kind, source, value), slug in zip(entries, slugs)
    ]


def slugify(text: str) -> str:
    """A file-name part for a prompt: lower-case ASCII letters, digits and `_` (accents dropped, at most
    MAX_SLUG characters), never a name Windows refuses; "prompt" when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[:MAX_SLUG].rstrip("_") or "prompt"
    return f"{slug}_" if slug in RESERVED_NAMES else slug


def output_names(slug: str) -> tuple[str, str, str]:
    """The mask, overlay and probability file names of a prompt."""
    return f"{slug}.png", f"{slug}_overlay.jpg", f"{slug}_probability.png"


def unique_slugs(names: Iterable[str]) -> list[str]:
    """One slug per prompt, none of whose files has the name of another prompt's (`cat` and `Cat!` give `cat`
    and `cat_2`; `cat probability` cannot take `cat`'s probability file)."""
    taken: set[str] = set()
    slugs = []
    for name in names:
        base = slug = slugify(name)
        count = 1
        while taken.intersection(output_names(slug)):
            count += 1
            slug = f"{base}_{count}"
        taken.update(output_names(slug))
        slugs.append(slug)
    return slugs


# ----------------------------------------------------------------------------------------------------
# Images: found, named, read
# ----------------------------------------------------------------------------------------------------


def image_extensions() -> set[str]:
    """The file extensions of the formats Pillow can open."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def find_images(args: argparse.Namespace) -> list[Path]:
    """The images to segment, in the order given (a folder's and a pattern's sorted), each once. Folders and
    patterns give image files by extension, never hidden files nor anything inside --output_dir; files
    named one by one are taken as they are (one that is no image is reported when read)."""
    exclude = Path(args.output_dir).resolve()
    found: list[Path] = []
    for entry in args.images:
        found += images_of(entry, args.recursive, exclude)
    if args.image_list:
        found += listed_images(args.image_list)
    if not found:
        raise CommandError(f"no image found in {given_images(args)}{search_hint(args)}")
    seen: set[Path] = set()
    unique = []
    for path in found:  # each file once, under the first of its spellings
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def images_of(entry: str, recursive: bool, exclude: Path) -> list[Path]:
    entry = os.path.expanduser(entry)  # a quoted pattern reaches us with its ~
    path = Path(entry)
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = sorted(path.rglob("*") if recursive else path.iterdir())
        # Hidden files and folders (.DS_Store, ._photo.jpg, .git) are no one's photos.
        candidates = [c for c in candidates if not any(p.startswith(".") for p in c.relative_to(path).parts)]
    elif any(char in entry for char in "*?["):
        candidates = sorted(Path(match) for match in glob.glob(entry, recursive=True))  # hidden ones left out
    else:
        raise CommandError(f"--images {entry}: no such file or folder, and no file matches it as a pattern")
    extensions = image_extensions()
    return [
        found
        for found in candidates
        if found.is_file()
        and found.suffix.lower() in extensions
        and not found.resolve().is_relative_to(exclude)  # this run's own masks, on a rerun
    ]


def listed_images(list_file: str) -> list[Path]:
    base = Path(list_file).parent
    paths = []
    for number, line in read_lines(list_file):
        path = base / Path(line).expanduser()
        if not path.is_file():
            raise CommandError(f"--image_list {list_file}, line {number}: {line} is not a file")
        paths.append(path)
    return paths


def given_images(args: argparse.Namespace) -> str:
    given = [f"--images {' '.join(args.images)}"] if args.images else []
    return " or ".join(given + ([f"--image_list {args.image_list}"] if args.image_list else []))


def search_hint(args: argparse.Namespace) -> str:
    if not args.recursive and any(Path(entry).is_dir() for entry in args.images):
        return " (folders are searched for image files by extension; --recursive searches their subfolders)"
    return ""


def folder_names(paths: list[Path]) -> list[str]:
    """Each image's output folder: its file stem, with a hash of its full path when another image has the same
    stem (`a/1.jpg` and `b/1.jpg`), so that reruns name it alike."""
    counts = Counter(path.stem for path in paths)
    return [
        path.stem
        if counts[path.stem] == 1
        else f"{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
        for path in paths
    ]


def read_or_reason(path: Path) -> tuple[Image.Image | None, str | None]:
    """The decoded image, or why it could not be read (it is then skipped, not the run ended)."""
    from modeling_clipseg_custom import read_image

    try:
        return read_image(path, "skipped image"), None
    except ValueError as error:
        return None, str(error)


# ----------------------------------------------------------------------------------------------------
# Outputs of one image
# ----------------------------------------------------------------------------------------------------


def save_atomically(image: Image.Image, path: Path, **options: Any) -> int:
    """Write `image` under a temporary name, then rename it: a killed run never leaves a half file that looks
    done. Returns the file's size (the image's record keeps it: a damaged file is redone)."""
    buffer = io.BytesIO()
    image.save(buffer, **options)
    partial = partial_path(path)
    partial.write_bytes(buffer.getvalue())
    os.replace(partial, path)
    return len(buffer.getvalue())


def overlay(photo: Image.Image, mask: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """The photo with the mask tinted in `colour` and outlined in it, the rest dimmed: the mask stands out
    whatever its colour and the photo's (the outline's width grows with the image)."""
    from scipy.ndimage import maximum_filter, minimum_filter

    pixels = np.array(photo.convert("RGB"), dtype=np.float32)  # grey, RGBA, palette, CMYK photos too
    pixels[mask] = pixels[mask] * (1 - TINT) + np.asarray(colour, dtype=np.float32) * TINT
    pixels[~mask] *= DIM
    width = 2 * max(1, round(min(mask.shape) / 200)) + 1
    as_bytes = mask.view(np.uint8)
    outline = maximum_filter(as_bytes, size=width) != minimum_filter(as_bytes, size=width)
    pixels[outline] = colour
    return Image.fromarray(pixels.round().astype(np.uint8))


def write_outputs(
    folder: Path,
    item: tuple[int, Path, str],
    image: Image.Image,
    maps: torch.Tensor | np.ndarray,
    prompts: list[Prompt],
    settings: dict,
) -> list[dict[str, Any]]:
    """An image's files per prompt, then its record (last: the image is done); returns its scores rows."""
    _, path, key = item
    (folder / key).mkdir(parents=True, exist_ok=True)
    rows, sizes = [], {}
    for k, (prompt, probability) in enumerate(zip(prompts, np.asarray(maps))):
        row, written = write_prompt_files(folder, key, image, probability, prompt, k, settings)
        rows.append(row)
        sizes.update(written)
    record = {"image": source_of(path), "settings": settings, "files": sizes, "rows": rows}
    write_text_atomically(folder / key / RECORD, json.dumps(record))
    return rows


def write_prompt_files(
    folder: Path,
    key: str,
    image: Image.Image,
    probability: np.ndarray,
    prompt: Prompt,
    k: int,
    settings: dict,
) -> tuple[dict[str, Any], dict[str, int]]:
    """The mask, overlay (and probabilities) of the k-th prompt; its scores row (paths from the output folder)
    and the files' sizes."""
    mask = probability > settings["threshold"]
    mask_name, overlay_name, probability_name = (f"{key}/{name}" for name in output_names(prompt.slug))
    sizes = {
        mask_name: save_atomically(
            Image.fromarray(mask.astype(np.uint8) * 255), folder / mask_name, format="PNG"
        ),
        overlay_name: save_atomically(
            overlay(image, mask, COLOURS[k % len(COLOURS)]), folder / overlay_name, format="JPEG", quality=90
        ),
    }
    if settings["probabilities"]:
        scaled = (probability.astype(np.float64) * 65535).round().astype(np.uint16)
        sizes[probability_name] = save_atomically(
            Image.fromarray(scaled), folder / probability_name, format="PNG"
        )
    row = {
        "prompt": prompt.name,
        "prompt_type": prompt.kind,
        "score": float(probability.max()),
        "mask_area": float(mask.mean()),
        "mask": mask_name,
        "overlay": overlay_name,
        "probabilities": probability_name if settings["probabilities"] else None,
    }
    return row, sizes


def source_of(path: Path) -> dict[str, Any]:
    """Which file an image's outputs were made from: another image of the same stem, or the same file changed
    since, is redone."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def finished_rows(folder: Path, key: str, path: Path, settings: dict) -> list[dict[str, Any]] | None:
    """The rows of an image done before from this file with these settings, all its files there at their written
    size; None when it must be (re)done."""
    try:
        record = json.loads((folder / key / RECORD).read_text(encoding="utf-8"))
        if record["settings"] != settings or record["image"] != source_of(path):
            return None
        if all((folder / name).stat().st_size == size for name, size in record["files"].items()):
            return record["rows"]
    except (OSError, ValueError, KeyError, TypeError):  # missing, damaged, or of another version
        pass
    return None


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a run did: scores rows per image (in input order), the images skipped and why."""

    rows: dict[int, list[dict[str, Any]]]
    skipped: list[dict[str, str]]
    done_before: int


def load_model(spec: str, device: torch.device) -> tuple[Any, Any]:
    """Our model (a CIDAS checkpoint loads into it too) and its processor."""
    from transformers import AutoProcessor

    from modeling_clipseg_custom import ClipSegCustomModel

    try:
        model = ClipSegCustomModel.from_pretrained(spec)
        processor = AutoProcessor.from_pretrained(spec)
    except (OSError, ValueError, KeyError) as error:
        raise load_error(f"--model {spec} could not be loaded as a CLIPSeg model", spec, error) from error
    return model.to(device).eval(), processor


def load_predictor(args: argparse.Namespace) -> Callable[[list, list], list]:
    """`predict(images, prompt_lists)` -> maps per image, on the backend asked."""
    if args.backend == "onnxruntime":
        from .onnx_runtime import OnnxClipSeg

        try:
            runner = OnnxClipSeg(args.onnx_folder, args.onnx_precision, providers=args.providers)
        except Exception as error:  # onnxruntime's load errors are each their own type
            raise CommandError(
                f"--model {args.onnx_folder}: onnxruntime could not load its {args.onnx_precision} graphs "
                f"({str(error).splitlines()[0]})"
            ) from error
        return lambda images, prompt_lists: runner.predict(images, prompt_lists, batch_size=len(images))
    model, processor = load_model(args.model, args.device)
    return lambda images, prompt_lists: model.predict(images, prompt_lists, processor, len(images))


def run_settings(args: argparse.Namespace, prompts: list[Prompt]) -> dict[str, Any]:
    """What an image's outputs depend on: a rerun with other settings redoes it."""
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    backend = {"backend": f"onnxruntime {args.onnx_precision}"} if args.backend == "onnxruntime" else {}
    return {
        "model": model,
        **backend,
        "threshold": args.threshold,
        "probabilities": args.save_probabilities,
        "prompts": [
            [p.kind, str(Path(p.source).resolve()) if p.kind == "image" else p.source, p.slug]
            for p in prompts
        ],
    }


def submit(pool: ThreadPoolExecutor | None, function: Callable, *args: Any) -> Future:
    """`pool.submit`, or the call made at once when there is no pool (`--num_workers 0`)."""
    if pool is not None:
        return pool.submit(function, *args)
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as error:
        future.set_exception(error)
    return future


def read_ahead(pool: ThreadPoolExecutor | None, items: list, ahead: int) -> Iterator[tuple[Any, Future]]:
    """Each item with the future of its decoded image, `ahead` items read in advance."""
    queue: deque = deque()
    for item in items:
        queue.append((item, submit(pool, read_or_reason, item[1])))
        if len(queue) > ahead:
            yield queue.popleft()
    yield from queue


def batches(
    pool: ThreadPoolExecutor | None, todo: list, batch_size: int, skipped: list, bar: tqdm
) -> Iterator[list[tuple[Any, Image.Image]]]:
    """Batches of decoded images; one that does not decode is named, counted and left out."""
    batch = []
    for item, future in read_ahead(pool, todo, 2 * batch_size):
        image, reason = future.result()
        if image is None:
            logger.warning(reason)
            skipped.append({"image": str(item[1]), "reason": reason})
            bar.update(1)
            continue
        batch.append((item, image))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def segment(
    args: argparse.Namespace, images: list[Path], keys: list[str], prompts: list[Prompt], settings: dict
) -> Outcome:
    """Every image not done before: predicted in batches, its files written as soon as its batch is done."""
    outcome = Outcome(rows={}, skipped=[], done_before=0)
    todo = []
    for index, (path, key) in enumerate(zip(images, keys)):
        earlier = None if args.overwrite else finished_rows(Path(args.output_dir), key, path, settings)
        if earlier is None:
            todo.append((index, path, key))
        else:
            outcome.rows[index] = earlier
    outcome.done_before = len(outcome.rows)
    if outcome.done_before:
        logger.info(
            f"{plural(outcome.done_before, 'image')} done before with these settings: kept (--overwrite "
            "redoes them)"
        )
    if todo:
        predict_all(args, todo, prompts, settings, outcome)
    return outcome


def predict_all(
    args: argparse.Namespace, todo: list, prompts: list[Prompt], settings: dict, outcome: Outcome
) -> None:
    """The model on `todo` in batches, images read and outputs written by `--num_workers` threads beside it."""
    folder, predict = Path(args.output_dir), None
    pool = ThreadPoolExecutor(args.num_workers) if args.num_workers else None
    writes: deque = deque()
    with pool or nullcontext(), tqdm(total=len(todo), unit="image", desc="Segmenting") as bar:
        for batch in batches(pool, todo, args.batch_size, outcome.skipped, bar):
            if predict is None:  # loaded for the first image that decodes: reruns over broken ones need none
                predict = load_predictor(args)
            with precision(args):
                maps = predict([image for _, image in batch], [[p.value for p in prompts]] * len(batch))
            for (item, image), image_maps in zip(batch, maps):
                write = submit(pool, write_outputs, folder, item, image, image_maps, prompts, settings)
                writes.append((item[0], write))
            # Finished writes are collected as they come; at most two batches' maps wait in memory.
            while len(writes) > 2 * args.batch_size or (writes and writes[0][1].done()):
                collect(writes.popleft(), outcome, bar)
        while writes:
            collect(writes.popleft(), outcome, bar)


def precision(args: argparse.Namespace) -> Any:
    return torch.autocast(args.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()


def collect(write: tuple[int, Future], outcome: Outcome, bar: tqdm) -> None:
    index, future = write
    outcome.rows[index] = future.result()  # a failed write (a full disk) ends the run here
    bar.update(1)


def write_scores(folder: Path, images: list[Path], outcome: Outcome, settings: dict) -> None:
    """scores.csv and scores.json: every image's rows in input order, the skipped images and why."""
    rows = [
        {"image": str(images[index]), **row} for index in sorted(outcome.rows) for row in outcome.rows[index]
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "probabilities": row["probabilities"] or ""} for row in rows)
    write_text_atomically(folder / "scores.csv", buffer.getvalue())
    payload = {
        "model": settings["model"],
        "backend": settings.get("backend", "pytorch"),
        "threshold": settings["threshold"],
        "columns": f"{SCORE_HELP}; file paths are relative to this folder",
        "prompts": [
            {"kind": kind, "source": source, "slug": slug} for kind, source, slug in settings["prompts"]
        ],
        "rows": rows,
        "skipped": outcome.skipped,
    }
    write_text_atomically(folder / "scores.json", json.dumps(payload, indent=2))


def run(argv: list[str] | None = None) -> Outcome:
    """The command without its error policy (`main` adds it): raises `CommandError` on bad input."""
    args = parse_args(argv)
    setup_logging()
    prompts = load_prompts(args)
    images = find_images(args)
    keys = folder_names(images)
    settings = run_settings(args, prompts)
    folder = Path(args.output_dir)
    with removed_if_left_empty(folder):
        outcome = segment(args, images, keys, prompts, settings)
        if not outcome.rows:
            raise CommandError(
                f"no image was segmented: {'the' if len(images) == 1 else 'all'} {plural(len(images), 'image')} "
                f"found did not decode (named above)"
            )
        write_scores(folder, images, outcome, settings)
    logger.info(summary(outcome, folder))
    return outcome


def summary(outcome: Outcome, folder: Path) -> str:
    earlier = f" ({outcome.done_before:,} of them in an earlier run)" if outcome.done_before else ""
    line = f"{plural(len(outcome.rows), 'image')} segmented{earlier}"
    where = f"masks and overlays in {folder}/, scores in {folder / 'scores.csv'} and {folder / 'scores.json'}"
    if outcome.skipped:
        skipped = f"{len(outcome.skipped):,} skipped (did not decode)"
        return f"{line}, {skipped}: see the warnings above and 'skipped' in {folder / 'scores.json'}; {where}"
    return f"{line}; {where}"


def main(argv: list[str] | None = None) -> int:
    """The `clipseg-predict` command: exit code 0 when any image was segmented, 2 with one sentence for bad
    input (a flag, the model, no image, no image that decodes), 1 when the run could not finish."""
    run_command(lambda: run(argv))
    return 0


__all__ = ["main", "run", "slugify", "unique_slugs"]
