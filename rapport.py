"""The French report of the optimisation chain (rapport.md) and its summary figure (optimization_complete.png),
written from the rows of resultats/optimization_report.csv only: no number is computed here that the CSV does not
hold, so the report can be regenerated without measuring again.

    python rapport.py                                   # the last run of resultats/optimization_report.csv
    python rapport.py --run-id 20261127-101500 --report rapport_bottle.md

Rounding never flatters a result (ROUNDING below): a value where higher is better (accuracy, speed-up,
reductions, throughput) is rounded down, one where lower is better (latency, size, cost) up, the others half-even;
the direction of each column is in lab_targets.RESULT_COLUMNS.
"""
from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from lab_io import (ArgumentParser, UserError, atomic_write_text, output_file, read_csv_rows,
                    run_cli, save_figure)
from lab_targets import (HIGHER, LOWER, NEUTRAL, TARGET_COST_REDUCTION_PCT, TARGET_END_TO_END_SPEEDUP,
                         TARGET_MAX_LOSS_PT, TARGET_MAX_SIZE_MB, TARGET_MIN_ACCURACY, TARGET_TIME_REDUCTION_PCT, TARGETS,
                         HYBRID_PREFIX, STUDENT_FROM_BASELINE, better_direction, recommend)

REPORT_CSV, REPORT_PNG, REPORT_MD = "optimization_report.csv", "optimization_complete.png", "rapport.md"
ROUNDING = {HIGHER: ROUND_FLOOR, LOWER: ROUND_CEILING, NEUTRAL: ROUND_HALF_EVEN}
ROUNDING_NOTE = ("accuracy, accélération, réductions et débit arrondis vers le bas ; latence, taille et coût vers "
                 "le haut ; borne basse d'un intervalle vers le bas, borne haute vers le haut ; le reste au plus "
                 "proche")


# --------------------------------------------------------------------------------------------------
# Rounding and the French report
# --------------------------------------------------------------------------------------------------
def num(row: dict, column: str, decimals: int = 2, scale: int = 1) -> str:
    """row[column] rounded to `decimals` in the direction that never flatters it (ROUNDING), with a French decimal
    comma; 'n/m' (not measured) when empty."""
    return _rounded(row.get(column, ""), better_direction(column), decimals, scale)


def sig(row: dict, column: str, digits: int = 3) -> str:
    """Like num() with `digits` significant digits (costs: 0,0000533)."""
    try:
        d = Decimal(row.get(column, ""))
    except (InvalidOperation, TypeError):
        return "n/m"
    if d == 0 or not d.is_finite():
        return num(row, column, 0)
    return num(row, column, max(0, digits - 1 - d.adjusted()))


def _rounded(value: str, direction: str, decimals: int, scale: int = 1) -> str:
    try:
        d = Decimal(value) * scale
    except (InvalidOperation, TypeError):
        return "n/m"
    if not d.is_finite():
        return "n/m"
    q = d.quantize(Decimal(1).scaleb(-decimals), rounding=ROUNDING[direction])
    if q == 0:
        q = abs(q)  # no "-0,00"
    return f"{q:f}".replace(".", ",")


def yes(value: str) -> bool:
    return value == "True"


def verdict(value: str) -> str:
    return {"True": "atteint", "False": "**manqué**"}.get(value, "sans objet")


def sections(rows: list[dict]) -> dict:
    """A run's rows by the part of the report they feed (column `section`; older CSVs: every row is a variant)."""
    out = {"variant": [], "end_to_end": [], "detector": []}
    for r in rows:
        out.setdefault(r.get("section") or "variant", []).append(r)
    return out


def report_markdown(all_rows: list[dict], csv_path: str | Path) -> str:
    """The French report of one pipeline run, from its CSV rows (strings) only."""
    parts = sections(all_rows)
    rows = parts["variant"]
    base = rows[0]
    out = []
    w = out.append
    context_sections(w, base, csv_path)
    method_section(w, rows, base)
    results_section(w, rows, base)
    recommendation_sections(w, rows, base)
    end_to_end_section(w, parts["end_to_end"], base)
    detector_section(w, parts["detector"], base)
    limits_section(w, base)
    return "\n".join(out)


def context_sections(w, base: dict, csv_path) -> None:
    """Title, the demo warning, 1. Contexte, 2. Machine et logiciels."""
    demo = base["mode"] == "demo"
    w(f"# Rapport – TP Jour 4 : optimisation d'un ViT pour la détection de pièces défectueuses (MVTec AD, "
      f"catégorie `{base['category']}`)\n")
    w(f"Généré automatiquement par `optimization_pipeline.py` (exécution `{base['run_id']}`) à partir des mesures de "
      f"`{csv_path}` uniquement : chaque nombre ci-dessous est une valeur de ce CSV, arrondie dans le sens "
      f"prudent ({ROUNDING_NOTE}). Ce rapport est un point de départ pour votre propre analyse.\n")
    if demo:
        w("> **Mode démo (`--demo`)** : données **synthétiques** (arborescence MVTec générée par le code, pas de "
          "vraies "
          f"bouteilles) et modèles hors ligne `{base['baseline_model']}` / `{base['student_model']}` **initialisés "
          "aléatoirement** (aucun poids pré-entraîné). Les nombres montrent la méthode et l'effet réel de chaque étape "
          "sur cette machine, pas les performances du TP sur MVTec AD avec ViT-Base.\n")
    w("## 1. Contexte\n")
    w("Une entreprise de maintenance industrielle veut signaler automatiquement les pièces défectueuses. Un Vision "
      f"Transformer (`{base['baseline_model']}`) est affiné en classifieur normal / anomalie ; on cherche ensuite la "
      "variante la moins chère à servir sur CPU. Objectifs métier : temps d'inférence −80 %, coût −70 %, modèle "
      "< 30 Mo, accuracy > 95 %, perte d'accuracy < 1 point, prédictions ONNX à 0,5 % près de PyTorch.\n")
    w("## 2. Machine et logiciels\n")
    w(f"- CPU : `{base['cpu_name']}`, {base['cpu_cores'] or 'n/m'} cœurs physiques, {base['cpu_logical'] or 'n/m'} "
      f"processeurs logiques ; jeux d'instructions : `{base.get('cpu_flags') or 'n/m'}` ; threads utilisés par "
      f"PyTorch, ONNX Runtime et OpenVINO : {base['threads']}.")
    w(f"- GPU : {('`' + base['gpu_name'] + '`') if base['gpu_name'] else 'aucun (pas de ligne GPU)'}.")
    w(f"- Versions : Python `{base['python_version']}`, PyTorch `{base['torch_version']}`, Transformers "
      f"`{base['transformers_version']}`, ONNX `{base['onnx_version']}`, ONNX Runtime "
      f"`{base['onnxruntime_version']}`.\n")


