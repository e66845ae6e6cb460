"""Rendering the sweep report: ``report.html`` (standalone), ``report.md`` and ``report.json``.

The page leads with its findings: a summary table per method and sampler steps (per-size compute
exponent, frontier exponent, N_opt ∝ C^a by iso-FLOP profiles, the envelope and the joint law, or
why not, student/teacher ratio and its slope) with one sentence per method. Warnings follow,
grouped by kind with counts and their details collapsed; then the figures (each with its SQL,
collapsed), the fit tables and the runs.
``report.json`` carries every number of the summary, so other tools can read the findings.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from pathlib import Path

from cmscale.analysis import data as D
from cmscale.analysis.report import MethodAnalysis, SweepAnalysis, analyse_sweep, ladder_falls_with_size
from cmscale.analysis.selection import LawChoice, ci_problem

SUMMARY_ID = "summary"


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def _with_ci(name: str, value, ci, digits: int = 3) -> str:
    """``value [lo, hi]``; ``value [unbounded]`` when the CI is wider than the data support; the bare
    value when there is no CI."""
    if ci is None or any(v is None or not math.isfinite(v) for v in ci):
        return _num(value, digits)
    if ci_problem(name, value, ci):
        return f"{_num(value, digits)} [unbounded]"
    return f"{_num(value, digits)} [{_num(ci[0], digits)}, {_num(ci[1], digits)}]"


def _choice_param(choice: LawChoice | None, name: str) -> str:
    if choice is None or choice.kept is None:
        return "not identified"
    if name not in choice.params:
        return "(dropped)"
    return _with_ci(name, choice.params[name], choice.ci.get(name))


def _n_opt_text(fit) -> str:
    if fit.a is None:
        return fit.reason.replace("not identifiable from these runs: ", "not identified: ")
    ci = f" [{_num(fit.ci['a'][0])}, {_num(fit.ci['a'][1])}]" if fit.ci else f" (no CI: {fit.ci_reason})"
    return f"a = {_num(fit.a)}{ci}, {fit.n_budgets} interior"


def _ladder_finding(ladder) -> str:
    steps = sorted({int(step) for step in ladder["step"]})
    at = f"{steps[0]:,} iterations" if len(steps) == 1 else "their own budgets"
    by_size = ", ".join(f"{row.preset} {_num(row.fid)}" for row in ladder.itertuples())
    verdict = "falls with size" if ladder_falls_with_size(ladder) else "does not fall at every larger size"
    return f"Teacher FID at {at} {verdict}: {by_size} (one teacher per size: no CI)."


def _joint_n_opt_text(joint) -> str:
    if joint is None:
        return "not fitted"
    if joint.a is None:
        return joint.reason.replace("not identifiable from these runs: ", "not identified: ")
    ci = f" [{_num(joint.ci[0])}, {_num(joint.ci[1])}]" if joint.ci else f" (no CI: {joint.ci_reason})"
    return f"a = {_num(joint.a)}{ci}"


def n_opt_estimates(result: MethodAnalysis) -> list[tuple[str, float, tuple | None, str]]:
    """(approach, a, CI or None, why no CI) for every approach that estimated N_opt ∝ C^a."""
    estimates = []
    if result.optimal is not None:
        for name, fit in (("iso-FLOP", result.optimal.isoflop), ("envelope", result.optimal.envelope_fit)):
            if fit.a is not None:
                estimates.append((name, fit.a, fit.ci.get("a"), fit.ci_reason or "too few runs"))
    joint = result.joint_n_opt
    if joint is not None and joint.a is not None:
        estimates.append(("joint law", joint.a, joint.ci, joint.ci_reason))
    return estimates


def _n_opt_finding(result: MethodAnalysis) -> str | None:
    """One clause on N_opt ∝ C^a: every approach's estimate, and which CIs exclude 0."""
    estimates = n_opt_estimates(result)
    if not estimates:
        if result.optimal is None:
            return None
        interior, budgets = int(result.optimal.optima["interior"].sum()), len(result.optimal.optima)
        return f"the compute-optimal size is not identified ({interior} of {budgets} budgets interior)"

    def shown(estimate) -> str:
        name, a, ci, _ = estimate
        return f"{name} a = {_num(a, 2)} [{_num(ci[0], 2)}, {_num(ci[1], 2)}]"

    above = [e for e in estimates if e[2] and e[2][0] > 0]
    below = [e for e in estimates if e[2] and e[2][1] < 0]
    spanning = [e for e in estimates if e[2] and e[2][0] <= 0 <= e[2][1]]
    if above and below:
        return "the approaches disagree on the sign of N_opt ∝ C^a: " + "; ".join(map(shown, above + below))
    if above or below:
        verb = "grows" if above else "shrinks"
        text = f"the compute-optimal size {verb} with compute (CI of a excludes 0): " + "; ".join(
            map(shown, above or below)
        )
        if spanning:
            text += "; the CI includes 0 for " + "; ".join(map(shown, spanning))
        return text
    if spanning:
        return (
            "N_opt ∝ C^a, but every CI includes 0: no detectable growth of the compute-optimal size ("
            + "; ".join(map(shown, spanning))
            + ")"
        )
    name, a, _, why = estimates[0]
    return f"N_opt ∝ C^{_num(a, 2)} by {name} (no CI: {why})"


