"""optimization_pipeline.py end to end on the synthetic tree: deliverables, report numbers vs CSV, archive layout,
--resume, a second run keeping the first one's outputs, the demo mode with skipped steps, error paths."""
import csv
import json
import re
import zipfile
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal

import pytest

from lab_io import cpu_has_bf16

FAST = ("--baseline-model", "offline-vit-tiny", "--student-model", "offline-vit-tiny", "--epochs", "1",
        "--student-epochs", "1", "--runs", "3", "--warmup", "1", "--bench-batch-size", "2", "--num-threads", "1",
        "--end-to-end-images", "24", "--end-to-end-repeats", "1", "--hybrid", "on")
BF16 = cpu_has_bf16()  # the bf16 variants exist only where the CPU computes bf16 in hardware
VARIANTS = ["pytorch-fp32", *["pytorch-bf16"] * BF16, "pytorch-int8-dynamic", "pytorch-int8-smoothquant",
            "ort-fp32-optimized", "ort-int8-dynamic", "ort-int8-mixed",
            "ov-fp32", *["ov-bf16"] * BF16, "ov-int8-nncf", *["ov-int8-nncf-bf16"] * BF16, "ov-int8-weights",
            "hybrid-ov-fp32", *["hybrid-ov-bf16"] * BF16, "hybrid-ov-int8-nncf", *["hybrid-ov-int8-nncf-bf16"] * BF16,
            "hybrid-ov-int8-weights",
            "student-pytorch-fp32",
            "student-pytorch-int8-smoothquant", "student-ort-int8-dynamic", "student-ov-fp32", *["student-ov-bf16"] * BF16, "student-ov-int8-nncf",
            *["student-ov-int8-nncf-bf16"] * BF16, "student-ov-int8-weights"]
TARGETS = ["target_time_80", "target_cost_70", "target_size_30mb", "target_accuracy_95", "target_loss_1pt",
           "target_onnx_parity"]
REQUIRED = {"run_id", "category", "variant", "backend", "precision", "device", "device_name", "batch_size", "threads",
            "size_mb", "latency_median_ms", "latency_p95_ms", "latency_p99_ms", "throughput_img_s", "accuracy",
            "precision_score", "recall", "f1", "auroc", "n_test", "accuracy_delta_pt", "speedup",
            "time_reduction_pct", "cost_per_1000_images_usd", "cost_reduction_pct", "model_name", "baseline_model",
            "student_model", "torch_version", "onnxruntime_version", "recommended", *TARGETS}
# Numbers the report may quote without them being measurements: the business targets and guard thresholds
# ("-80 %", "-70 %", "< 30 Mo", "> 95 %", "< 1 point", "0,5 %", "99,5 %"), "1000 images" and the end-to-end "x8".
WHITELIST = {Decimal(v) for v in ("80", "70", "30", "95", "1", "0.5", "99.5", "99", "1000", "8")}
PERCENT_OF_FRACTION = {"accuracy", "precision_score", "recall", "f1", "auroc", "agreement", "onnx_graph_agreement",
                       "guard_agreement",
                       "accuracy_ci_low", "accuracy_ci_high"}
# The results table of rapport.md, cell by cell: (CSV column(s), decimals, scale); decimals None = text as is,
# "sig" = 3 significant digits. Written here independently of rapport.py, so a swapped column is caught.
TABLE = [("variant", None, 1), ("backend", None, 1), ("precision", None, 1), ("device", None, 1), ("size_mb", 2, 1),
         (("latency_median_ms", "latency_p95_ms", "latency_p99_ms"), 2, 1), ("throughput_img_s", 1, 1),
         ("accuracy", 2, 100), ("f1", 3, 1), ("auroc", 3, 1), ("accuracy_delta_pt", 2, 1), ("speedup", 2, 1),
         ("time_reduction_pct", 1, 1), ("cost_per_1000_images_usd", "sig", 1), ("cost_reduction_pct", 1, 1),
         ("cost_per_1000_images_batch_usd", "sig", 1)]
