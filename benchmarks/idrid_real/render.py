"""idrid_real's BENCHMARKS.md section: every row of `ROWS`, as measured."""

from __future__ import annotations

import json

from benchmarks.idrid_real.rows import FINAL_MINUTES, KIND_NAMES, ROWS, STAGE1_KINDS
from benchmarks.idrid_real.split import VAL_NAMES


def _fmt(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_idrid_real(result: dict, machine: dict, settings) -> str:
    """The BENCHMARKS.md section: every row of `ROWS`, "not measured yet" where not measured."""
    rows = result.get("rows", {})
    minutes = result.get("minutes", FINAL_MINUTES)
    val_names = result.get("val_names", VAL_NAMES)
    title = f"IDRiD, official training portion: {len(val_names)} validation photographs"
    if minutes != FINAL_MINUTES:
        title += f" — {minutes:g}-minute {'quick' if settings.quick else 'screening'} rows"
    lines = [
        f"### idrid_real: {title}",
        "",
        f"From `{result.get('results_file', 'benchmarks/idrid_real.json')}`; split "
        f"validation {', '.join(val_names)}. AP: every pixel pooled "
        "at full resolution; F1 at the threshold shown; region F at sigma 0.5; s/photo: "
        "`rmib evaluate` wall time per photograph. Each row is one command line "
        f"(`--time-limit {minutes:g}`, `--precision float32`), listed below the table.",
        "",
        "| row | lesion | model | seed | AP | F1 (thr) | region F | s/photo | CPU, pinning |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands = []
    final = minutes == FINAL_MINUTES
    for key, (lesion, kind, seed) in ROWS.items():
        names = [key] + sorted(n for n in rows if n.startswith(f"{key}+"))
        if rows.get(key) is None and final:
            lines.append(f"| {key} | {lesion or '—'} | {KIND_NAMES[kind]} | {seed} | "
                         "not measured yet | | | | |")  # fmt: skip
        for name in names:
            row = rows.get(name)
            if row is None:
                continue
            model = row["kind"]
            if row.get("lever"):
                model += f"; lever **{row['lever']['name']}**: {row['lever']['description']}"
            if row.get("epochs_trained"):
                epochs = row["epochs_trained"]
                model += f" ({epochs} epoch{'s' * (epochs != 1)}, kept {row.get('weights', 'last')}"
                model += f" {row['best_epoch']})" if row.get("best_epoch") else ")"
            if kind in STAGE1_KINDS:
                score = f"ROC AUC {_fmt(row['roc_auc'])} ({row['n']} validation photographs)"
                lines.append(f"| {name} | — | {model} | {seed} | {score} | | | | "
                             f"{row['cpu']}, {row['pinned']} |")  # fmt: skip
            else:
                lines.append(
                    f"| {name} | {lesion} | {model} | {seed} | {_fmt(row['ap'])} | "
                    f"{_fmt(row['f1'])} ({row['threshold']:g}) | {_fmt(row['region_f'])} | "
                    f"{_fmt(row['seconds_per_photograph'], 1)} | {row['cpu']}, {row['pinned']} |"
                )
            stage1 = f" (stage 1: {row['stage1_run']})" if row.get("stage1_run") else ""
            if row.get("stage1_retrained"):  # the stage-1 model was gone: retrained first
                again = row["stage1_retrained"]
                stage1 = (f" (stage 1: {row['stage1_run']}, retrained with the row's stage-1 "
                          f"command, ROC AUC {_fmt(again['roc_auc'])} on {again['n']} "
                          "validation photographs)")  # fmt: skip
            lever = row.get("lever")
            overrides = f" recipe overrides `{json.dumps(lever['overrides'])}`," if lever else ""
            commands.append(f"- {name}{stage1}:{overrides} `{row['command']}`")
    cost = result.get("frozen_cost")
    if cost:
        lines += [
            "",
            f"The cost of a frozen encoder ({cost['backbone']}, {cost['size']}-px patches, batch "
            f"{cost['batch']}, float32, one core; `python -m benchmarks.idrid_real frozen-cost "
            f"{cost['size']} {cost['batch']}`):",
            "",
            "| frozen step | encoder forward | decoder-only step | frozen / (forward + decoder) "
            "| trainable step |",
            "| --- | --- | --- | --- | --- |",
            f"| {cost['frozen_step']:.2f} s | {cost['encoder_forward']:.2f} s | "
            f"{cost['decoder_step']:.2f} s | {cost['frozen_over_parts']:.2f} | "
            f"{cost['trainable_step']:.2f} s |",
        ]
    if result.get("notes"):
        lines += ["", *(f"- {note}" for note in result["notes"])]
    if commands:
        lines += ["", "Commands:", "", *commands]
    return "\n".join(lines)
