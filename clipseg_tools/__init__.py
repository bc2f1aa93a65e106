"""The library the scripts (`run_train.py`, `run_eval.py`), the benchmarks and the tests are built from.

- `transforms`: image cells decoded, images and masks resized, pixels normalised, batches to the device;
- `batching`: dataset rows to training and evaluation samples and batches (one vision pass per image);
- `loader`: the one DataLoader factory, and the default number of data-loader workers;
- `handover`: batches from loader workers through reused shared memory;
- `data`: the splits a script needs, and training images stored once at the model's size;
- `own_data`, `semantic_data`, `coco_data`: a user's own data (referring rows, label maps, COCO instances) in
  the project's form; `own_synthetic`: synthetic data of each shape;
- `training`: the training step, the loss summed on the device between logs, the optimizer and its schedule;
- `tuning`: what trains besides the decoder (`--tune`: LoRA adapters through peft, the last vision blocks, all
  of CLIP), and its optimizer groups;
- `checkpoints`: the run's state, and the checkpoints that carry it (saved, found, resumed from);
- `run_folder`: a run's output folder: what the run wrote there (pushed, removed on overwrite), its lock;
- `evaluation`, `metrics`, `gallery`: scoring under both protocols, the arithmetic, the failure pictures;
- `class_maps`: the multi-class map of semantic and COCO data and its `mean_iou` scores;
- `sam3_compare`: transformers' SAM 3 behind the evaluation's model interface (`run_eval.py --compare sam3:`);
- `model_card`, `hub`, `sources`: the card, pushing to the Hub, where models come from;
- `cli`, `errors`, `files`: the command lines' parser, error policy and logging; atomic writes;
- `predict_command`: masks, overlays and scores for a folder of images (`run_predict.py`, `clipseg-predict`);
- `demo`, `tiny_clip`, `prompts`: the offline demo, small CLIPs with their tokenizer, prompt templates;
- `demo_views`, `space`: the web demo's pictures (`app.py`), and the Hub Space that serves it;
- `onnx_export`, `web_export`: the ONNX export (graphs for onnxruntime, the transformers.js layout);
  `onnx_runtime`: the exported graphs run with onnxruntime and numpy, no PyTorch (`OnnxClipSeg`, `OnnxSegmenter`).

`errors`, `files`, `hub` and `cli` import nothing else of the project, so the dataset package
(`phrasecut_dataset`) can use them; the other modules may import the dataset package, never the other way
round.
"""