# Never flattering: higher-is-better columns rounded down, lower-is-better up (the schema of lab_targets)
UP = {"size_mb", "latency_median_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms",
      "cost_per_1000_images_usd", "cost_per_1000_images_batch_usd"}


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def variant_rows(rows):
    return [r for r in rows if r["section"] == "variant"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, synthetic_root):
    """One full run (training the baseline and the student), then a second run with --resume in the same folder."""
    from conftest import run_script

    cwd = tmp_path_factory.mktemp("pipeline")
    first = run_script("optimization_pipeline.py", "--data-dir", synthetic_root, *FAST,
                       "--package", "nom_prenom_tp_jour4.zip", cwd=cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = cwd / "modeles" / "model_cpu_bottle.pth"
    before = ckpt.stat().st_mtime_ns
    all_rows = read_rows(cwd / "resultats" / "optimization_report.csv")
    snapshot = {"report": (cwd / "rapport.md").read_text(encoding="utf-8"), "all_rows": all_rows,
                "rows": variant_rows(all_rows)}
    second = run_script("optimization_pipeline.py", "--data-dir", synthetic_root, *FAST, "--resume", cwd=cwd)
    return {"cwd": cwd, "first": first, "second": second, "ckpt_mtime": before, **snapshot}


def test_csv_png_report_and_final_model(project):
    cwd, result, rows = project["cwd"], project["first"], project["rows"]
    assert "Traceback" not in result.stderr
    assert [r["variant"] for r in rows] == VARIANTS
    assert REQUIRED <= set(rows[0])
    assert len({r["run_id"] for r in rows}) == 1
    for r in rows:
        assert r["device"] == "cpu" and r["batch_size"] == "1" and r["threads"] == "1"
        assert r["throughput_batch_size"] == "2" and r["category"] == "bottle"
        for key in ("size_mb", "latency_median_ms", "latency_p95_ms", "latency_max_ms", "throughput_img_s",
                    "cost_per_1000_images_usd", "speedup"):
            assert float(r[key]) > 0, (r["variant"], key)
        assert r["latency_p99_ms"] == "" or int(r["runs"]) >= 100, r["variant"]  # p99 only from >= 100 runs
        assert (r["runs"], r["rounds"]) == ("3", "3"), r["variant"]  # --runs 3: one run per round, every variant
        assert float(r["latency_p95_ms"]) >= float(r["latency_median_ms"])
        assert 0 <= float(r["accuracy"]) <= 1
        for t in TARGETS[:-1]:
            assert r[t] in ("True", "False")
        assert r["target_onnx_parity"] in (("True", "False") if r["backend"] != "pytorch" else ("",))
    base = rows[0]
    assert float(base["speedup"]) == 1 and float(base["accuracy_delta_pt"]) == 0 and base["target_time_80"] == "False"
    # --hybrid on: the hybrid's variants are the candidates when one of them passes, else every variant
    hybrid = [r for r in rows if r["variant"].startswith("hybrid-") and r["guards_passed"] == "True"]
    assert [r["variant"] for r in rows if r["recommended"] == "True"] == [
        min(hybrid or (r for r in rows if r["guards_passed"] == "True"),
            key=lambda r: float(r["latency_median_ms"]))["variant"]]
    by = {r["variant"]: r for r in rows}
    assert float(by["pytorch-int8-dynamic"]["size_mb"]) < 0.5 * float(base["size_mb"])  # int8 checkpoint
    # every verdict on the train + val images (no label); a student is judged against the baseline, and what is made
    # from it inherits its verdict
    for r in rows[1:]:
        if r["variant"].startswith("hybrid-"):  # its bank's images (the train good ones) do not count
            assert r["guard_split"] == "train+val-bank" and int(r["guard_images"]) < int(r["n_train"]) + int(r["n_val"])
            assert r["guard_reference"] == "pytorch-hybrid-fp32" and float(r["bank_mb"]) > 0
            assert r["flips_vs_classifier"] != ""
        else:
            assert r["guard_split"] == "train+val" and int(r["guard_images"]) == int(r["n_train"]) + int(r["n_val"])
    student = by["student-pytorch-fp32"]
    assert student["guard_reference"] == "pytorch-fp32" and student["guard"].startswith("distillation")
    assert by["student-ort-int8-dynamic"]["guard_reference"] == "student-pytorch-fp32"
    for r in rows:
        if r["role"] == "student" and student["guard_passed"] == "False":
            assert r["guards_passed"] == "False", r["variant"]
    assert "le test n'est lu par aucun choix" in project["report"]
    # the ONNX variants are checked through the fp32 graph they run or were quantized from, in their own engine
    assert [r["onnx_graph_checked"] for r in rows if r["backend"] == "onnxruntime"] == [
        "model_fp32_optimized.onnx (onnxruntime)", "model_fp32.onnx (onnxruntime)", "model_fp32.onnx (onnxruntime)",
        "model_student_fp32.onnx (onnxruntime)"]  # ort-fp32-optimized, ort-int8-dynamic, ort-int8-mixed, student
    assert {r["onnx_graph_checked"] for r in rows if r["backend"] == "openvino" and r["role"] == "baseline"} == {
        "model_fp32.onnx (openvino)", "model_hybrid_fp32.onnx (openvino)"}
    assert by["ov-int8-nncf"]["precision"] == "int8" and by["ov-fp32"]["precision"] == "fp32"
    if BF16:
        assert by["pytorch-bf16"]["precision"] == "bf16" and by["ov-int8-nncf-bf16"]["precision"] == "int8+bf16"

    png = cwd / "resultats" / "optimization_complete.png"
    assert png.stat().st_size > 30_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    deployed = [r for r in rows if r["deployed_as"]]
    assert len(deployed) == 1 and deployed[0]["backend"] in ("onnxruntime", "openvino")
    ir = any(k in deployed[0]["variant"] for k in ("int8-nncf", "int8-weights"))  # OpenVINO IRs, not ONNX files
    assert deployed[0]["deployed_as"] == "modeles/model_final" + (".xml" if ir else ".onnx")
    sidecars = sorted((cwd / "modeles").glob("model_final*.json"))  # the --resume run kept the first one
    assert deployed[0]["variant"] in {json.loads(p.read_text(encoding="utf-8"))["variant"] for p in sidecars}
    sidecar = json.loads(sidecars[-1].read_text(encoding="utf-8"))
    assert sidecar["format"] == "tp4-onnx-sidecar-v1" and sidecar["parity"]["onnx_conversion"]["passed"]
    report = project["report"]
    assert report.startswith("# Rapport") and "## 6. Variante recommandée" in report
    assert f"**`{[r for r in rows if r['recommended'] == 'True'][0]['variant']}`**" in report
    assert "**Classifieur hybride**" in report and "`hybrid-ov-int8-nncf` : accuracy" in report
    for word in ("Machine", "Méthode", "Résultats", "Limites", base["cpu_name"], base["torch_version"]):
        assert word in report
    assert "recommended:" in result.stdout and "pipeline finished in" in result.stdout


def test_end_to_end_and_detector_sections(project):
    """Steps 6 and 7: the deployable model end to end vs the naive baseline, the good-only detector vs the classifier,
    in the CSV (same run) and in sections 8 and 9 of the report."""
    rows, report = project["all_rows"], project["report"]
    assert len({r["run_id"] for r in rows}) == 1 and {r["section"] for r in rows} == {"variant", "end_to_end",
                                                                                        "detector"}
    naive, pipe = [r for r in rows if r["section"] == "end_to_end"]
    deployed = next(r for r in rows if r["deployed_as"])
    assert naive["variant"] == "naive-pytorch-fp32" and pipe["variant"] == deployed["variant"]
    assert int(pipe["n_images"]) == 24 and pipe["runs"] == "1"
    assert float(pipe["end_to_end_speedup"]) == pytest.approx(
        float(pipe["end_to_end_img_s"]) / float(naive["end_to_end_img_s"]), rel=1e-4)  # the CSV keeps 6 digits
    det = {r["defect_type"]: r for r in rows if r["section"] == "detector"}
    assert {"all", "crack", "common test images: classifier", "common test images: detector"} <= set(det)
    assert det["common test images: classifier"]["n_test"] == det["common test images: detector"]["n_test"]
    assert float(det["all"]["image_auroc"]) > 0.5 and det["all"]["pixel_auroc"] != ""
    assert "## 8. De bout en bout" in report and "## 9. Détecteur" in report
    assert f"| `{pipe['variant']}` |" in report.split("## 8.")[1].split("## 9.")[0]
    assert "| détecteur (" in report and "| classifieur supervisé (" in report
    assert (project["cwd"] / "modeles" / "detector_bottle.safetensors").is_file()


def report_numbers(text):
    """Every number the report states, except in `code` (names, versions, dates) and section numbers."""
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"^(#+ )\d+\.", r"\1", text, flags=re.M)
    return re.findall(r"(?<![\w.,])-?\d+(?:,\d+)?", text)


