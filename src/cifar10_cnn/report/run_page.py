"""What one run's report says: the summary, the test protocol, and the sections in reading order."""

from __future__ import annotations

from ..runs import RUN_FILES
from .fmt import NA, ci, ci_text, count, duration, ece_after, ece_text, flt, params, pct, tta, value, yes_no
from .load import RunData, class_names, explained, number
from .model import Figure, Headline, Page, Section, Table
from .tables import (
    CONFUSED_PAIRS,
    MATRIX_CLASSES,
    calibration_table,
    config_table,
    confusion_table,
    metrics_table,
    per_class_table,
    robustness_table,
)

# Known figures (runs.RUN_FILES keys) with captions; other PNGs in plots/ follow, captioned by name.
FIGURES = {
    "reliability_png": "Reliability diagram on the test set: accuracy against confidence in 15 bins, "
    "before and after temperature scaling; bars below the diagonal are over-confident. The grey bars show "
    "where the images are.",
    "confusion_png": "Confusion matrix on the test set: rows are true classes, columns predicted classes.",
    "per_class_png": "Test precision, recall (accuracy) and F1 per class; the dashed line is the mean "
    "accuracy over classes.",
    "confident_errors_png": "The test images the model got wrong with the highest confidence.",
    "explanations_png": "Grad-CAM heatmaps of test images: each input, then the map of its true class and of "
    "the predicted class (for correct predictions, of the runner-up class), with the model's probability of "
    "each; red is where the evidence for that class is.",
    "predictions_png": "Sample test predictions with confidence: green titles are right, red are wrong.",
    "corruptions_png": "Test accuracy under each corruption by severity (regenerated CIFAR-10-C "
    "approximation); the dashed black line is the mean over corruptions.",
    "curves_png": "Loss and accuracy per epoch (train and validation); the dotted line marks the best "
    "validation epoch.",
    "augmentations_png": "Training images as the model sees them, after augmentation.",
}
SECTION_FIGURES = {
    "calibration": ["reliability_png"],
    "classes": ["per_class_png", "confusion_png"],
    "errors": ["confident_errors_png", "predictions_png"],
    "explanations": ["explanations_png"],
    "robustness": ["corruptions_png"],
    "training": ["curves_png", "augmentations_png"],
}

ROBUSTNESS_HINT = "Not measured: `cifar10 evaluate RUN --corruptions` adds it."
EXPLANATIONS_HINT = "Not computed: `cifar10 evaluate RUN` adds it (with Captum installed)."
NO_RESULTS = "results.json not found: no evaluation yet."
ECE_NOTE = (
    "ECE: the image-weighted mean of |accuracy − confidence| over 15 equal-width confidence bins; MCE: the "
    "largest gap of any bin (bins with few images make it noisy). NLL and Brier score are proper scoring "
    "rules: lower is better."
)


def data_source(results: dict) -> str:
    data = results.get("data")
    if not isinstance(data, dict):
        return NA
    source = str(data.get("source") or NA)
    if data.get("kind") == "folder":
        return f"{source} ({_folder_notes(data)})"
    verified = data.get("verified")
    how = "md5" if data.get("kind") == "cifar100" else "sha256"
    check = NA if verified is None else (f"{how} verified" if verified else "NOT verified")
    return f"{source} ({check})"


SKIPPED_NAMED = 10  # at most this many skipped files named (training records 3; the file may be hostile)


def _folder_notes(data: dict) -> str:
    """What a folder of images gave: its classes, what was checked, the files skipped (the first named), leakage."""
    classes = data.get("classes") if isinstance(data.get("classes"), list) else []
    parts = [f"your own images, {len(classes)} classes"]
    if isinstance(data.get("checked"), str):  # never "verified": nothing published to check them against
        parts.append(data["checked"][:200])
    skipped, first = number(data.get("skipped")) or 0, data.get("skipped_first")
    if skipped:
        names = "; ".join(str(x) for x in first[:SKIPPED_NAMED]) if isinstance(first, list) else ""
        parts.append(
            f"{int(skipped):,} files skipped, not readable images" + (f" (first: {names})" if names else "")
        )
    duplicates = number(data.get("train_test_duplicates")) or 0
    if duplicates:
        parts.append(f"warning: {int(duplicates):,} test images identical to training images (leakage)")
    return "; ".join(parts)