def _finding(result: MethodAnalysis, ratio: dict | None) -> str:
    if result.ladder is not None:
        return _ladder_finding(result.ladder)
    parts = []
    fits = [c for c in result.size_fits.values() if c.kept is not None and "alpha" in c.params]
    falling = [c for c in fits if c.ci.get("alpha") and c.ci["alpha"][0] > 0]
    if fits:
        with_ci = sum(bool(c.ci.get("alpha")) for c in fits)
        parts.append(
            f"FID falls with compute (alpha CI above 0) for {len(falling)} of {len(result.size_fits)} sizes"
            + ("" if with_ci == len(fits) else f" ({len(fits) - with_ci} without a CI)")
        )
    n_opt = _n_opt_finding(result)
    if n_opt:
        parts.append(n_opt)
    if ratio:
        drift = ratio["slope_ci"]
        steady = drift and all(v is not None and math.isfinite(v) for v in drift) and drift[0] < 0 < drift[1]
        parts.append(
            f"students reach {_num(ratio['mean_ratio'], 3)}x the teacher's FID"
            + (", with no detectable drift with size" if steady else f", slope {_num(ratio['slope'], 2)} on log N")
        )
    return ("; ".join(parts) + ".") if parts else "Too few evals for any fit."


SUMMARY_HEADER = [
    "method",
    "per-size compute exponent alpha [95% CI]",
    "frontier exponent",
    "N_opt ∝ C^a: iso-FLOP; envelope; joint law",
    "student/teacher FID ratio; slope on log N",
    "what the study shows",
]


LADDER_N_OPT = "- (one teacher per size, each to a fixed budget: a size ladder, not a compute sweep)"


def summary_rows(analysis: SweepAnalysis) -> list[list[str]]:
    rows = []
    for result in analysis.methods:
        if result.ladder is not None:
            rows.append([result.title, "-", "-", LADDER_N_OPT, "-", _ladder_finding(result.ladder)])
            continue
        per_size = "; ".join(f"{p}: {_choice_param(c, 'alpha')}" for p, c in result.size_fits.items()) or "not fitted"
        optimal = result.optimal
        n_opt = (
            "-"
            if optimal is None
            else f"{_n_opt_text(optimal.isoflop)}; envelope: {_n_opt_text(optimal.envelope_fit)}; "
            f"joint law: {_joint_n_opt_text(result.joint_n_opt)}"
        )
        ratio = analysis.ratio.get(result.ratio_group)
        ratio_text = (
            "-"
            if not ratio
            else (
                f"{_with_ci('r', ratio['mean_ratio'], ratio['ci'])}; slope "
                f"{_with_ci('slope', ratio['slope'], ratio['slope_ci'])}"
            )
        )
        rows.append(
            [
                result.title,
                per_size,
                _choice_param(result.frontier, "alpha"),
                n_opt,
                ratio_text,
                _finding(result, ratio),
            ]
        )
    return rows