def method_section(w, rows: list[dict], base: dict) -> None:
    """3. Méthode: data, reference, timing, cost, size, guards, recommendation rule, student."""
    gpu_rows = [r for r in rows if r["device"] != "cpu"]
    nb = base["throughput_batch_size"]
    w("## 3. Méthode\n")
    w(f"- Données : découpage unique et stratifié (graine `{base['seed']}`), train {base['n_train']}, val "
      f"{base['n_val']}, test {base['n_test']} images ; toutes les variantes sont évaluées sur les mêmes images de "
      "test.")
    w(f"- Référence : `{base['variant']}` = `{base['model_name']}` en PyTorch fp32 sur CPU "
      f"({num(base, 'params_m', 2)} M paramètres, {base['epochs'] or 'n/m'} époque(s)"
      f"{', checkpoint existant réutilisé' if yes(base['reused']) else ''}). Les accélérations, réductions de "
      "temps et de coût sont calculées par "
      "rapport à elle.")
    w(f"- Chronométrage : {base['warmup']} passes d'échauffement puis jusqu'à {base['runs']} passes mesurées par "
      f"variante ; latence = médiane, p95 et p99 à batch {base['batch_size']} (référence des objectifs de temps et "
      f"de coût ; sous 100 passes mesurées le p99 n'est que la plus lente : le tableau donne alors « max »), débit en images/s à batch {nb}. Toutes les variantes sont mesurées dans la même exécution, "
      f"sur les mêmes images, avec les mêmes threads, en {base.get('rounds') or 1} tours : à chaque tour, chaque "
      "variante fait sa part des passes mesurées, si bien qu'un ralentissement passager de la machine les touche "
      "toutes.")
    w(f"- Coût pour 1000 images = latence médiane à batch {base['batch_size']} × prix horaire "
      f"({num(base, 'price_per_hour', 3)} USD/h pour le CPU"
      + (f", {num(gpu_rows[0], 'price_per_hour', 3)} USD/h pour le GPU" if gpu_rows else "")
      + ", prix catalogue Azure) : une estimation, cette machine n'est pas la VM facturée.")
    w("- Taille = octets du fichier sur disque (1 Mo = un million d'octets).")
    w("- Garde-fous (ce qui décide) : chaque variante est comparée au modèle dont elle est issue sur les images "
      "train + val, sans leurs étiquettes ; le test n'est lu par aucun choix (garde-fou, recommandation, modèle "
      "déployé) : il est mesuré une fois par variante et seulement rapporté (colonne `guard_split` du CSV). Un graphe "
      "fp32 (conversion ONNX) doit donner la même décision sur au moins 99,5 % de ces images, une variante int8 / "
      "bf16 ou un étudiant distillé sur au moins 99 % : si 1 % au plus des décisions bougent, l'accuracy ne peut pas "
      "perdre plus d'un point sur ces images.")
    w("- Variante recommandée = la plus rapide à batch 1 sur CPU parmi celles qui passent tous les garde-fous de leur "
      "lignée (le leur, celui du modèle dont elles sont issues et, pour ONNX, celui de la conversion) et pèsent "
      "moins de 30 Mo ; si aucune ne pèse moins de 30 Mo, la plus rapide qui passe ses garde-fous.")
    student = next((r for r in rows if r["role"] == "student"), None)
    if student:
        w(f"- Étudiant : `{student['model_name']}` ({num(student, 'params_m', 2)} M paramètres, "
          f"{student['epochs'] or 'n/m'} époque(s)), entraîné par distillation des logits de la référence (alpha "
          f"{num(student, 'distill_alpha', 2)}, "
          + ("écart quadratique des logits, seuil de la référence conservé)."
             if student.get("distill_loss") == "mse"
             else f"température {num(student, 'distill_temperature', 2)}).")
          + (" Il est fait d'un bloc sur deux de la référence fine-tunée (comme DistilBERT à partir de BERT)."
             if student["model_name"] == STUDENT_FROM_BASELINE else ""))
    w("")