def summary(run: RunData) -> list[tuple[str, str]]:
    r, c = run.results, run.config
    epochs = count(r.get("epochs_run"))
    if epochs != NA and number(c.get("epochs")) is not None:
        epochs += f" of {count(c.get('epochs'))}"
    best_epoch, best = count(r.get("best_epoch")), pct(r.get("best_val_accuracy"))
    if best != NA and best_epoch != NA:
        best += f" (epoch {best_epoch})"
    sizes = " / ".join(count(r.get(k)) for k in ("train_size", "val_size", "test_size"))
    return [
        ("Test accuracy", pct(r.get("test_accuracy"))),
        ("95% interval (Wilson)", ci_text(r)),
        ("Calibration error (ECE, 15 bins)", ece_text(r)),
        ("Model", value(r.get("model", c.get("model")))),
        ("Parameters", params(r.get("params"))),
        ("Recipe", value(c.get("recipe", r.get("recipe")))),
        ("Data", data_source(r)),
        ("Train time", duration(r.get("train_seconds"))),
        ("Top-2 accuracy", pct(r.get("test_top2_accuracy"))),
        ("Test loss (NLL)", flt(r.get("test_loss"))),
        ("Macro F1", pct(r.get("macro_f1"))),
        ("Mean corruption accuracy", pct(r.get("mean_corruption_accuracy")) if run.robustness else NA),
        ("Best validation accuracy", best),
        ("Train / val / test images", sizes),
        ("Epochs run", epochs),
        ("Stopped early", yes_no(r.get("stopped_early"))),
        ("Weights evaluated", value(r.get("weights"))),
        ("Test-time augmentation", tta(r)),
        ("Device", value(r.get("device", c.get("device")))),
        ("Test accuracy known after", duration(r.get("headline_seconds"))),
        ("Evaluation time", duration(r.get("eval_seconds"))),
        ("Created", value(r.get("created"))),
    ]


def protocol_sentence(run: RunData) -> str:
    """How the test set was used: stated, because reusing it for selection inflates the figure."""
    test = count(run.results.get("test_size"))
    test_part = f"The test set ({test} images)" if test != NA else "The test set"
    val = number(run.results.get("val_size", run.config.get("val_size")))
    if val is None:
        return f"{test_part} was used only for this final evaluation."
    if val > 0:
        return (
            f"{test_part} was used only for this final evaluation; model selection "
            f"(best epoch, early stopping) and the temperature used the validation split of {int(val):,} "
            "images held out from the training set."
        )
    return (
        f"{test_part} was used only for this final evaluation. No validation split was held out, "
        "so no model selection was done: the weights are those of the last epoch."
    )


def unreadable_note(run: RunData) -> list[str]:
    """What the run's files held that the report could not read (shown as n/a), if anything."""
    return [f"Could not read (shown as n/a): {'; '.join(run.unreadable)}."] if run.unreadable else []


def _figures(run: RunData, section: str) -> list[Figure]:
    return [
        Figure(run.figures[key], FIGURES[key], RUN_FILES[key])
        for key in SECTION_FIGURES[section]
        if key in run.figures
    ]


def _calibration(run: RunData) -> Section:
    cal = run.evaluation.get("calibration")
    section = Section("Calibration", [str(cal.get("note") or "")] if isinstance(cal, dict) and cal else [])
    if isinstance(cal, dict) and isinstance(cal.get("warning"), str):  # fitted on few validation images
        section.blocks.append(cal["warning"][:300])
    section.blocks += [calibration_table(run) or "Not measured yet: `cifar10 evaluate RUN` adds it."]
    return Section(section.heading, [*section.blocks, *_figures(run, "calibration"), ECE_NOTE])