def report_json(analysis: SweepAnalysis) -> dict:
    """Every number of the summary, per method; nulls carry a reason."""
    methods = []
    for result in analysis.methods:
        ratio = analysis.ratio.get(result.ratio_group)
        methods.append(
            {
                "method": result.method,
                "sampler_steps": result.metric.sampler_steps if result.method != D.TEACHER_METHOD else None,
                "title": result.title,
                "n_runs": int(result.points["run_id"].nunique()),
                "n_evals": len(result.points),
                "per_size": {p: {"params": result.params_of(p), **c.to_json()} for p, c in result.size_fits.items()},
                "frontier": result.frontier.to_json() if result.frontier else None,
                "compute_optimal": result.optimal.to_json() if result.optimal else None,
                "joint": result.joint.to_json() if result.joint else None,
                "n_opt_joint": result.joint_n_opt.to_json() if result.joint_n_opt else None,
                "ladder": (
                    {
                        "sizes": result.ladder.to_dict(orient="records"),
                        "falls_with_size": ladder_falls_with_size(result.ladder),
                    }
                    if result.ladder is not None
                    else None
                ),
                "ratio": (
                    {
                        "group": result.ratio_group,
                        "mean_ratio": ratio["mean_ratio"],
                        "ci": ratio["ci"],
                        "slope": ratio["slope"],
                        "slope_ci": ratio["slope_ci"],
                        "slope_p": ratio["slope_p"],
                        "n_points": ratio["n_points"],
                    }
                    if ratio
                    else None
                ),
                "finding": _finding(result, ratio),
            }
        )
    return D.json_safe(
        {
            "sweep": analysis.sweep,
            "n_runs": len(analysis.runs),
            "n_draws": analysis.n_draws,
            "methods": methods,
            "ratio": analysis.ratio,
            "warnings": [{"kind": w.kind, "text": w.text} for w in analysis.warnings],
        }
    )


def _fit_row(label: str, choice: LawChoice) -> list[str]:
    names = ("E", "A", "B", "alpha", "beta")
    requested = (
        {"E"}
        | set(choice.kept.params if choice.kept else ())
        | ({"A", "B", "alpha", "beta"} if choice.form == "joint" else {"A", "alpha"})
    )
    cells = [_choice_param(choice, n) if n in requested else "" for n in names]
    status = choice.kept.status if choice.kept else "none identified"
    ci = choice.ci_note or ("" if choice.kept is None or choice.kept.bootstrap else "no CI")
    return [label, choice.kept_law or "-", *cells, status, str(choice.kept.n_points if choice.kept else "-"), ci]


FIT_HEADER = ["fit", "law kept (AIC)", "E", "A", "B", "alpha", "beta", "status", "n", "CI note"]


