"""Time this project's CLIPSeg against transformers' `CLIPSegForImageSegmentation` on the same work.

    python benchmarks/benchmark.py --device cpu --batch_size 8               # this machine
    python benchmarks/benchmark.py --device cuda --batch_size 64 --dtype bf16 # a GPU

Both models are built from the same config with the same (random) weights, in the same process, and fed
the same inputs. For each case the median of `--repeats` timed runs after `--warmup` runs is reported
(the device synchronised around each), in images (or image-phrase pairs) per second, with the ratio.

Cases:
- train_step:    forward + backward + AdamW on the decoder, one phrase per image;
- inference:     forward only, one phrase per image;
- prompts_K:     K phrases per image, forward (transformers repeats each image K times, as it must);
- train_step_K:  the training step with K phrases per image;
- stages:        where a training step's time goes (text tower, vision tower, decoder + loss, backward,
                 optimizer), on the device and on the host issuing it;
- loop:          training steps fed by the project's data pipeline (JPEG decode once per image, masks,
                 crop, collate; --num_workers processes) from a prepared synthetic PhraseCut with images of
                 real PhraseCut's size, against the bare step on the same batch size.
Variants of ours (`--variants`, each timed against the same transformers run):
- eager:                 as loaded (float32 CLIP under the chosen autocast);
- lowp:                  the frozen CLIP cast to --dtype (`cast_backbone`, what run_train.py does by default
                         under bf16 mixed precision), the decoder in float32 under autocast;
- lowp_compile:          lowp with the frozen towers compiled (`compile_backbone`);
- lowp_compile_convhead: lowp_compile with the head's transposed convolutions run by cuDNN (the layers'
                         stock forward) instead of as matrix products (`PatchTransposedConv2d`);
- lowp_compile_decoder:  lowp_compile with the decoder and loss compiled too (`compile_decoder`, checked against
                         eager gradients first; run_train.py --compile);
- lowp_graphs:           lowp_compile_decoder in "reduce-overhead" mode (CUDA graphs; run_train.py --compile
                         --compile_mode reduce-overhead);
- lowp_autotune:         lowp_compile_decoder with the towers compiled in "max-autotune-no-cudagraphs" mode.
Accuracy: each variant's logits against transformers' in float32 without autocast (relative L2 error), next to
transformers' own autocast error, once per case.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import platform
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import CLIPSegForImageSegmentation  # noqa: E402

from configuration import ClipSegCustomConfig  # noqa: E402
from modeling_clipseg_custom import ClipSegCustomModel, PatchTransposedConv2d  # noqa: E402

# name -> (CLIP cast to the autocast dtype, torch.compile options for the towers or None,
#          torch.compile options for the decoder and loss or None, the head's transposed convolutions as cuDNN
#          convolutions instead of matrix products)
VARIANTS = {
    "eager": (False, None, None, False),
    "lowp": (True, None, None, False),
    "lowp_compile": (True, {}, None, False),
    "lowp_compile_convhead": (True, {}, None, True),
    "lowp_compile_decoder": (True, {}, {}, False),
    "lowp_graphs": (True, {"mode": "reduce-overhead"}, {"mode": "reduce-overhead"}, False),
    "lowp_autotune": (True, {"mode": "max-autotune-no-cudagraphs"}, {}, False),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step")
    parser.add_argument("--prompts_per_image", type=int, default=4)
    parser.add_argument("--text_length", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cases", nargs="+", default=["train_step", "inference", "prompts_K", "train_step_K"]
    )
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=list(VARIANTS))
    parser.add_argument("--loop_variant", help="the variant fed by the data pipeline (default: the last)")
    parser.add_argument("--num_workers", type=int, default=2, help="data-loading processes for the loop case")
    parser.add_argument("--loop_steps", type=int, default=4, help="timed steps of the loop case")
    parser.add_argument(
        "--loop_warmup",
        type=int,
        help="loop steps before timing (default --warmup); more than the "
        "workers' prefetched batches (2 per worker), or the timing includes batches made before it started",
    )
    parser.add_argument("--loop_images", type=int, default=400, help="synthetic images written for the loop")
    parser.add_argument(
        "--data_dir", help="PhraseCut folder for the loop case (default: synthetic, written once)"
    )
    parser.add_argument(
        "--loop_shrink", action="store_true", help="loop case: training images stored at the model's size"
    )
    parser.add_argument("--image_size", type=int, default=352)
    parser.add_argument(
        "--cudnn_benchmark", action="store_true", help="torch.backends.cudnn.benchmark for both models"
    )
    parser.add_argument(
        "--profile", help="write a torch.profiler table of the loop variant's training step to this file"
    )
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.dtype == "fp32" and any(VARIANTS[v][0] for v in args.variants):
        parser.error("--variants lowp* cast the backbone to --dtype: use them with --dtype bf16")
    return args


def build_models(device: torch.device) -> tuple[ClipSegCustomModel, CLIPSegForImageSegmentation]:
    """Ours and transformers', default (CIDAS rd64-refined) architecture, identical weights."""
    torch.manual_seed(0)
    ours = ClipSegCustomModel(ClipSegCustomConfig(decoder_dropout=0.0))
    theirs = CLIPSegForImageSegmentation(ours.config.to_clipseg_config())
    theirs.load_state_dict(ours.state_dict())
    theirs.clip.requires_grad_(False)  # frozen as in any CLIPSeg training: same trainable set as ours
    return ours.to(device).eval(), theirs.to(device).eval()