def results_section(w, rows: list[dict], base: dict) -> None:
    """4. Résultats: one line per variant, then the business targets per variant."""
    nb = base["throughput_batch_size"]
    w("## 4. Résultats\n")
    w(f"| variante | moteur | format | device | taille (Mo) | latence médiane / p95 / p99 (ms, batch "
      f"{base['batch_size']}) | débit (img/s, batch {nb}) | accuracy (%) | F1 | AUROC | Δ accuracy (pt) | "
      f"accélération | temps (%) | coût / 1000 img (USD, batch 1) | coût (%) | coût / 1000 img au débit (USD, "
      f"batch {nb}) | recommandée |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w(f"| `{r['variant']}` | {r['backend']} | {r['precision']} | {r['device']} | {num(r, 'size_mb', 2)} | "
          f"{num(r, 'latency_median_ms', 2)} / {num(r, 'latency_p95_ms', 2)} / {latency_tail(r)} | "
          f"{num(r, 'throughput_img_s', 1)} | {num(r, 'accuracy', 2, 100)} | {num(r, 'f1', 3)} | "
          f"{num(r, 'auroc', 3)} | {num(r, 'accuracy_delta_pt', 2)} | {num(r, 'speedup', 2)}x | "
          f"{num(r, 'time_reduction_pct', 1)} | {sig(r, 'cost_per_1000_images_usd')} | "
          f"{num(r, 'cost_reduction_pct', 1)} | {sig(r, 'cost_per_1000_images_batch_usd')} | "
          f"{'**oui**' if yes(r['recommended']) else ''} |")
    w("\nTemps (%) et coût (%) : réduction par rapport à la référence (négatif = plus lent / plus cher).\n")
    w(f"L'objectif −70 % de coût est jugé sur le coût à batch {base['batch_size']} (latence médiane × prix) : "
      "l'usine inspecte les pièces au fil de l'eau, une image par requête, et la machine est facturée pendant "
      f"qu'elle attend chaque image. Le coût au débit (batch {nb}, images/s × prix) est celui d'un traitement par "
      "lots, quand des milliers d'images attendent déjà : il est plus bas, donné pour comparaison.\n")
    w("Objectifs métier par variante :\n")
    w("| variante | temps −80 % | coût −70 % | taille < 30 Mo | accuracy > 95 % | perte < 1 pt | parité ONNX |")
    w("|---|---|---|---|---|---|---|")
    for r in rows:
        w(f"| `{r['variant']}` | " + " | ".join(verdict(r[t]) for t in TARGETS) + " |")
    w("")


def recommendation_sections(w, rows: list[dict], base: dict) -> None:
    """5. Interprétation, 6. Variante recommandée (and the deployable file), 7. Objectifs métier : bilan."""
    final = next((r for r in rows if r.get("deployed_as")), None)
    rec = next((r for r in rows if yes(r["recommended"])), None)
    cpu_rows = [r for r in rows if r["device"] == "cpu"]
    by = {r["variant"]: r for r in rows}
    w("## 5. Interprétation et comparaisons\n")
    for r in rows[1:]:
        w("- " + describe_variant(r, base, by))
    w("")
    w("## 6. Variante recommandée\n")
    if rec is None:
        w("Aucune variante CPU ne passe les garde-fous (accord avec son modèle source sur train + val, conversion "
          "ONNX fidèle) : la référence reste à déployer.\n")
    else:
        met = [label for t, label in zip(TARGETS, FRENCH_TARGET_NAMES) if yes(rec[t])]
        missed = [label for t, label in zip(TARGETS, FRENCH_TARGET_NAMES) if rec[t] == "False"]
        w(f"**`{rec['variant']}`** ({rec['backend']}, {rec['precision']}, `{rec['model_name']}`) : c'est la variante "
          f"CPU la plus rapide à batch {rec['batch_size']} parmi celles qui passent les garde-fous (mêmes décisions que "
          f"son modèle source sur ≥ 99 % des images train + val et, pour ONNX, conversion fidèle sur ≥ 99,5 %) "
          f"et pèsent moins de 30 Mo quand il y en a. "
          f"Latence médiane {num(rec, 'latency_median_ms', 2)} ms contre {num(base, 'latency_median_ms', 2)} ms "
          f"(accélération {num(rec, 'speedup', 2)}x, temps −{num(rec, 'time_reduction_pct', 1)} %), coût "
          f"{sig(rec, 'cost_per_1000_images_usd')} USD pour 1000 images (−{num(rec, 'cost_reduction_pct', 1)} %), "
          f"taille {num(rec, 'size_mb', 2)} Mo, accuracy {num(rec, 'accuracy', 2, 100)} % "
          f"({num(rec, 'accuracy_delta_pt', 2)} pt).\n")
        w(f"Objectifs atteints : {', '.join(met) or 'aucun'}. Objectifs manqués : {', '.join(missed) or 'aucun'}.\n")
        if final is not None:
            w(f"Fichier déployable : `{final['deployed_as']}` (+ "
              f"`{Path(final['deployed_as']).with_suffix('.json').name}`, prétraitement, seuil et empreinte, lu par "
              f"`score.py`) = `{final['variant']}`.\n")
        else:
            w("La variante recommandée n'est pas un fichier ONNX et aucune variante ONNX ne passe les garde-fous : "
              "`model_final.onnx` n'a pas été écrit par cette exécution.\n")
    hybrid_paragraph(w, rows)
    w("## 7. Objectifs métier : bilan\n")
    for t, label in zip(TARGETS, FRENCH_TARGET_NAMES):
        ok = [f"`{r['variant']}`" for r in cpu_rows if yes(r[t])]
        line = f"- **{label}** : " + (f"atteint par {', '.join(ok)}." if ok else "**atteint par aucune variante CPU.**")
        if rec is not None and rec[t] == "False":
            line += " " + ADVICE[t]
        w(line)
    w("")