def _tables(analysis: SweepAnalysis) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for every table below the summary."""
    tables = []
    for result in analysis.methods:
        if result.ladder is not None:
            rows = [[r.preset, _num(r.params), str(int(r.step)), _num(r.train_flops), _num(r.fid)]
                    for r in result.ladder.itertuples()]
            tables.append((f"{result.title}: FID by size", ["size", "params", "iterations", "training FLOPs", "FID"],
                           rows, _ladder_finding(result.ladder)))
            continue
        rows = [_fit_row(f"size {p} ({result.params_of(p) / 1e6:.3g}M)", c) for p, c in result.size_fits.items()]
        notes = []
        if result.frontier is not None:
            rows.append(_fit_row("frontier (envelope over runs)", result.frontier))
        if result.joint is not None:
            rows.append(_fit_row("joint E + A N^-alpha + B D^-beta", result.joint))
            joint = result.joint_n_opt
            notes.append(
                "joint law (each run's final eval): N_opt ∝ C^a with a = beta/(alpha+beta): "
                + _joint_n_opt_text(joint)
                + (
                    ""
                    if joint.flops_per_image_exponent is None
                    else f" (training FLOPs per image ∝ N^{joint.flops_per_image_exponent:.3g} across the runs)."
                )
            )
        tables.append(
            (
                f"{result.title}: fits (95% bootstrap CIs, runs resampled, {analysis.n_draws} draws)",
                FIT_HEADER,
                rows,
                " ".join(notes) + " Nested laws are chosen by AIC among those with every parameter inside its bounds; "
                "[unbounded]: the CI spans more than 3 decades, reaches 0 or an exponent bound.",
            )
        )
        optimal = result.optimal
        if optimal is not None and len(optimal.optima):
            rows = [
                [
                    _num(r.compute),
                    _num(r.n_opt),
                    _num(r.n_best),
                    _num(r.y_best),
                    str(r.n_sizes),
                    "interior" if r.interior else "edge",
                    r.reason,
                ]
                for r in optimal.optima.itertuples()
            ]
            note = (
                f"iso-FLOP: {_n_opt_text(optimal.isoflop)}. Envelope: {_n_opt_text(optimal.envelope_fit)}. "
                f"Bootstrap over {optimal.n_runs} runs."
            )
            tables.append(
                (
                    f"{result.title}: compute-optimal size per budget (iso-FLOP profiles)",
                    ["budget C", "N_opt", "best grid size", "FID there", "sizes reaching C", "flag", "reason"],
                    rows,
                    note,
                )
            )
        if result.holdout is not None:
            h = result.holdout
            rows = [
                [
                    r.run_id,
                    r.preset,
                    _num(r.budget_flops),
                    str(int(r.step)),
                    _num(r.train_flops),
                    _num(r.fid),
                    _num(r.pred),
                    f"{r.log_error:+.3f}",
                    f"[{_num(r.ci_lo)}, {_num(r.ci_hi)}]",
                    "yes" if r.inside_ci else "no",
                    f"[{_num(r.pi_lo)}, {_num(r.pi_hi)}]",
                    "yes" if r.inside_pi else "no",
                ]
                for r in h.points.sort_values(["params", "step"]).itertuples()
            ]
            tables.append(
                (
                    f"{result.title}: extrapolation (joint law fitted without budget {_num(h.held_values[0])}; "
                    "one row per held-out run, at its final eval)",
                    [
                        "run",
                        "size",
                        "budget",
                        "step",
                        "train FLOPs",
                        "FID",
                        "predicted",
                        "log error",
                        "curve CI",
                        "in CI",
                        "prediction interval",
                        "in PI",
                    ],
                    rows,
                    f"mean |log error| {h.mean_abs_log_error:.3f}, RMS {h.rms_log_error:.3f}; "
                    f"fit status {h.fit.status}",
                )
            )
    if analysis.ratio:
        rows = [
            [
                group,
                str(r["n_points"]),
                _with_ci("r", r["mean_ratio"], r["ci"]),
                _with_ci("gap", r["gap"], r["gap_ci"]),
                _with_ci("slope", r["slope"], r["slope_ci"]),
                _num(r["slope_p"], 3),
            ]
            for group, r in analysis.ratio.items()
        ]
        tables.append(
            (
                "Teacher-student FID ratio r = FID_student / FID_teacher",
                [
                    "group",
                    "pairs",
                    "mean ratio [95% CI]",
                    "absolute gap [95% CI]",
                    "slope of log r on log N [95% CI]",
                    "p (slope = 0)",
                ],
                rows,
                "Pairs: student run and teacher of the same preset and seed; each student's largest budget. "
                "OLS of log r on log params (statsmodels).",
            )
        )
    return tables


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:1.2em auto;
color:#111;line-height:1.35}
h1{border-bottom:2px solid #333;margin:0 0 .3em}
h2{margin-top:1.6em;border-bottom:1px solid #aaa}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.85em}
td,th{border:1px solid #999;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#e8e8e8}
td:first-child{text-align:left}
figure{margin:1em 0}
img{max-width:100%;width:760px;border:1px solid #ddd}
pre{background:#f4f4f4;border:1px solid #ccc;padding:8px;overflow-x:auto;font-size:0.8em}
#summary{border:4px solid #0b5394;padding:4px 12px;margin:.6em 0}
#summary td{text-align:left}
#summary h2{margin-top:.3em}
.warn{background:#fff3cd;border:1px solid #b38f00;padding:4px 12px}
.note{color:#444;font-size:0.9em}"""


