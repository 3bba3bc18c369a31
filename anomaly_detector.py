"""A good-only anomaly detector on the lab's ViT: fitted on train/good alone, evaluated on MVTec AD's official test
split (test/good + test/<defect>, masks from ground_truth/), with a map that says WHERE the defect is.

    python anomaly_detector.py --category bottle --model-name ~/models/dinov2-small
    python anomaly_detector.py --category screw --data-dir ../shared/devdata/mvtec-screw-512 --model-name DIR

Method (the PatchCore / AnomalyDINO family, options chosen by measurement on the dev kit, see docs/guide.md):
  1. patch tokens of two intermediate transformer blocks (1/3 and 2/3 of the depth) of a frozen pretrained ViT
     (DINOv2, ViT, DeiT; a hub id, a local folder, an offline preset or a fine-tuned checkpoint of this lab), at
     GRID_PATCHES (24) patches per side by default, each block L2-normalised, then concatenated and L2-normalised
     again so that every block weighs the same (no neighbourhood averaging: it blurred small defects away);
  2. a memory bank of the patches of the good training images, reduced by greedy k-center coreset selection;
  3. a test patch's anomaly = distance to its nearest bank patch (inference.NearestPatches: an OpenVINO graph holding
     the bank); the patch grid is upsampled to the image and smoothed (Gaussian) into the anomaly map; the image
     score = the mean of the top 1 % patch distances (screw at 336 px: 0.950 image AUROC, 0.932 for the largest one);
  4. the decision threshold = the best balanced accuracy of the image scores on the validation split of the lab's
     split (mvtec_dataset.prepare_split, the classifier's: good images of train/good and test/good, defects of
     test/), whose images are kept out of the bank and of the test images; --threshold-from good: the highest score
     of good training images held out of the bank (no defect needed).
The test images are MVTec AD's official test/ folders without the validation images: no choice reads them.
Outputs: resultats/detector_results.csv (image and pixel AUROC, per defect type, timings, sizes),
resultats/detector_roc.png, overlays with the mask contour in resultats/detector_overlays/, and the detector itself
in modeles/detector_<category>.safetensors (bank + configuration, no pickle).
"""
from __future__ import annotations

from detector import DETECTOR_DEFAULTS, ENGINES, GRID_PATCHES, check_detector_options, evaluate
from lab_io import ArgumentParser, finite_float, output_dir, positive_int, run_cli
from load_model_hf import HUB_PRESETS, OFFLINE_PRESETS


def parse_args(argv=None):
    presets = ", ".join([*HUB_PRESETS, *OFFLINE_PRESETS])
    d = DETECTOR_DEFAULTS
    p = ArgumentParser(description="Fit a good-only patch detector (memory bank of ViT patch features) on "
                                   "train/good and evaluate it on the official MVTec AD test split: image "
                                   "and pixel AUROC, ROC curves, overlays, saved detector.")
    p.add_argument("--category", default=d["category"], help="MVTec AD category (default: bottle)")
    p.add_argument("--data-dir", default=d["data_dir"], help="folder holding the category folders")
    p.add_argument("--model-name", default=d["model_name"],
                   help=f"backbone: preset ({presets}), hub id, local Hugging Face folder, or a fine-tuned checkpoint "
                        "of this lab (.pth) (default: vit-base)")
    p.add_argument("--layers", default=d["layers"],
                   help="transformer blocks whose patch tokens are used: auto (1/3 and 2/3 "
                   "of the depth) or numbers like 4,8")
    p.add_argument("--image-size", type=positive_int, default=d["image_size"],
                   help=f"input side in pixels, a multiple of the patch size (default: {GRID_PATCHES} patches per "
                        "side, 336 for DINOv2 /14, 384 for ViT /16; an offline preset: its own size)")
    p.add_argument("--coreset", type=finite_float, default=d["coreset"],
                   help="share of the good patches kept in the memory bank by greedy coreset selection (default 0.1)")
    p.add_argument("--score-top", type=finite_float, default=d["score_top"],
                   help="image score = mean of this share of the largest patch distances (default 0.01 = the top "
                        "1 %%, at least one patch; 0 = the largest alone)")
    p.add_argument("--max-bank", type=positive_int, default=d["max_bank"],
                   help="at most this many patches in the bank (20000)")
    p.add_argument("--threshold-from", choices=("val", "good"), default=d["threshold_from"],
                   help="val (default): best balanced accuracy on the validation split of the lab's split (good and "
                        "defective images, kept out of the bank and of the test images); good: highest score of good "
                        "training images held out of the bank (--holdout), no defect used")
    p.add_argument("--split-seed", type=int, default=d["split_seed"],
                   help="seed of the lab's split whose validation images set the threshold (default 42, "
                        "benchmark_gpu.py's; --compare-checkpoint: that checkpoint's split)")
    p.add_argument("--holdout", type=finite_float, default=d["holdout"],
                   help="--threshold-from good: share of train/good held out of the bank to set the threshold "
                        "(default 0.1, >= 2 images)")
    p.add_argument("--engine", choices=ENGINES, default=d["engine"],
                   help="runs the backbone: torch, openvino (fp32, its ONNX export; the default: same features, "
                        "faster) or openvino-int8 (NNCF, calibrated on good training images)")
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"],
                   help="images per forward pass (default 16)")
    p.add_argument("--compare-checkpoint", default=d["compare_checkpoint"], metavar="PTH",
                   help="also evaluate this supervised classifier (e.g. modeles/model_cpu_<category>.pth) and the "
                        "detector on the images neither trained on: its test split within MVTec's test/ folders")
    p.add_argument("--overlays", type=int, default=d["overlays"],
                   help="overlay PNGs per test folder (default 3; 0 = none)")
    p.add_argument("--num-threads", type=positive_int, default=d["num_threads"],
                   help="PyTorch CPU threads (default: PyTorch's)")
    p.add_argument("--models-dir", type=output_dir, default=d["models_dir"],
                   help="where the detector is saved (default: modeles)")
    p.add_argument("--results-dir", type=output_dir, default=d["results_dir"],
                   help="CSV, ROC curves and overlays (default: resultats)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of the held-out split and the coreset (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs instead of keeping them")
    return check_detector_options(p.parse_args(argv))


def main(argv=None) -> int:
    evaluate(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