def hybrid_paragraph(w, rows: list[dict]) -> None:
    """Section 6, the hybrid classifier's rows (when it was built): accuracy with interval, decisions changed vs the
    plain classifier, latency at batch 1 vs the plain variant lab_targets.recommend would choose, size and bank."""
    hybrid = [r for r in rows if r["variant"].startswith(HYBRID_PREFIX)]
    if not hybrid:
        return
    typed = [{**r, "guards_passed": yes(r["guards_passed"]), "latency_median_ms": float(r["latency_median_ms"])}
             for r in rows if r not in hybrid and r["latency_median_ms"]]  # the CSV's strings, for the rule
    plain = recommend(typed)
    plain = next(r for r in rows if r["variant"] == plain["variant"]) if plain else None
    w("**Classifieur hybride** (logit de la tête + distances des patchs du même passage aux patchs des bonnes pièces "
      "du train, fusionnés par une régression logistique ajustée sur train, seuil choisi sur val ; un seul graphe). "
      "Il n'est construit que s'il bat la tête seule sur la validation (AUROC et accuracy équilibrée, "
      "`lab_targets.hybrid_wins`) ou avec `--hybrid on` ; la recommandation et le modèle déployé sont alors choisis "
      "parmi ses variantes (`lab_targets.selection_candidates`)."
      + (f" Variante du classifieur seul que la règle de recommandation choisirait : `{plain['variant']}`, "
         f"{num(plain, 'latency_median_ms', 2)} ms à batch 1, accuracy {num(plain, 'accuracy', 2, 100)} %." if plain
         else "") + "\n")
    for r in hybrid:
        w(f"- `{r['variant']}` : accuracy {num(r, 'accuracy', 2, 100)} % (IC 95 % {num(r, 'accuracy_ci_low', 1, 100)}"
          f"–{num(r, 'accuracy_ci_high', 1, 100)}), {r['flips_vs_classifier']} décision(s) de test différentes de "
          f"celles du classifieur seul (PyTorch fp32), latence {num(r, 'latency_median_ms', 2)} ms à batch 1, taille "
          f"{num(r, 'size_mb', 2)} Mo, banque de patchs comprise ({num(r, 'bank_mb', 2)} Mo en float32, stockée en "
          f"int8 par NNCF dans les variantes int8), garde-fous "
          f"{'passés' if yes(r['guards_passed']) else '**non passés**'}.")
    w("")


def limits_section(w, base: dict) -> None:
    """10. Limites de la mesure."""
    demo = base["mode"] == "demo"
    w("## 10. Limites de la mesure\n")
    w(f"- Une seule machine et une seule exécution : les latences varient d'un passage à l'autre (bruit de mesure, "
      f"autres processus, fréquence du CPU) ; comparez la p95 à la médiane (référence : "
      f"{num(base, 'latency_median_ms', 2)} ms vs {num(base, 'latency_p95_ms', 2)} ms) et ne concluez pas sur de "
      "petits écarts.")
    w(f"- L'accuracy est mesurée sur {base['n_test']} images de test seulement : une image de plus ou de moins bien "
      "classée change l'accuracy de plusieurs dixièmes de point ; l'objectif « perte < 1 point » est donc sensible.")
    w("- Les sections 4 à 7 chronomètrent l'inférence du modèle seule (tenseur déjà prétraité) : le décodage et le "
      "redimensionnement de l'image s'y ajoutent (mesurés de bout en bout en section 8), et le réseau en production.")
    w("- Le coût est une estimation (latence mesurée ici × prix catalogue), pas une facture Azure.")
    if demo:
        w("- Mode démo : données synthétiques et modèles à poids aléatoires au départ, entraînés quelques époques : "
          "l'accuracy n'est pas représentative de MVTec AD ; refaire la mesure avec `--category bottle` "
          "(ViT-Base pré-entraîné, DeiT-Small).")
    w("")


def end_to_end_section(w, e2e: list[dict], base: dict) -> None:
    """8. Image files -> labels: the deployable model through predict.py's pipeline vs the naive baseline."""
    w("## 8. De bout en bout : du fichier image à la décision\n")
    naive = next((r for r in e2e if r["variant"] == "naive-pytorch-fp32"), None)
    pipe = next((r for r in e2e if r is not naive), None)
    if naive is None or pipe is None:
        w("Non mesuré dans cette exécution (`--skip-end-to-end`, ou aucun modèle déployable écrit). "
          "`python predict.py --input DOSSIER --benchmark` le mesure.\n")
        return
    w(f"Ce que l'usine obtient réellement : {pipe['n_images']} fichiers image du test lus, décodés, redimensionnés "
      f"et classés, {pipe['runs']} passages alternés de chaque chemin après échauffement, dans la même exécution. "
      f"Chemin naïf : PIL puis `{Path(naive['file']).name}` en PyTorch fp32, une image après l'autre (batch 1). "
      f"Chemin optimisé : `predict.py` avec le modèle déployable `{pipe['variant']}` ({pipe['backend']}, "
      f"{pipe['precision']}), décodage dans {pipe['decode_workers']} thread(s) en parallèle, batch "
      f"{pipe['batch_size']}, {pipe['threads']} thread(s) pour le moteur.\n")
    w("| chemin | images/s (médiane) | lecture (ms/img) | décodage (ms/img) | redimensionnement (ms/img) | "
      "modèle (ms/img) | modèle occupé (% du temps) | accélération |")
    w("|---|---|---|---|---|---|---|---|")
    for r in (naive, pipe):
        w(f"| `{r['variant']}` | {num(r, 'end_to_end_img_s', 1)} | {num(r, 'read_ms_per_img', 2)} | "
          f"{num(r, 'decode_ms_per_img', 2)} | {num(r, 'resize_ms_per_img', 2)} | {num(r, 'model_ms_per_img', 2)} | "
          f"{num(r, 'model_busy_pct', 0)} | {num(r, 'end_to_end_speedup', 2)}x |")
    target = pipe.get("target_end_to_end_8x", "")
    verdict_text = ("atteint" if yes(target) else "**non atteint**") if target else \
        "non jugé (d'autres processus occupaient le CPU pendant la mesure)"
    w(f"\nObjectif « ×{TARGET_END_TO_END_SPEEDUP:g} de bout en bout » : {verdict_text} "
      f"({num(pipe, 'end_to_end_speedup', 2)}x). Les décisions des deux chemins sont identiques sur "
      f"{num(pipe, 'agreement', 1, 100)} % des images. Le décodage et le "
      "redimensionnement sont faits en parallèle du modèle : quand le modèle est rapide, ils deviennent la limite "
      "(comparer le temps de décodage au temps du modèle ci-dessus) ; plus de cœurs décodent plus d'images à la "
      "fois.\n")