def write_report(
    root: Path | str, sweep: str, out_dir: Path | str, *, n_draws: int = 1000, seed: int = 0
) -> dict[str, Path]:
    """Analyse ``sweep`` from the store under ``root`` and write ``out_dir/report.html`` (standalone),
    ``out_dir/report.md`` (figures in ``out_dir/figures``) and ``out_dir/report.json``.
    Returns {"html": path, "md": path, "json": path}."""
    out_dir = Path(out_dir)
    analysis = analyse_sweep(root, sweep, out_dir / "figures", n_draws=n_draws, seed=seed)
    counts = analysis.runs["status"].value_counts().to_dict()
    facts = (
        f"{len(analysis.runs)} runs ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}); sizes "
        f"{', '.join(analysis.runs.sort_values('params')['preset'].drop_duplicates())}. "
        f"Store: {Path(root) / 'cmscale.duckdb'}. "
        f"{n_draws} bootstrap draws per fit (runs resampled, seed {seed}); analysis took {analysis.seconds:.1f} s."
    )
    compute_note = (
        "Training compute is the student's own counted FLOPs (forward, backward, JVP and teacher forwards per "
        "step); the teacher's pretraining compute is not included in a student's C."
    )
    rows = summary_rows(analysis)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>cmscale report: {html.escape(sweep)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>cmscale report: {html.escape(sweep)}</h1>",
        f"<p class='note'>{html.escape(facts)}</p>",
        f"<div id='{SUMMARY_ID}'><h2>Summary</h2>{_html_table(SUMMARY_HEADER, rows)}"
        f"<p class='note'>{html.escape(compute_note)} Every number here is in report.json.</p></div>",
    ]
    md = [
        f"# cmscale report: {sweep}",
        "",
        facts,
        "",
        "## Summary",
        "",
        _md_table(SUMMARY_HEADER, rows),
        "",
        compute_note,
        "",
    ]
    groups: dict[str, list[str]] = defaultdict(list)
    for warning in analysis.warnings:
        groups[warning.kind].append(warning.text)
    parts.append(f"<h2>Warnings ({len(analysis.warnings)})</h2>")
    md += [f"## Warnings ({len(analysis.warnings)})", ""]
    if not groups:
        parts.append("<p>None: every run finished, every law identified, no optimum at the grid edge.</p>")
        md += ["None.", ""]
    for kind, texts in sorted(groups.items(), key=lambda item: -len(item[1])):
        items = "".join(f"<li>{html.escape(t)}</li>" for t in texts)
        parts.append(
            f"<details class='warn'><summary>{html.escape(kind)}: {len(texts)}</summary><ul>{items}</ul></details>"
        )
        md += (
            [f"<details><summary>{kind}: {len(texts)}</summary>", ""]
            + [f"- {t}" for t in texts]
            + ["", "</details>", ""]
        )
    parts.append("<h2>Figures</h2>")
    md += ["## Figures", ""]
    for record in analysis.figures:
        png = base64.b64encode(record.paths["png"].read_bytes()).decode()
        parts.append(
            f"<figure><h3>{html.escape(record.title)}</h3><img alt='{html.escape(record.title)}' "
            f"src='data:image/png;base64,{png}'><figcaption class='note'>{html.escape(record.caption)}</figcaption>"
        )
        parts += [
            f"<details><summary>SQL behind this figure</summary><pre>{html.escape(sql)}</pre></details>"
            for sql in record.sql
        ]
        parts.append("</figure>")
        rel_png, rel_pdf = record.paths["png"].relative_to(out_dir), record.paths["pdf"].relative_to(out_dir)
        md += [
            f"### {record.title}",
            "",
            f"![{record.title}]({rel_png}) ([PDF]({rel_pdf}))",
            "",
            record.caption,
            "",
            "SQL behind this figure:",
            "",
        ] + [f"```sql\n{sql}\n```\n" for sql in record.sql]
    parts.append("<h2>Tables</h2>")
    md += ["## Tables", ""]
    for title, header, table_rows, note in _tables(analysis):
        parts.append(
            f"<h3>{html.escape(title)}</h3>"
            + _html_table(header, table_rows)
            + (f"<p class='note'>{html.escape(note)}</p>" if note else "")
        )
        md += [f"### {title}", "", _md_table(header, table_rows), ""] + ([note, ""] if note else [])
    run_header = ["run", "method", "size", "params", "budget", "seed", "status"]
    run_rows = [
        [r.run_id, r.method, r.preset, _num(float(r.params)), _num(r.budget_flops), str(r.seed), r.status]
        for r in analysis.runs.itertuples()
    ]
    parts.append(f"<h2>Runs</h2><details><summary>SQL</summary><pre>{html.escape(D.runs_sql(sweep))}</pre></details>")
    parts += [_html_table(run_header, run_rows), "</body></html>"]
    md += ["## Runs", "", f"```sql\n{D.runs_sql(sweep)}\n```", "", _md_table(run_header, run_rows), ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"html": out_dir / "report.html", "md": out_dir / "report.md", "json": out_dir / "report.json"}
    paths["html"].write_text("\n".join(parts))
    paths["md"].write_text("\n".join(md))
    paths["json"].write_text(json.dumps(report_json(analysis), indent=1))
    return paths