def make_variant(base: ClipSegCustomModel, name: str, dtype: torch.dtype | None) -> ClipSegCustomModel:
    lowp, towers, decoder, conv_head = VARIANTS[name]
    model = copy.deepcopy(base)
    if lowp:
        model.cast_backbone(dtype)
    if towers is not None:
        model.compile_backbone(**towers)
    if decoder is not None:
        model.compile_decoder(**decoder)
    if conv_head:
        for layer in model.decoder.transposed_convolution.modules():
            if isinstance(layer, PatchTransposedConv2d):
                layer.forward = partial(torch.nn.ConvTranspose2d.forward, layer)
    return model


def inputs(args, device, prompts_per_image: int, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images, prompts, size = args.batch_size, args.batch_size * prompts_per_image, args.image_size
    ids = torch.randint(1, 49000, (prompts, args.text_length), generator=generator)
    ids[:, 0], ids[:, -1] = 49406, 49407
    return {
        "pixel_values": torch.randn(images, 3, size, size, generator=generator).to(device),
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "image_index": torch.arange(images).repeat_interleave(prompts_per_image).to(device),
        "labels": (torch.rand(prompts, size, size, generator=generator) > 0.8).float().to(device),
    }


def ours_call(model, batch, with_labels):
    return model(
        pixel_values=batch["pixel_values"],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        image_index=batch["image_index"],
        labels=batch["labels"] if with_labels else None,
    )


def theirs_call(model, batch, with_labels):
    return model(
        pixel_values=batch["pixel_values"][batch["image_index"]],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"] if with_labels else None,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeats) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def back_to_back(fn, device, repeats) -> float:
    """Seconds per run of `repeats` runs issued one after another, the device synchronised only before and
    after: what a training loop that never waits for a step sees (the host queues the next step while the
    device finishes this one). After `timed`, so warmed up."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def bare_optimizer(model) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters, fused on a GPU (transformers' Trainer default there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=params[0].is_cuda)


def begin_step(model) -> None:
    """Tells CUDA graphs (compile mode "reduce-overhead") that a new step begins: the outputs of the previous
    one may be overwritten."""
    if getattr(model, "cuda_graphs", False):  # transformers' model has none
        torch.compiler.cudagraph_mark_step_begin()


def train_step_fn(model, call, batch, autocast):
    optimizer = bare_optimizer(model)
    # Once, as a training loop does (not per step): setting the mode walks every module, host time that would
    # otherwise sit in each timed step of both models. The step is timed right after this.
    model.train()
    return partial(bare_step, model, call, batch, autocast, optimizer)


def bare_step(model, call, batch, autocast, optimizer) -> None:
    """Forward with the loss, backward, optimizer step: the step every training case times."""
    begin_step(model)
    with autocast():
        loss = call(model, batch, True).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def forward_fn(model, call, batch, autocast):
    model.eval()  # once, as train_step_fn

    def forward():
        with torch.no_grad(), autocast():
            return call(model, batch, False).logits

    return forward


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.float() - reference).norm() / reference.norm())


def reference_logits(theirs, batch) -> torch.Tensor:
    """transformers' logits in float32, no autocast: what every fast path is measured against."""
    with torch.no_grad():
        return theirs_call(theirs.eval(), batch, False).logits.float()


def decoder_gradient_error(model, reference_model, batch, autocast) -> float:
    """Relative L2 difference of the decoder's gradients (one loss.backward) between two models with equal
    decoder weights: checks a compiled decoder's backward against eager."""
    grads = []
    for candidate in (model, reference_model):
        candidate.train()
        with autocast():
            loss = ours_call(candidate, batch, True).loss
        loss.backward()
        grads.append(torch.cat([p.grad.float().flatten() for p in candidate.decoder.parameters()]))
        candidate.zero_grad(set_to_none=True)
    return relative_error(grads[0], grads[1])


def forward_flops_per_image(model, call, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] for k, v in batch.items()}
    one["image_index"] = torch.zeros(1, dtype=torch.long, device=one["pixel_values"].device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(model, one, False)
    return counter.get_total_flops()


def peak_memory_gb(device: torch.device, fn) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


def loop_rate(args, step, device, pad_to_multiple_of: int | None = None) -> dict[str, float]:
    """Pairs per second of training steps fed by the project's data pipeline (uint8 batches from worker
    processes, pinned on a GPU, copied without blocking and normalised on the device), and of the pipeline
    alone. `step(batch)` takes a host batch as the loader gives it."""
    from clipseg_tools.batching import PhraseIndex, TrainingOptions, TrainingSamples, training_loader
    from clipseg_tools.transforms import model_inputs

    split, tokenizer = loop_data(args)
    options = TrainingOptions(image_size=args.image_size, prompt_template="plain")
    samples = TrainingSamples(split, PhraseIndex.from_dataset(split), options)
    warmup = args.warmup if args.loop_warmup is None else args.loop_warmup
    needed = (warmup + args.loop_steps) * args.batch_size
    if len(samples) < needed:
        raise ValueError(f"the loop needs {needed} phrases in one epoch; --loop_images gives {len(samples)}")
    loader = training_loader(
        samples,
        tokenizer,
        args.text_length,
        images_per_batch=args.batch_size,
        device=device,
        num_workers=args.num_workers,
        seed=0,
        pad_to_multiple_of=pad_to_multiple_of,
        persistent_workers=False,  # each of the two measurements (fed steps, the data alone) starts its workers
    )

    def run(steps: int, train: bool) -> float:
        batches = iter(loader)
        pairs, start = 0, None
        for index in range(warmup + steps):
            if index == warmup:
                synchronize(device)
                start = time.perf_counter()
            batch = next(batches)
            if train:
                step(batch)
            else:
                model_inputs(batch, device)
            pairs += batch["image_index"].shape[0] if index >= warmup else 0
        synchronize(device)
        return pairs / (time.perf_counter() - start)

    return {
        "pairs_per_second": run(args.loop_steps, True),
        "data_only_pairs_per_second": run(args.loop_steps, False),
    }


def run_train_step(model, device, dtype):
    """run_train.py's own training step (`training_step`: no read-back, non-finite steps skipped on the device,
    fused AdamW with the script's default learning rate and weight decay), under an Accelerator with the
    benchmark's precision."""
    from accelerate import Accelerator

    from clipseg_tools.training import (
        RECIPE_LEARNING_RATE,
        RECIPE_WEIGHT_DECAY,
        LossTally,
        make_optimizer,
        training_step,
    )

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if dtype else "no")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, RECIPE_LEARNING_RATE, RECIPE_WEIGHT_DECAY)
    tally = LossTally.on(device)
    model.train()
    return partial(training_step, accelerator, model, optimizer, tally=tally)