def detector_section(w, det: list[dict], base: dict) -> None:
    """9. The good-only detector (train/good only) vs the supervised classifier on images neither trained on."""
    w("## 9. Détecteur « bonnes pièces seulement » vs classifieur supervisé\n")
    overall = next((r for r in det if r.get("defect_type") == "all"), None)
    clf = next((r for r in det if r.get("defect_type") == "common test images: classifier"), None)
    dets = next((r for r in det if r.get("defect_type") == "common test images: detector"), None)
    if overall is None:
        w("Non mesuré dans cette exécution (`--skip-detector`). `python anomaly_detector.py --category ...` le "
          "mesure.\n")
        return
    pixel = f", AUROC pixel {num(overall, 'pixel_auroc', 3)}" if overall.get("pixel_auroc") else \
        " (pas de masques `ground_truth/` : pas d'AUROC pixel)"
    w(f"`anomaly_detector.py` : banque de {overall['bank_patches']} patchs des blocs `{overall['feature_layers']}` de "
      f"`{overall['model_name']}` "
      + ("(initialisé aléatoirement : mode démo), " if base["mode"] == "demo" else
         "**pré-entraîné** (pas le modèle affiné, qui a vu des défauts de `test/`), ")
      + f"construite sur {overall['n_train_good']} images `train/good` seulement ; " + detector_threshold_text(overall)
      + f" Sur le test officiel MVTec ({overall['n_test']} images, hors images du seuil) : AUROC image "
      f"{num(overall, 'image_auroc', 3)}{pixel}, accuracy {num(overall, 'accuracy', 2, 100)} %, rappel "
      f"{num(overall, 'recall', 3)}, fausses alarmes {num(overall, 'false_alarm_rate', 3)} ; "
      f"{num(overall, 'end_to_end_ms_per_img', 1)} ms par image de bout en bout ({overall['backend']}, "
      f"{overall['batch_size']} images par appel), banque "
      f"{num(overall, 'size_mb', 2)} Mo + backbone {num(overall, 'backbone_mb', 2)} Mo.\n")
    if clf is None or dets is None:
        return
    w(f"Comparaison à armes égales sur les {clf['n_test']} images que **ni l'un ni l'autre** n'a vues à "
      "l'entraînement : les images de test du classifieur (jamais utilisées pour l'entraîner ni pour choisir son "
      "seuil) qui sont dans `test/` (le détecteur n'a vu que `train/good`). Chacun à son propre seuil :\n")
    w("| modèle | données d'entraînement | AUROC image | accuracy (%) [IC 95 %] | rappel | fausses alarmes |")
    w("|---|---|---|---|---|---|")
    for name, r, trained in (("classifieur supervisé", clf, "bonnes **et** défectueuses"),
                             ("détecteur", dets, "bonnes seulement")):
        w(f"| {name} (`{r.get('model_name') or overall['model_name']}`) | {trained} | {num(r, 'image_auroc', 3)} | "
          f"{num(r, 'accuracy', 2, 100)} [{num(r, 'accuracy_ci_low', 2, 100)}–{num(r, 'accuracy_ci_high', 2, 100)}] | "
          f"{num(r, 'recall', 3)} | {num(r, 'false_alarm_rate', 3)} |")
    w("\nLe détecteur n'a besoin d'aucune image de défaut et dit **où** est le défaut (carte d'anomalie : "
      "`predict.py --model modeles/detector_<catégorie>.safetensors --heatmaps DOSSIER`) ; le classifieur "
      "supervisé profite des défauts vus à l'entraînement mais ne reconnaît que ceux-là.\n")


FRENCH_TARGET_NAMES = ("temps −80 %", "coût −70 %", "taille < 30 Mo", "accuracy > 95 %", "perte < 1 point",
                 "parité ONNX")
ADVICE = {
    "target_time_80": "Pour y arriver : un modèle plus petit (étudiant distillé, DeiT-Tiny), int8 ONNX Runtime, "
                      "un CPU avec VNNI/AMX, ou un GPU pour les gros volumes.",
    "target_cost_70": "Le coût suit la latence à prix horaire égal : mêmes leviers que pour le temps, ou une VM moins "
                      "chère.",
    "target_size_30mb": "int8 divise la taille par quatre au mieux : il faut un modèle avec moins de paramètres "
                        "(étudiant DeiT-Small / DeiT-Tiny quantifié).",
    "target_accuracy_95": "Entraîner plus longtemps ou avec plus d'images, partir d'un modèle pré-entraîné, "
                          "équilibrer les classes.",
    "target_loss_1pt": "Garder la tête de classification en fp32, quantification par canal, calibration statique, "
                       "ou plus d'époques de distillation.",
    "target_onnx_parity": "Vérifier l'export (opset, prétraitement identique) et comparer les logits fp32 avant "
                          "toute quantification.",
}


def latency_tail(r: dict) -> str:
    """The p99 when there were enough timed runs for one (lab_io.P99_MIN_RUNS), else the slowest run, named so."""
    if r.get("latency_p99_ms", "") != "":
        return num(r, "latency_p99_ms", 2)
    return f"max {num(r, 'latency_max_ms', 2)}"