def _classes(run: RunData) -> Section:
    section = Section("Per-class results", [per_class_table(run) or NO_RESULTS, *_figures(run, "classes")])
    cm = confusion_table(run)
    if cm and len(class_names(run.results)) > MATRIX_CLASSES:
        intro = f"The {CONFUSED_PAIRS} most frequent confusions (the full matrix is in results.json):"
        section.blocks += [intro, cm]
    elif cm:
        section.blocks += ["Confusion matrix, counts (rows true class, columns predicted class):", cm]
    return section


def _explanations(run: RunData) -> Section:
    x = run.evaluation.get("explanations")
    figures = _figures(run, "explanations")
    if not figures:
        note = x.get("note") if isinstance(x, dict) else None
        return Section("Where the model looks", [f"Not computed: {note}." if note else EXPLANATIONS_HINT])
    text = (
        f"{value(x.get('method'))} on layer `{value(x.get('layer'))}` for {len(explained(run.evaluation))} "
        f"test images, computed in {duration(x.get('seconds'))}: where in each image the evidence for a class "
        "is. A map that covers the background rather than the object is a reason to doubt the prediction. "
        "`cifar10 explain RUN IMAGES` does the same for any image."
    )
    return Section("Where the model looks", [text, *figures])


def _robustness(run: RunData) -> Section:
    rob = run.robustness
    if not rob:
        return Section("Robustness to common corruptions", [ROBUSTNESS_HINT])
    text = (
        f"{rob.get('note', '')} Measured on the first {count(rob.get('images'))} test images without "
        f"test-time augmentation (seed {value(rob.get('seed'))}); clean accuracy on them "
        f"{pct(rob.get('clean_accuracy'))}, mean corruption accuracy "
        f"{pct(rob.get('mean_corruption_accuracy'))}."
    )
    return Section(
        "Robustness to common corruptions", [text, robustness_table(run) or NA, *_figures(run, "robustness")]
    )


def _training(run: RunData) -> Section:
    figures = _figures(run, "training")  # the curves above the table they draw, the rest below
    table = metrics_table(run) or "metrics.csv not found or empty."
    return Section("Training", [*figures[:1], table, *figures[1:]])


def sections(run: RunData) -> list[Section]:
    """The report's sections in reading order."""
    errors = Section("Errors", _figures(run, "errors") or ["No prediction plots found."])
    config = Section("Configuration", [config_table(run) or "config.json not found."])
    out = [_calibration(run), _classes(run), errors, _explanations(run), _robustness(run), _training(run)]
    out.append(config)
    if run.extra_plots:
        figures = [Figure(p, caption, p.relative_to(run.path).as_posix()) for p, caption in run.extra_plots]
        out.append(Section("Other plots", list(figures)))
    return out


def run_page(run: RunData) -> Page:
    """One run's report page."""
    rows = summary(run)
    interval = ci(run.results)
    headlines = [
        Headline(
            "Test accuracy",
            rows[0][1],
            f"95% CI {interval[0] * 100:.2f}% to {interval[1] * 100:.2f}%" if interval else "",
        ),
        Headline("Calibration error (ECE)", pct(run.results.get("test_ece")), ece_after(run.results), True),
    ]
    return Page(
        title=f"Run report: {run.name}",
        lead=(f"Test accuracy: {rows[0][1]}", f" (95% interval {rows[1][1]}); ECE {rows[2][1]}"),
        headlines=headlines,
        facts=rows[3:],
        sections=sections(run),
        summary=Table(["summary", "value"], [[k, v] for k, v in rows]),
        notes=[protocol_sentence(run), *unreadable_note(run)],
    )