def in_csv(token, rows):
    """The number is a CSV cell rounded to the token's decimals, in one of the report's directions."""
    value = Decimal(token.replace(",", "."))
    if abs(value) in WHITELIST:
        return True
    places = Decimal(1).scaleb(-len(token.split(",")[1]) if "," in token else 0)
    for r in rows:
        for key, cell in r.items():
            try:
                d = Decimal(cell)
            except Exception:  # noqa: BLE001 - text cells
                continue
            if not d.is_finite():
                continue
            for scale in ((1, 100) if key in PERCENT_OF_FRACTION else (1,)):
                if any((d * scale).quantize(places, rounding=m) == value
                       for m in (ROUND_FLOOR, ROUND_CEILING, ROUND_HALF_EVEN)):
                    return True
    return False


def expected_cell(row, column, decimals, scale):
    """What the report must print for row[column]: rounded away from flattering, French decimal comma."""
    if decimals is None:
        return row[column]
    d = Decimal(row[column]) * scale
    if decimals == "sig":
        decimals = max(0, 2 - d.adjusted())
    q = d.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_CEILING if column in UP else ROUND_FLOOR)
    return f"{abs(q) if q == 0 else q:f}".replace(".", ",")


def table_mismatches(report, rows):
    """Cells of the results table that differ from their own CSV column."""
    section = report.split("## 4. Résultats")[1].split("\n\n")[1]
    lines = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(lines) == len(rows)
    bad = []
    for line, row in zip(lines, rows):
        cells = [c.strip().strip("`").removesuffix("x") for c in line.strip("|").split("|")]
        for cell, (column, decimals, scale) in zip(cells, TABLE):
            columns = column if isinstance(column, tuple) else (column,)
            got = [c.strip() for c in cell.split(" / ")] if isinstance(column, tuple) else [cell]
            for c, g in zip(columns, got):
                if c == "latency_p99_ms" and row[c] == "":  # < 100 timed runs: the slowest, named
                    c, g = "latency_max_ms", g.removeprefix("max ")
                if g != expected_cell(row, c, decimals, scale):
                    bad.append((row["variant"], c, g, expected_cell(row, c, decimals, scale)))
    return bad