def detector_threshold_text(overall: dict) -> str:
    if str(overall.get("n_threshold_defective", "")) not in ("", "0"):
        n = int(overall["n_threshold_good"]) + int(overall["n_threshold_defective"])
        return (f"seuil = meilleure accuracy équilibrée sur les {n} images de validation du découpage du TP "
                f"({overall['n_threshold_good']} bonnes, {overall['n_threshold_defective']} défectueuses, hors banque "
                f"et hors test ; AUROC image {num(overall, 'threshold_image_auroc', 3)} sur elles).")
    return (f"seuil = score maximal de {overall['n_holdout_good']} bonnes images tenues à l'écart (aucun défaut "
            f"utilisé).")


GUARD_KINDS_FR = {"conversion": "de conversion", "quantization": "de quantification",
                  "distillation": "de distillation"}


def describe_variant(r: dict, base: dict, by: dict) -> str:
    text = (f"`{r['variant']}` : latence {num(r, 'latency_median_ms', 2)} ms contre "
            f"{num(base, 'latency_median_ms', 2)} ms pour la référence (accélération {num(r, 'speedup', 2)}x), "
            f"débit {num(r, 'throughput_img_s', 1)} img/s contre {num(base, 'throughput_img_s', 1)}, taille "
            f"{num(r, 'size_mb', 2)} Mo ("
            + (f"{num(r, 'size_ratio', 2)}x plus petit" if Decimal(r["size_ratio"]) >= 1
               else "plus gros que la référence")
            + "), accuracy "
            f"{num(r, 'accuracy', 2, 100)} % (IC 95 % de Wilson {num(r, 'accuracy_ci_low', 1, 100)}-"
            f"{num(r, 'accuracy_ci_high', 1, 100)} %, {num(r, 'accuracy_delta_pt', 2)} pt ; une image = "
            f"{num(r, 'one_image_pt', 2)} pt ; seuil {num(r, 'threshold', 3)} choisi sur la validation).")
    if r["device"] != "cpu":
        text += (f" Sur GPU (`{r['device_name']}`), facturé {num(r, 'price_per_hour', 3)} USD/h : coût "
                 f"{sig(r, 'cost_per_1000_images_usd')} USD pour 1000 images contre "
                 f"{sig(base, 'cost_per_1000_images_usd')} sur CPU ; ligne indicative, pas la référence.")
    if r.get("guard_split", ""):
        kind = GUARD_KINDS_FR.get(r["guard"].split(":")[0], r["guard"].split(":")[0])
        text += (f" Garde-fou {kind} contre `{r['guard_reference']}` sur {r['guard_images']} images "
                 f"{r['guard_split']} (sans étiquette) : {num(r, 'guard_agreement', 2, 100)} % de décisions identiques, "
                 f"{verdict(r['guard_passed'])}. Sur le test (rapporté, lu par aucun choix) : {r['flips']} "
                 f"prédictions changées sur {r['n_test']} (good → anomaly {r['flips_good_to_anomaly']}, anomaly → "
                 f"good {r['flips_anomaly_to_good']}), p exacte de McNemar {num(r, 'mcnemar_p', 2)}.")
    if r["onnx_graph_checked"]:
        ref = by.get(r["guard_reference"], {})
        text += (f" Conversion ONNX (`{r['onnx_graph_checked']}` contre `{r['guard_reference']}`) : "
                 f"{num(r, 'onnx_graph_agreement', 2, 100)} % de décisions identiques sur train + val, écart "
                 f"d'accuracy sur le test {num(r, 'onnx_graph_accuracy_delta_pt', 2)} pt (garde-fou "
                 f"{verdict(r['target_onnx_parity'])}).")
        if ref and ref is not base:
            text += (f" Par rapport à `{ref['variant']}` ({num(ref, 'latency_median_ms', 2)} ms), ONNX Runtime "
                     f"mesure {num(r, 'latency_median_ms', 2)} ms.")
    if r["role"] == "student" and r["backend"] == "pytorch":
        text += (f" L'étudiant a {num(r, 'params_m', 2)} M paramètres contre {num(base, 'params_m', 2)} M pour la "
                 "référence.")
    if r["variant"] == "ort-int8-dynamic" and "pytorch-int8-dynamic" in by:
        t = by["pytorch-int8-dynamic"]
        text += (f" Même quantification int8 côté PyTorch : {num(t, 'latency_median_ms', 2)} ms, "
                 f"{num(t, 'size_mb', 2)} Mo.")
    return text


# --------------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------------
COLORS = {("baseline", "pytorch", False): ("tab:gray", "PyTorch fp32 (baseline)"),
          ("baseline", "pytorch", True): ("tab:purple", "PyTorch int8 / bf16"),
          ("baseline", "onnxruntime", False): ("tab:blue", "ONNX Runtime fp32"),
          ("baseline", "onnxruntime", True): ("tab:orange", "ONNX Runtime int8"),
          ("baseline", "openvino", False): ("tab:cyan", "OpenVINO fp32"),
          ("baseline", "openvino", True): ("tab:pink", "OpenVINO bf16 / int8 (NNCF)"),
          ("student", "pytorch", False): ("tab:olive", "student PyTorch fp32"),
          ("student", "onnxruntime", True): ("tab:green", "student ONNX Runtime int8"),
          ("student", "openvino", True): ("tab:brown", "student OpenVINO int8 (NNCF)")}


def color_key(r: dict) -> tuple:
    return r["role"], r["backend"], r["precision"] != "fp32"


def color_of(r: dict) -> str:
    return COLORS.get(color_key(r), ("tab:red", ""))[0]


MANY_BARS = 12  # past this many variants (hybrid and student rows), labels get smaller, turned, or fewer


def _named_points(rows: list[dict], lat: np.ndarray, accuracy: np.ndarray) -> set:
    """The scatter points that get their name: all of them up to MANY_BARS, else the baseline, the recommended one
    and the best trade-offs (no other variant both faster and at least as accurate): 22 names would cover the panel."""
    if len(rows) <= MANY_BARS:
        return set(range(len(rows)))
    front = {i for i in range(len(rows)) if not any(
        lat[j] < lat[i] and accuracy[j] >= accuracy[i] for j in range(len(rows)))}
    return front | {0} | {i for i, r in enumerate(rows) if r["recommended"] == "True"}