def benchmark_step(model, call, device, autocast):
    """The benchmark's bare training step (`bare_step`) on a host batch."""
    from clipseg_tools.transforms import model_inputs

    optimizer = bare_optimizer(model)
    model.train()
    return lambda batch: bare_step(model, call, model_inputs(batch, device), autocast, optimizer)


def loop_data(args):
    """The prepared training split (synthetic PhraseCut-sized images unless --data_dir) and a tokenizer."""
    import tempfile

    from clipseg_tools.data import load_splits
    from clipseg_tools.demo import demo_words
    from clipseg_tools.tiny_clip import build_word_tokenizer
    from phrasecut_dataset import write_synthetic_phrasecut

    scratch = Path(tempfile.gettempdir()) / f"clipseg_benchmark_{args.loop_images}"
    data_dir = args.data_dir or scratch / "data"
    if not args.data_dir and not (scratch / "data" / "image_data_split.json").is_file():
        write_synthetic_phrasecut(
            data_dir, {"train": args.loop_images}, seed=0, min_size=375, max_size=500, overwrite=True
        )
    (split,) = load_splits(
        {"the loop's data": "train"}, data_dir=str(data_dir), cache_dir=str(scratch / "cache")
    )
    if args.loop_shrink:
        from clipseg_tools.data import shrink_images

        split = shrink_images(split, args.image_size, num_proc=args.num_workers or None)
    tokenizer = build_word_tokenizer(demo_words(), scratch / "tokenizer", max_length=args.text_length)
    return split, tokenizer


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    base, theirs = build_models(device)
    variants = {}
    for name in args.variants:
        try:
            variants[name] = make_variant(base, name, dtype)
        except Exception as error:  # noqa: BLE001 (a variant that cannot be built is reported, not fatal)
            print(f"variant {name}: could not be built: {error!r}", flush=True)
    k = args.prompts_per_image
    plans = {
        "train_step": (1, train_step_fn),
        "inference": (1, forward_fn),
        f"prompts_{k}": (k, forward_fn),
        f"train_step_{k}": (k, train_step_fn),
    }
    wanted = [c.replace("_K", f"_{k}") for c in args.cases]
    results = {
        "machine": {
            "device": str(device),
            "name": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "settings": {k2: v for k2, v in vars(args).items() if k2 != "output"},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "attention": {
            "ours": base.config._attn_implementation,
            "transformers": theirs.config._attn_implementation,
        },
        "date": time.strftime("%Y-%m-%d"),
        "cases": {},
    }
    batch1 = inputs(args, device, 1)
    results["forward_gflops_per_image"] = {
        "ours": forward_flops_per_image(base, ours_call, batch1) / 1e9,
        "transformers": forward_flops_per_image(theirs, theirs_call, batch1) / 1e9,
    }
    flops = results["forward_gflops_per_image"]
    print(
        f"forward GFLOP per image: ours {flops['ours']:.1f}, transformers {flops['transformers']:.1f}",
        flush=True,
    )
    results["compiled_decoder_gradient_error"] = check_compiled_decoders(
        variants, base, dtype, batch1, autocast
    )
    for case in wanted:
        if case == "stages":
            batch = inputs(args, device, 1)
            results["stages"] = {}
            for name, model in variants.items():
                decoder_weights = copy.deepcopy(model.decoder.state_dict())  # the steps train it
                results["stages"][name] = stage_times(model, batch, device, autocast, args.repeats)
                model.decoder.load_state_dict(decoder_weights)
                print_stages(name, results["stages"][name])
            save(args, results)
            continue
        if case == "loop":
            continue
        per_image, make = plans[case]
        batch = inputs(args, device, per_image)
        results["cases"][case] = run_case(args, case, make, batch, theirs, variants, device, autocast)
        save(args, results)
    name = args.loop_variant or list(variants)[-1]
    if "loop" in wanted:
        results["cases"]["loop"] = loop_case(
            args, variants[name], name, theirs, device, autocast, results["cases"]
        )
    save(args, results)
    if args.profile:
        try:
            profile_step(args, variants[name], inputs(args, device, 1), device, autocast)
        except Exception as failure:  # noqa: BLE001 (the timings above are saved; the profile is extra)
            print(f"profile failed: {failure!r}", flush=True)
    return results


def profile_step(args, model, batch, device, autocast) -> None:
    """Operators of three training steps by time on the device (CPU time on a CPU), to --profile; on a GPU also
    the trace (--profile + ".trace.json.gz") and where the device waited (--profile + ".gaps.txt")."""
    from torch.profiler import ProfilerActivity, profile, record_function

    step = train_step_fn(model, ours_call, batch, autocast)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(3):
            with record_function(TRACED_STEP):
                step()
                synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
    Path(args.profile).write_text(table)
    print(table.splitlines()[-2:], flush=True)
    if device.type == "cuda":
        trace = args.profile + ".trace.json"
        profiler.export_chrome_trace(trace)
        report = device_gaps(json.loads(Path(trace).read_text())["traceEvents"])
        Path(args.profile + ".gaps.txt").write_text(report)
        print(report, flush=True)
        with open(trace, "rb") as raw, gzip.open(trace + ".gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        Path(trace).unlink()


TRACED_STEP = "benchmark training step"
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_WORK = ("cpu_op", "user_annotation", "cuda_runtime")


def device_gaps(events: list[dict], min_gap_us: float = 20.0, shown: int = 8) -> str:
    """Per profiled step (a TRACED_STEP annotation, the device synchronised at its end): its wall time, the time
    the device was busy, and the longest stretches with no kernel or copy running, each with what the host was
    doing then (the host operations around the gap's middle, outermost first) and the kernel that ended it."""
    device = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") in DEVICE_WORK)
    host = [e for e in events if e.get("cat") in HOST_WORK and e.get("name") != TRACED_STEP]
    steps = sorted(
        (e for e in events if e.get("name") == TRACED_STEP and e.get("cat") == "user_annotation"),
        key=lambda e: e["ts"],
    )
    lines = []
    for number, step in enumerate(steps):
        begin, end = step["ts"], step["ts"] + step["dur"]
        gaps, busy, cursor = [], 0.0, begin
        for start, stop, name in device:
            if stop <= begin or start >= end:
                continue
            start, stop = max(start, begin), min(stop, end)
            if start - cursor >= min_gap_us:
                gaps.append((start - cursor, cursor, name))
            busy += max(0.0, stop - max(start, cursor))
            cursor = max(cursor, stop)
        if end - cursor >= min_gap_us:
            gaps.append((end - cursor, cursor, "(end of step)"))
        idle = sum(g[0] for g in gaps)
        lines.append(
            f"step {number}: wall {step['dur'] / 1e3:.2f} ms, device busy {busy / 1e3:.2f} ms "
            f"({busy / step['dur']:.0%}), {len(gaps)} gaps of {min_gap_us:.0f} us or more: {idle / 1e3:.2f} ms"
        )
        for length, start, next_kernel in sorted(gaps, reverse=True)[:shown]:
            middle = start + length / 2
            around = sorted(
                (e for e in host if e["ts"] <= middle <= e["ts"] + e["dur"]), key=lambda e: -e["dur"]
            )
            doing = " > ".join(e["name"][:60] for e in around[:5]) or "(nothing traced)"
            lines.append(
                f"  {length / 1e3:6.3f} ms at +{(start - begin) / 1e3:6.2f} ms | host: {doing} | then: {next_kernel[:60]}"
            )
    return "\n".join(lines) + "\n"


STAGES = ("text tower", "vision tower", "decoder + loss", "backward", "optimizer")
GRAPHED_STAGES = ("towers (text beside vision)", "decoder + loss", "backward", "optimizer")


def stage_times(model, batch, device, autocast, repeats: int) -> dict[str, dict[str, float]]:
    """Where one training step's time goes, per stage: the device's time between events recorded at the stage
    boundaries, and the host's time to issue the stage. Where the host's time is close to the device's, the
    host (Python and kernel launches) is the limit. Medians over `repeats` steps after warm-up, milliseconds."""
    optimizer = bare_optimizer(model)
    grid = model.token_grid(batch["pixel_values"])
    graphed = model._graphs_towers(batch["pixel_values"])  # both towers in one graph: one stage
    stages = GRAPHED_STAGES if graphed else STAGES
    model.train()

    def mark(marks: list) -> None:
        event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if event is not None:
            event.record()
        marks.append((time.perf_counter(), event))

    def step() -> list:
        marks = []
        begin_step(model)
        synchronize(device)
        with autocast():
            mark(marks)
            if graphed:
                activations, embeddings = model.tower_features(
                    batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
                )
            else:
                embeddings = model.text_embeddings(batch["input_ids"], batch["attention_mask"])
                mark(marks)
                activations = model.vision_activations(batch["pixel_values"])
            mark(marks)
            loss = model._decode(activations, embeddings, batch["image_index"], grid, batch["labels"])[1]
            mark(marks)
        loss.backward()
        mark(marks)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark(marks)
        synchronize(device)
        return marks

    for _ in range(3):
        step()
    runs = [step() for _ in range(repeats)]
    times = {}
    for i, stage in enumerate((*stages, "whole step")):
        first, last = (0, len(stages)) if stage == "whole step" else (i, i + 1)
        host = [(run[last][0] - run[first][0]) * 1e3 for run in runs]
        times[stage] = {"host_ms": statistics.median(host)}
        if device.type == "cuda":
            device_ms = [run[first][1].elapsed_time(run[last][1]) for run in runs]
            times[stage]["device_ms"] = statistics.median(device_ms)
    return times


def print_stages(name: str, times: dict[str, dict[str, float]]) -> None:
    print(f"stages of a training step, {name} (ms: device / host issuing it)", flush=True)
    for stage, t in times.items():
        print(f"{stage:>28}: {t.get('device_ms', float('nan')):8.2f} / {t['host_ms']:8.2f}", flush=True)


def check_compiled_decoders(variants, base, dtype, batch, autocast) -> dict[str, float | str]:
    """Each compiled decoder's gradients against the eager decoder's (same weights): kept only if they agree."""
    reference = make_variant(base, "lowp", dtype)
    errors = {}
    for name in [n for n in variants if VARIANTS[n][2] is not None]:
        try:
            begin_step(variants[name])
            errors[name] = decoder_gradient_error(variants[name], reference, batch, autocast)
        except Exception as failure:  # noqa: BLE001 (torch.compile failures are reported as results)
            variants.pop(name)
            print(f"{name}: compiled backward failed: {failure!r}"[:2000], flush=True)
            errors[name] = f"failed: {type(failure).__name__}: {str(failure)[:500]}"
            continue
        print(f"{name}: decoder gradient relative error vs eager {errors[name]:.2e}", flush=True)
        if not errors[name] < 2e-2:
            variants.pop(name)
    return errors


def run_case(args, case, make, batch, theirs, variants, device, autocast) -> dict:
    """Accuracy first (all models hold the same decoder weights), then timing; training cases change the
    decoders, so they are put back afterwards."""
    decoder_weights = copy.deepcopy(theirs.decoder.state_dict())
    pairs = batch["input_ids"].shape[0]
    reference = reference_logits(theirs, batch)
    errors = {}
    for name, model in variants.items():
        try:
            errors[name] = relative_error(forward_fn(model, ours_call, batch, autocast)(), reference)
        except Exception as failure:  # noqa: BLE001 (reported in the table below)
            errors[name] = failure
    theirs_error = relative_error(forward_fn(theirs, theirs_call, batch, autocast)(), reference)
    theirs_fn = make(theirs, theirs_call, batch, autocast)
    t_theirs = timed(theirs_fn, device, args.warmup, args.repeats)
    training = make is train_step_fn
    row = {
        "phrases_per_image": int(pairs // batch["pixel_values"].shape[0]),
        "pairs_per_step": pairs,
        "transformers_seconds": t_theirs,
        "transformers_pairs_per_second": pairs / t_theirs,
        "transformers_peak_memory_gb": peak_memory_gb(device, theirs_fn),
        "transformers_relative_error": theirs_error,
        "variants": {},
    }
    if training:
        row["transformers_back_to_back_pairs_per_second"] = pairs / back_to_back(
            theirs_fn, device, args.repeats
        )
    for name, model in variants.items():
        try:
            if isinstance(errors[name], Exception):
                raise errors[name]
            fn = make(model, ours_call, batch, autocast)
            seconds = timed(fn, device, args.warmup, args.repeats)
            result = {
                "seconds": seconds,
                "pairs_per_second": pairs / seconds,
                "speedup": t_theirs / seconds,
                "peak_memory_gb": peak_memory_gb(device, fn),
                "relative_error": errors[name],
            }
            if training:
                result["back_to_back_pairs_per_second"] = pairs / back_to_back(fn, device, args.repeats)
        except Exception as failure:  # noqa: BLE001 (reported in the table)
            result = {"failed": f"{type(failure).__name__}: {str(failure)[:500]}"}
        row["variants"][name] = result
        print_row(case, name, row, result)
    for model in (theirs, *variants.values()):
        model.decoder.load_state_dict(decoder_weights)
    return row


def loop_case(args, model, name, theirs, device, autocast, cases) -> dict:
    """The data-fed loop of both models: ours with run_train.py's own step, transformers' with the bare step;
    ours also as a fraction of its bare step rate."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    compiled = VARIANTS[name][1] is not None
    # As run_train.py --compile pads phrases: few text lengths for the compiled towers and their CUDA graphs.
    ours = loop_rate(args, run_train_step(model, device, dtype), device, 16 if compiled else None)
    transformers = loop_rate(args, benchmark_step(theirs, theirs_call, device, autocast), device)
    row = {
        "variant": name,
        "phrases_per_image": 1,
        "ours_pairs_per_second": ours["pairs_per_second"],
        "transformers_pairs_per_second": transformers["pairs_per_second"],
        "data_only_pairs_per_second": ours["data_only_pairs_per_second"],
        "num_workers": args.num_workers,
        "shrunk_images": args.loop_shrink,
    }
    row["speedup"] = row["ours_pairs_per_second"] / row["transformers_pairs_per_second"]
    bare = cases.get("train_step", {}).get("variants", {}).get(name, {}).get("pairs_per_second")
    if bare:
        row["ours_fraction_of_bare_step"] = row["ours_pairs_per_second"] / bare
    print(
        f"{'loop':>14} {name:>21}: ours {row['ours_pairs_per_second']:9.2f} pairs/s | transformers "
        f"{row['transformers_pairs_per_second']:9.2f} pairs/s | x{row['speedup']:.2f} | data alone "
        f"{row['data_only_pairs_per_second']:9.2f} pairs/s ({args.num_workers} workers"
        + (", shrunk images)" if args.loop_shrink else ")")
        + (f" | ours at {row['ours_fraction_of_bare_step']:.0%} of its bare step" if bare else ""),
        flush=True,
    )
    return row


def print_row(case: str, name: str, row: dict, result: dict) -> None:
    if "failed" in result:
        print(f"{case:>14} {name:>21}: FAILED {result['failed']}", flush=True)
        return
    print(
        f"{case:>14} {name:>21}: ours {result['pairs_per_second']:9.2f} pairs/s ({result['seconds'] * 1e3:8.1f} ms)"
        f" | transformers {row['transformers_pairs_per_second']:9.2f} pairs/s "
        f"({row['transformers_seconds'] * 1e3:8.1f} ms) | x{result['speedup']:.2f} | rel. error {result['relative_error']:.1e}"
        f" (transformers {row['transformers_relative_error']:.1e})"
        + (
            f" | back to back: ours {result['back_to_back_pairs_per_second']:.2f}, transformers "
            f"{row['transformers_back_to_back_pairs_per_second']:.2f} pairs/s"
            if "back_to_back_pairs_per_second" in result
            else ""
        ),
        flush=True,
    )


def save(args, results: dict) -> None:
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
