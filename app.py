"""The web demo: segment a picture by text prompts or an example image with a model of this project (Gradio).

    python app.py --model demo_output                      # then open http://127.0.0.1:7860
    python app.py --model you/clipseg-rd64-phrasecut --share

Pick an example picture or upload one, type prompts (comma-separated) and/or give an example image as a visual
prompt: the page shows each prompt's heat map and overlay, captioned with the prompt and its highest
probability, and the multi-class map (each pixel in the colour of its most probable prompt, grey where none
passes the threshold) with its legend. Moving the threshold redraws from the kept probabilities; the model
runs again only on "Segment". The pictures are drawn by `clipseg_tools.demo_views`; this file wires the page.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

try:
    import gradio as gr
except ImportError as missing:  # the optional [demo] extra
    raise SystemExit("app.py needs gradio: pip install -e '.[demo]'") from missing

from clipseg_tools.demo_views import class_map_picture, fit_image, prompt_list, prompt_views

# The model served when --model is not given: a Space's copy of this file names its model here.
DEFAULT_MODEL: str | None = None
HERE = Path(__file__).resolve().parent
# Pictures of the synthetic PhraseCut writer (examples/make_examples.py), with prompts the demo model knows.
EXAMPLES = (
    ("shapes_1.jpg", "red circle, black square, blue triangle"),
    ("shapes_2.jpg", "white star, purple triangle, yellow triangle"),
    ("shapes_3.jpg", "red hexagon, yellow circle, purple hexagon"),
)
DEFAULT_THRESHOLD = 0.3
VISUAL_PROMPT_LABEL = "example image"
# System fonts: the default theme fetches its font from the web, which an offline machine waits for.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)


def load_model(source: str) -> tuple[Any, Any]:
    """The model (in eval mode, on the GPU if there is one) and its processor, from a folder or Hub id."""
    from transformers import AutoProcessor

    try:
        from modeling_clipseg_custom import ClipSegCustomModel
    except ImportError:  # a Space: the model's code comes with the model from the Hub
        from transformers import AutoModel

        model = AutoModel.from_pretrained(source, trust_remote_code=True)
    else:  # in the project: its own class, which also loads CIDAS checkpoints
        model = ClipSegCustomModel.from_pretrained(source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), AutoProcessor.from_pretrained(source)


class Segmenter:
    """What the page's buttons call: the model runs in `segment`, `redraw` reuses its probabilities."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model, self.processor = model, processor

    def segment(
        self, image: Image.Image | None, text: str, visual_prompt: Image.Image | None, threshold: float
    ) -> tuple[list, Image.Image, dict]:
        """Gallery items, multi-class map, and the state that `redraw` needs."""
        if image is None:
            raise gr.Error("Pick an example picture or upload one.")
        prompts, labels = prompts_and_labels(text, visual_prompt)
        picture = fit_image(image)
        with torch.inference_mode():
            probs = self.model.predict(picture, prompts, processor=self.processor)[0]
        state = {"image": picture, "probs": probs.float().numpy(), "labels": labels}
        return (*views(state, threshold), state)

    def redraw(self, state: dict | None, threshold: float) -> tuple[Any, Any]:
        """The overlays and the multi-class map at a new threshold, without the model."""
        if not state:
            return gr.skip(), gr.skip()
        return views(state, threshold)


def prompts_and_labels(text: str, visual_prompt: Image.Image | None) -> tuple[list, list[str]]:
    """The typed phrases, then the example image if given; and their names for the captions and legend."""
    labels = prompt_list(text)
    prompts: list = list(labels)
    if visual_prompt is not None:
        prompts.append(visual_prompt.convert("RGB"))
        labels.append(VISUAL_PROMPT_LABEL)
    if not prompts:
        raise gr.Error("Type a prompt (several: separate them with commas) or give an example image.")
    return prompts, labels


def views(state: dict, threshold: float) -> tuple[list, Image.Image]:
    image, probs, labels = state["image"], state["probs"], state["labels"]
    gallery = prompt_views(image, probs, labels, threshold)
    return gallery, class_map_picture(image, probs, threshold, labels)


def build_app(model_source: str | Path) -> gr.Blocks:
    """The page for the model in `model_source` (a folder or Hub id), loaded once."""
    segmenter = Segmenter(*load_model(str(model_source)))
    with gr.Blocks(title="CLIPSeg segmentation demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"# Text- and image-prompted segmentation\nModel: {model_link(model_source)}. Pick or upload a "
            "picture, name what to find (comma-separated prompts) and/or give an example image, then **Segment**."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image, text, visual, threshold, button = input_controls()
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="Each prompt: heat map and overlay",
                    columns=2,
                    object_fit="contain",
                    elem_id="results",
                )
                classes = gr.Image(
                    type="pil", label="Multi-class map", interactive=False, format="png", elem_id="class-map"
                )
        state = gr.State()
        inputs, outputs = [image, text, visual, threshold], [gallery, classes, state]
        button.click(segmenter.segment, inputs, outputs)
        text.submit(segmenter.segment, inputs, outputs)
        threshold.change(segmenter.redraw, [state, threshold], [gallery, classes], trigger_mode="always_last")
    return app


def input_controls() -> tuple[gr.Image, gr.Textbox, gr.Image, gr.Slider, gr.Button]:
    """The picture, the prompts, the example image, the threshold and the button, with the example pictures."""
    image = gr.Image(type="pil", label="Picture", sources=["upload", "clipboard"], elem_id="picture")
    text = gr.Textbox(
        label="Prompts (comma-separated)", placeholder="red circle, blue square", elem_id="prompts"
    )
    visual = gr.Image(
        type="pil", label="Example image (a visual prompt, optional)", height=160, elem_id="visual"
    )
    threshold = gr.Slider(0, 1, DEFAULT_THRESHOLD, step=0.01, label="Threshold", elem_id="threshold")
    button = gr.Button("Segment", variant="primary", elem_id="segment")
    gr.Examples(
        [[str(HERE / "examples" / name), prompts] for name, prompts in EXAMPLES],
        inputs=[image, text],
        label="Example pictures",
    )
    return image, text, visual, threshold, button


def model_link(source: str | Path) -> str:
    """A local folder by its name (its path says nothing to a visitor), a Hub id as a link to its page."""
    if Path(source).is_dir():
        return f"`{Path(source).resolve().name}`"
    return f"[{source}](https://huggingface.co/{source})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        required=DEFAULT_MODEL is None,
        help="a model folder of this project (e.g. demo_output) or a Hub id",
    )
    # Gradio's own variables first: a Space sets them to the address and port it serves.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        app = build_app(args.model)
    except (OSError, ValueError) as error:  # a wrong folder or id, no network: one sentence, not a traceback
        print(f"error: --model {args.model} could not be loaded ({error})", file=sys.stderr)
        sys.exit(2)  # the project's code for input to fix
    app.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME)


if __name__ == "__main__":
    main()