def _accuracy_vs_latency(ax, rows: list[dict], lat: np.ndarray, accuracy: np.ndarray, colors: list, lat_target: float,
                         base_acc: float) -> None:
    """The scatter panel: accuracy (%) against batch-1 latency (log), the targets' lines and zone."""
    acc_floor = max(TARGET_MIN_ACCURACY * 100, base_acc - TARGET_MAX_LOSS_PT)
    ax.axvspan(min(lat.min(), lat_target) * 0.5, lat_target, ymin=0, ymax=1, color="tab:green", alpha=0.07)
    ax.axvline(lat_target, color="tab:red", linestyle="--", linewidth=1.2)
    ax.axhline(TARGET_MIN_ACCURACY * 100, color="tab:red", linestyle="--", linewidth=1.2)
    ax.axhline(base_acc - TARGET_MAX_LOSS_PT, color="tab:brown", linestyle=":", linewidth=1.2)
    named = _named_points(rows, lat, accuracy)
    for i, r in enumerate(rows):
        rec = r["recommended"] == "True"
        ax.scatter(lat[i], accuracy[i] * 100, s=260 if rec else 70, marker="*" if rec else "o",
                   color=colors[i], edgecolor="black", zorder=3)
    for k, i in enumerate(sorted(named, key=lambda j: lat[j])):  # from left to right, above and below in turn
        ax.annotate(rows[i]["variant"], (lat[i], accuracy[i] * 100), xytext=(5, 7 if k % 2 == 0 else -14),
                    textcoords="offset points", fontsize=8, zorder=4,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})
    ax.set_xscale("log")
    ax.set_xlim(min(lat.min(), lat_target) * 0.5, lat.max() * 2)
    lo = min(accuracy.min() * 100, acc_floor) - 5
    ax.set_ylim(max(0, lo), 102)
    ax.set_title("Accuracy vs latency (green zone: -80 % time; star = recommended)"
                 + ("" if len(named) == len(rows) else "\nnamed: baseline, recommended, best trade-offs"))
    ax.set_xlabel("latency at batch 1, ms per image (median, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3, which="both")


def _legend_handles(rows: list[dict]) -> list:
    """One entry per colour present, the GPU hatch when a GPU row exists, the target lines, the recommended mark."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    present = {color_key(r) for r in rows}
    handles = [Patch(color=c, label=lab) for key, (c, lab) in COLORS.items() if key in present]
    if any(r["device"] != "cpu" for r in rows):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="GPU (extra row, GPU price)"))
    handles += [Line2D([], [], color="tab:red", linestyle="--", label="business target"),
                Line2D([], [], color="tab:brown", linestyle=":", label="baseline accuracy - 1 pt"),
                Patch(facecolor="white", edgecolor="black", linewidth=2.5, label="* recommended variant")]
    return handles


def plot_summary(rows: list[dict], path: Path, title: str, overwrite: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = {k: np.array([float(r[k]) for r in rows]) for k in
         ("latency_median_ms", "latency_p95_ms", "size_mb", "accuracy", "cost_per_1000_images_usd",
          "throughput_img_s")}
    names = [r["variant"] + (" *" if r["recommended"] == "True" else "") for r in rows]
    colors = [color_of(r) for r in rows]
    hatches = ["//" if r["device"] != "cpu" else "" for r in rows]
    base = rows[0]
    base_lat, base_acc, base_cost = f["latency_median_ms"][0], f["accuracy"][0] * 100, f["cost_per_1000_images_usd"][0]
    nb = base["throughput_batch_size"]
    fig, axes = plt.subplots(2, 3, figsize=(19, 10.5))
    x = np.arange(len(rows))
    many = len(rows) > MANY_BARS  # value labels turned upright, so that neighbours do not run into each other

    def bars(ax, values, title_, unit, fmt, target=None, target_label=None, err=None, log=False):
        b = ax.bar(x, values, color=colors, hatch=hatches, edgecolor="black", linewidth=0.6,
                   yerr=[np.zeros_like(err), err] if err is not None else None, capsize=4)
        for bar, i in zip(b, range(len(values))):
            if rows[i]["recommended"] == "True":
                bar.set_linewidth(2.5)
            top = values[i] + (err[i] if err is not None else 0)
            ax.annotate(fmt(values[i]), (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom",
                        fontsize=6.5 if many else 8, rotation=90 if many else 0, xytext=(0, 2),
                        textcoords="offset points")
        if target is not None:  # the target's value goes in the title: a label in the plot would hide bars
            ax.axhline(target, color="tab:red", linestyle="--", linewidth=1.2)
            title_ += f"\n(red line: {target_label})"
        if log:
            ax.set_yscale("log")
            unit += ", log scale"
        ax.set_title(title_)
        ax.set_ylabel(unit)
        ax.set_xticks(x, names, rotation=40 if many else 25, ha="right", rotation_mode="anchor",
                      fontsize=7 if many else 8)
        ax.margins(y=0.3 if many else 0.2)  # room for the turned value labels

    def short(v):  # 2410, 0.797, 0.000026: no scientific notation
        return f"{v:,.0f}" if v >= 100 else np.format_float_positional(v, precision=3, unique=False, fractional=False,
                                                                      trim="-")

    span = lambda v: v.max() / max(v.min(), 1e-12) > 30  # noqa: E731 - log scale when bars differ hugely
    lat = f["latency_median_ms"]
    lat_target = base_lat * (1 - TARGET_TIME_REDUCTION_PCT / 100)
    cost_target = base_cost * (1 - TARGET_COST_REDUCTION_PCT / 100)
    bars(axes[0, 0], lat, "Latency at batch 1 (median, whisker = p95)", "ms per image", short,
         target=lat_target, target_label=f"target -80 % time = {short(lat_target)} ms",
         err=f["latency_p95_ms"] - lat, log=span(f["latency_p95_ms"]))
    bars(axes[0, 1], f["throughput_img_s"], f"Throughput at batch {nb}", "images / s", short,
         log=span(f["throughput_img_s"]))
    bars(axes[0, 2], f["size_mb"], "Size on disk", "MB (10^6 bytes)", short,
         target=TARGET_MAX_SIZE_MB, target_label=f"target < {TARGET_MAX_SIZE_MB:g} MB", log=span(f["size_mb"]))
    bars(axes[1, 0], f["accuracy"] * 100, "Accuracy on the test split", "accuracy (%)", lambda v: f"{v:.1f}",
         target=TARGET_MIN_ACCURACY * 100, target_label=f"target > {TARGET_MIN_ACCURACY * 100:g} %")
    axes[1, 0].axhline(base_acc - TARGET_MAX_LOSS_PT, color="tab:brown", linestyle=":", linewidth=1.2)
    axes[1, 0].set_ylim(0, 118 if many else 108)
    bars(axes[1, 1], f["cost_per_1000_images_usd"], "Cost per 1 000 images (batch-1 latency x price)",
         "USD per 1 000 images", short, target=cost_target,
         target_label=f"target -70 % cost = {short(cost_target)} USD", log=span(f["cost_per_1000_images_usd"]))

    _accuracy_vs_latency(axes[1, 2], rows, lat, f["accuracy"], colors, lat_target, base_acc)
    handles = _legend_handles(rows)
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    out = save_figure(fig, path, overwrite)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------
# From the CSV: both outputs, and the command line
# --------------------------------------------------------------------------------------------------
def figure_title(rows: list[dict]) -> str:
    base = rows[0]
    student = next((r for r in rows if r["role"] == "student"), None)
    return (f"Optimisation chain - {base['category']}, baseline {base['baseline_model']}"
            + (f", student {student['model_name']}" if student else "")
            + f" - {base['cpu_name']}, {base['threads']} thread(s), {len(rows)} variants"
            + (" - DEMO: synthetic data, random-init models" if base["mode"] == "demo" else ""))


REPORT_TEXT_COLUMNS = ("variant", "device", "role", "recommended")
REPORT_NUMBER_COLUMNS = ("latency_median_ms", "latency_p95_ms", "size_mb", "accuracy", "cost_per_1000_images_usd",
                         "throughput_img_s")


def check_report_rows(rows: list[dict], csv_path: Path) -> None:
    """The columns the report reads are there, and its numbers are numbers: a CSV changed by hand (a column
    deleted, decimal commas) is named in one line instead of failing halfway through the report."""
    for column in REPORT_TEXT_COLUMNS + REPORT_NUMBER_COLUMNS:
        if any(column not in r for r in rows):
            raise UserError(f"{csv_path} has no column {column!r}: it was changed by hand; give the CSV as "
                            "optimization_pipeline.py wrote it (or run it again)")
    for r in sections(rows)["variant"]:  # the rows of the summary figure, every one of them measured
        for column in REPORT_NUMBER_COLUMNS:
            try:
                float(r[column])
            except ValueError:
                raise UserError(f"{csv_path}: {column} of {r['variant']} is {r[column]!r}, not a number: the CSV was "
                                "changed by hand (e.g. decimal commas); give it as optimization_pipeline.py "
                                "wrote it") from None


def write_report(csv_path: str | Path, run_id: str | None, report: str | Path, figure: str | Path,
                 overwrite: bool = False) -> tuple[Path, Path, list[dict]]:
    """rapport.md and the summary figure of one run of the CSV (None = its last run). Returns both paths and the
    rows used."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path} not found: run optimization_pipeline.py first (it writes it).")
    rows = read_csv_rows(csv_path)
    if not rows or rows[0].get("script") != "optimization_pipeline.py":
        raise UserError(f"{csv_path} holds no row of optimization_pipeline.py (empty, or another CSV).")
    run_id = run_id or rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run_id]
    if not rows:
        raise UserError(f"no row with run_id {run_id} in {csv_path}.")
    check_report_rows(rows, csv_path)
    variants = sections(rows)["variant"]
    png = plot_summary(variants, Path(figure), figure_title(variants), overwrite)
    report = Path(report)
    atomic_write_text(report, report_markdown(rows, csv_path), overwrite)
    return report, png, rows


def main(argv=None) -> int:
    p = ArgumentParser(description="Write the French report (rapport.md) and the summary figure of one run "
                                   "of the optimisation pipeline from its CSV, without measuring again.")
    p.add_argument("--csv", default=f"resultats/{REPORT_CSV}",
                   help=f"the pipeline's CSV (default: resultats/{REPORT_CSV})")
    p.add_argument("--run-id", default=None, help="which run of the CSV (default: the last one)")
    p.add_argument("--report", type=output_file, default=REPORT_MD, help=f"the report to write (default: {REPORT_MD})")
    p.add_argument("--figure", type=output_file, default=None,
                   help=f"the figure to write (default: {REPORT_PNG} next to the CSV)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report and figure instead of keeping the earlier ones with a timestamp")
    args = p.parse_args(argv)
    figure = args.figure or Path(args.csv).with_name(REPORT_PNG)
    report, png, rows = write_report(args.csv, args.run_id, args.report, figure, args.overwrite)
    print(f"{report} and {png} written from the {len(rows)} rows of run {rows[0]['run_id']} of {args.csv}")
    return 0


if __name__ == "__main__":
    run_cli(main)