def test_every_number_in_the_report_is_in_the_csv(project):
    numbers = report_numbers(project["report"])
    assert len(numbers) > 80  # the table and the text quote the measurements
    missing = sorted({n for n in numbers if not in_csv(n, project["all_rows"])})
    assert not missing, f"numbers in rapport.md that are not in the CSV: {missing}"
    # the checker itself catches an invented number
    assert not in_csv("12345,678", project["all_rows"])


def test_each_table_cell_is_its_own_column_rounded_cautiously(project):
    from rapport import report_markdown

    rows = project["rows"]
    assert table_mismatches(project["report"], rows) == []
    # a report that swapped two columns (median and p95 latency) is caught
    swapped = [{**r, "latency_median_ms": r["latency_p95_ms"], "latency_p95_ms": r["latency_median_ms"]} for r in rows]
    assert any(c == "latency_median_ms" for _, c, _, _ in table_mismatches(report_markdown(swapped, "x.csv"), rows))


def test_rapport_regenerates_the_report_from_the_csv(project, run, tmp_path):
    cwd = project["cwd"]
    run_id = project["rows"][0]["run_id"]
    result = run("rapport.py", "--csv", "resultats/optimization_report.csv", "--run-id", run_id,
                 "--report", tmp_path / "r.md", "--figure", tmp_path / "f.png", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == project["report"]  # nothing measured again
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run("rapport.py", "--csv", tmp_path / "none.csv", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    # the CSV changed by hand (a column deleted, a decimal comma), or a folder given as the report: one line each
    rows = list(csv.DictReader(open(cwd / "resultats/optimization_report.csv", newline="", encoding="utf-8")))
    columns = list(rows[0])
    for name, drop, value in (("deleted.csv", "accuracy", None), ("comma.csv", None, "59,9")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, [c for c in columns if c != drop], extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**r, "size_mb": value or r["size_mb"]} for r in rows)
    (tmp_path / "folder").mkdir()
    for args, message in ((["--csv", tmp_path / "deleted.csv"], "has no column 'accuracy'"),
                          (["--csv", tmp_path / "comma.csv"], "is '59,9', not a number"),
                          (["--csv", cwd / "resultats/optimization_report.csv", "--report", "folder"], "is a folder")):
        bad = run("rapport.py", *args, cwd=tmp_path)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1
    assert (tmp_path / "folder").is_dir() and not list((tmp_path / "folder").iterdir())


def test_archive_layout(project):
    path = project["cwd"] / "nom_prenom_tp_jour4.zip"
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        assert {"code/optimization_pipeline.py", "code/train_utils.py", "code/requirements.txt", "code/README.md",
                "code/constraints.txt", "code/docs/guide.md",
                "resultats/optimization_report.csv", "resultats/optimization_complete.png", "modeles/model_cpu.pth",
                "modeles/model_quantized.pth", "modeles/model_final.json", "rapport.md"} <= names
        assert all(n.split("/")[0] in ("code", "resultats", "modeles", "rapport.md") for n in names)
        assert z.read("rapport.md").decode("utf-8") == project["report"]
        sidecar = json.loads(z.read("modeles/model_final.json"))
        assert f"modeles/{sidecar['model_file']}" in names  # model_final.onnx, or model_final.xml + .bin
        assert sidecar.get("weights_file") is None or f"modeles/{sidecar['weights_file']}" in names
    assert "archive written: nom_prenom_tp_jour4.zip" in project["first"].stdout
    # part 1, 2, 3 and 5 were not run in this folder: their deliverables are named as missing, with their script
    warning = next(line for line in project["first"].stdout.splitlines() if "lacks" in line)
    for name in ("resultats/benchmark_cpu_gpu.png (part 1: python benchmark_gpu.py)", "resultats/load_test.csv",
                 "resultats/onnx_results.csv"):
        assert name in warning
    assert "model_final.onnx" not in warning and "rapport.md" not in warning


def test_resume_reuses_the_models_and_keeps_previous_outputs(project):
    cwd, second = project["cwd"], project["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[1/5] baseline: reusing modeles/model_cpu_bottle.pth" in second.stdout
    assert "student: reusing" in second.stdout and "PyTorch int8 dynamic: reusing" in second.stdout \
        and "PyTorch int8 SmoothQuant: reusing" in second.stdout
    # the NNCF int8 IRs of the baseline and the student are reused, the refitted hybrid's is made again
    assert second.stdout.count("OpenVINO int8: reusing") == 2
    assert second.stdout.count("OpenVINO int8 (NNCF post-training quantization") == 1
    assert "fine-tuning" not in second.stdout and "epoch 1/1" not in second.stdout + second.stderr
    assert (cwd / "modeles" / "model_cpu_bottle.pth").stat().st_mtime_ns == project["ckpt_mtime"]
    rows = variant_rows(read_rows(cwd / "resultats" / "optimization_report.csv"))
    assert len({r["run_id"] for r in rows}) == 2 and len(rows) == 2 * len(VARIANTS)
    assert [r["reused"] for r in rows[len(VARIANTS):] if r["variant"] == "pytorch-fp32"] == ["True"]
    # earlier report, figure and sidecar kept with their timestamp, not overwritten
    assert len(list(cwd.glob("rapport.*.md"))) == 1
    assert len(list((cwd / "resultats").glob("optimization_complete.*.png"))) == 1
    assert "note: previous rapport.md kept as" in second.stdout


@pytest.mark.slow
def test_demo_mode_with_skipped_steps(tmp_path, run):
    result = run("optimization_pipeline.py", "--demo", "--data-dir", tmp_path / "syn", "--epochs", "1",
                 "--student-epochs", "1", "--runs", "2", "--warmup", "0", "--num-threads", "1", "--skip-torch-int8",
                 "--skip-onnx", "--skip-openvino", "--skip-detector", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "syn" / "bottle" / "test" / "crack").is_dir()  # synthetic tree written
    rows = read_rows(tmp_path / "resultats" / "optimization_report.csv")
    assert [r["variant"] for r in rows] == ["pytorch-fp32", "student-pytorch-fp32"]  # no end-to-end, no detector
    assert {r["mode"] for r in rows} == {"demo"}
    assert (rows[0]["model_name"], rows[1]["model_name"]) == ("offline-vit-small", "baseline-half")
    # the demo's student: every other block of the baseline, distilled on its logits, with the baseline's threshold
    assert rows[1]["distill_loss"] == "mse" and float(rows[1]["distill_alpha"]) == 1.0
    assert rows[1]["threshold"] == rows[0]["threshold"]
    assert 0.4 < float(rows[1]["params_m"]) / float(rows[0]["params_m"]) < 0.6
    assert "3 of the baseline's 6 blocks (every other one)" in result.stdout
    report = (tmp_path / "rapport.md").read_text(encoding="utf-8")
    assert "Mode démo" in report and "aléatoirement" in report and "RANDOM INIT" in result.stdout
    assert not (tmp_path / "modeles" / "model_final.onnx").exists()
    assert "[6] end to end: skipped, no deployable model" in result.stdout
    assert "## 8. De bout en bout" in report and report.count("Non mesuré dans cette exécution") == 2


@pytest.mark.parametrize("args, message", [
    ((), "no dataset folder"),
    (("--package", "archive.tar"), "must end with .zip"),
    (("--epochs", "0"), "--epochs must be >= 1"),
])
def test_errors_are_one_line(tmp_path, cli, args, message):
    result = cli("optimization_pipeline.py", "--data-dir", tmp_path / "nothing", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert not (tmp_path / "resultats").exists() and not (tmp_path / "rapport.md").exists()
