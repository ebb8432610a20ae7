"""Rendering of an evaluation report: the one-page report.md and its PNG plots (matplotlib, imported lazily).

Kept apart from the analyses so that they stay free of I/O: `markdown` needs only the report dict (as in
report.json), each plot the report dict or the arrays the analyses returned for it, and a binary file object.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from alignet_data.evaluation import metrics

PLOT = "levels_accuracy.png"
PLOT_RT = "entropy_rt.png"
PLOT_PCA = "pca.png"
PLOT_HIERARCHY = "hierarchy.png"


def _fmt(row: dict[str, Any], key: str = "accuracy") -> str:
  value = row.get(key, row.get("value"))
  return f"{value:.3f} {_iv(row['ci'])}"


def _iv(ci: Any) -> str:
  return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def interval_methods(node: Any, extra: bool = True) -> list[str]:
  """Every interval method a report (or part of it) uses: its "ci_method" values and (extra) "intervals" keys."""
  found: set[str] = set()
  if isinstance(node, dict):
    if isinstance(node.get("ci_method"), str):
      found.add(node["ci_method"])
    if extra and isinstance(node.get("intervals"), dict):
      found.update(node["intervals"])
    for key, value in node.items():
      if key != "intervals":
        found.update(interval_methods(value, extra))
  elif isinstance(node, list):
    for value in node:
      found.update(interval_methods(value, extra))
  return sorted(found)


def _ci(rows: Any) -> str:
  """Column label naming the method of the "ci" intervals below it: "95% CI, bootstrap_items_n"."""
  return "95% CI, " + " / ".join(interval_methods(list(rows), extra=False))


def _bootstrap_line(boot: dict[str, Any]) -> str:
  protocol = ("the paper's protocol: resamples of up to {size} items" if boot.get("protocol") == "paper"
              else "resamples of all n items (THINGS: also of objects)").format(size=boot.get("size"))
  return (f"Intervals are 95% and name their method (listed at the end); bootstrap: {boot['resamples']} "
          f"{protocol}.")


def markdown(report: dict[str, Any]) -> str:
  """A one-page summary: every figure with its 95% CI (named by method) and n, the plots embedded."""
  lines = ["# Evaluation", "", "Models: " + ", ".join(f"`{n}` ({m['kind']}, d={m['dim']})"
                                                     for n, m in report["models"].items())
           + ". " + _bootstrap_line(report["bootstrap"]), ""]
  if "things" in report:
    t = report["things"]
    tau = next((r["soft"]["tau"] for r in t["per_model"].values() if "soft" in r), None)
    rows = list(t["per_model"].values())
    softs = [r["soft"] for r in rows if "soft" in r]
    soft_head = (f" KL(human‖model) [{_ci(s['kl'] for s in softs)}] | Pearson r [{_ci(s['pearson'] for s in softs)}] "
                 f"| Spearman rho [{_ci(s['spearman'] for s in softs)}] |" if softs else "")
    lines += [f"## THINGS odd-one-out ({t['triplets']})", "",
              "Accuracy: ties count as wrong." + (f" Soft labels: model probabilities softmax(s / {tau:g}) vs the "
                                                 "human ones." if tau is not None else ""), "",
              f"| model | accuracy [{_ci(rows)}] | [95% CI, {metrics.OBJECTS}] | [95% CI, {metrics.WALD}] | n |"
              + soft_head, "|" + " --- |" * (5 + 3 * bool(softs))]
    for name, r in t["per_model"].items():
      soft = r.get("soft")
      extra = (f" {_fmt(soft['kl'], 'value')} | {_fmt(soft['pearson'])} | {_fmt(soft['spearman'])} |" if soft
               else " | | |" if softs else "")
      iv = {m: _iv(ci) for m, ci in r.get("intervals", {}).items()}
      lines.append(f"| {name} | {_fmt(r)} | {iv.get(metrics.OBJECTS, '')} | {iv.get(metrics.WALD, '')} | {r['n']} |"
                   + extra)
    lines.append("")
  if "levels" in report:
    levels = [lv for lv in metrics.LEVELS if lv in report["noise_ceiling"]]
    acc_rows = [r[lv] for r in report["levels"].values() for lv in levels]
    lines += ["## Levels", "", f"Odd-one-out accuracy against the majority of the responses [{_ci(acc_rows)}] "
              "(n triplets with a majority); human noise ceiling ["
              f"{_ci(report['human'][lv]['noise_ceiling'] for lv in levels)}].", "",
              "| model | " + " | ".join(levels) + " |", "|" + " --- |" * (len(levels) + 1)]
    for name, r in report["levels"].items():
      lines.append(f"| {name} | " + " | ".join(f"{_fmt(r[lv])} n={r[lv]['n']}" for lv in levels) + " |")
    lines.append("| human noise ceiling (LOO) | " + " | ".join(
        _fmt(report["human"][lv]["noise_ceiling"], "value") for lv in levels) + " |")
    rt_rows = [r[lv]["entropy_rt_spearman"] for r in [*report["levels"].values(), report["human"]] for lv in levels
               if "entropy_rt_spearman" in r[lv]]
    lines += ["", f"Spearman rho of model entropy vs mean log RT (RT > 10 s dropped) [{_ci(rt_rows)}]:", "",
              "| model | " + " | ".join(levels) + " |", "|" + " --- |" * (len(levels) + 1)]
    for name, r in report["levels"].items():
      lines.append(f"| {name} | " + " | ".join(_fmt(r[lv]["entropy_rt_spearman"], "value")
                                               if "entropy_rt_spearman" in r[lv] else "" for lv in levels) + " |")
    lines.append("| humans (entropy of the responses) | " + " | ".join(
        _fmt(report["human"][lv]["entropy_rt_spearman"], "value") if "entropy_rt_spearman" in report["human"][lv]
        else "" for lv in levels) + " |")
    lines.append("")
    if PLOT in report.get("plots", []):
      lines += [f"![per-level accuracy]({PLOT})", ""]
    if PLOT_RT in report.get("plots", []):
      lines += [f"![entropy vs RT]({PLOT_RT})", ""]
  for ds, r in (report.get("rsa") or {}).items():
    lines += [f"## RSA: {ds} ({r['kind']}, {r['stimuli']} stimuli)", "", f"Correlations [{_ci(r['models'].values())}].",
              "", "| model | Pearson-kernel, Spearman | Pearson-kernel, Pearson | cosine, Spearman | cosine, Pearson |",
              "| --- | --- | --- | --- | --- |"]
    for name, k in r["models"].items():
      lines.append(f"| {name} | " + " | ".join(_fmt(k[kern][m], "value") for kern in ("pearson", "cosine")
                                               for m in ("spearman", "pearson")) + " |")
    lines.append("")
  if "probe" in report:
    shots = list(next(iter(report["probe"].values())))
    lines += [f"## Few-shot linear probe [{_ci(report['probe'].values())}]", "",
              "| model | " + " | ".join(shots) + " |", "|" + " --- |" * (len(shots) + 1)]
    for name, r in report["probe"].items():
      lines.append(f"| {name} | " + " | ".join(f"{_fmt(r[s])} n={r[s]['n']}" for s in shots) + " |")
    lines.append("")
  if "hierarchy" in report:
    h = report["hierarchy"]
    lines += [f"## Representation change along the hierarchy ({h['base']} -> {h['aligned']}, {h['images']} images)",
              "", "Mean change of z-scored pairwise distance (negative = closer after alignment).", "",
              f"| relation | change [{_ci(h['distance_change'].values())}] | pairs |", "| --- | --- | --- |"]
    for rel, r in h["distance_change"].items():
      lines.append(f"| {rel} | {_fmt(r, 'value')} | {r['n']} |")
    lines.append("")
    for name, alt in ((PLOT_HIERARCHY, "distance change"), (PLOT_PCA, "PCA before/after")):
      if name in report.get("plots", []):
        lines += [f"![{alt}]({name})", ""]
  if report.get("comparisons"):
    lines += [f"## Paired comparisons (model - {report['primary']}, same items)", "",
              "| comparison | task | difference [95% CI] | CI method | other intervals | n | McNemar p |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for comp, tasks in report["comparisons"].items():
      for task, r in tasks.items():
        p = ("< 1e-300" if r["p_value"] == 0 else f"{r['p_value']:.3g}") if "p_value" in r else ""
        other = "; ".join(f"{m} {_iv(ci)}" for m, ci in r.get("intervals", {}).items() if m != r["ci_method"])
        lines.append(f"| {comp} | {task} | {_fmt(r, 'difference')} | {r['ci_method']} | {other} | {r['n']} | {p} |")
    lines.append("")
  if report.get("skipped"):
    lines += ["Skipped: " + "; ".join(report["skipped"]), ""]
  methods = report["bootstrap"].get("methods") or metrics.describe_methods(interval_methods(report))
  lines += ["## Interval methods", ""] + [f"- `{m}`: {text}" for m, text in methods.items()] + [""]
  return "\n".join(lines)


def _pyplot() -> Any:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig: Any, fileobj: Any) -> None:
  fig.savefig(fileobj, format="png", metadata={"Software": None})
  _pyplot().close(fig)


def plot_levels(report: dict[str, Any], fileobj: Any) -> None:
  """Grouped bars: per level, one bar per model with its 95% CI; the human noise ceiling as a dashed line."""
  plt = _pyplot()
  levels = [lv for lv in metrics.LEVELS if lv in report["noise_ceiling"]]
  names = list(report["levels"])
  width = 0.8 / max(len(names), 1)
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  for i, name in enumerate(names):
    rows = report["levels"][name]
    acc = np.array([rows[lv]["accuracy"] for lv in levels])
    ci = np.array([rows[lv]["ci"] for lv in levels])
    x = np.arange(len(levels)) - 0.4 + width * (i + 0.5)
    ax.bar(x, acc, width, label=name, yerr=[acc - ci[:, 0], ci[:, 1] - acc], capsize=3)
  for j, lv in enumerate(levels):
    ax.hlines(report["noise_ceiling"][lv], j - 0.45, j + 0.45, colors="k", linestyles="dashed",
              label="noise ceiling" if j == 0 else None)
  ax.axhline(1 / 3, color="grey", lw=0.8, ls=":")
  ax.set_xticks(np.arange(len(levels)), levels)
  ax.set_ylim(0, 1.15)
  ax.set_yticks(np.linspace(0, 1, 6))
  ax.set_ylabel("odd-one-out accuracy (95% CI)")
  ax.legend(fontsize=8, loc="upper center", ncol=len(names) + 1, frameon=False)
  fig.tight_layout()
  _save(fig, fileobj)


def plot_entropy_rt(data: dict[str, dict[str, np.ndarray]], fileobj: Any) -> None:
  """One panel per level: model entropy vs the triplet's mean log RT, one colour per model, with Spearman rho."""
  plt = _pyplot()
  first = next(iter(data.values()))
  levels = metrics._levels_present(first["level"])
  fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.2), dpi=100, squeeze=False)
  for ax, lv in zip(axes[0], levels, strict=True):
    for i, (name, d) in enumerate(data.items()):
      sel = (d["level"] == lv) & np.isfinite(d["log_rt"])
      rho = metrics.spearman(d["entropy"][sel], d["log_rt"][sel])
      ax.scatter(d["entropy"][sel], d["log_rt"][sel], s=6, alpha=0.5, color=f"C{i}",
                 label=f"{name} (rho={rho:.2f})")
    ax.set_title(lv)
    ax.set_xlabel("model entropy (nats)")
    ax.legend(fontsize=7, loc="lower right")
  axes[0][0].set_ylabel("mean log RT (s)")
  fig.tight_layout()
  _save(fig, fileobj)


def plot_pca(pca: dict[str, Any], fileobj: Any) -> None:
  """First two principal components of the base and the aligned model, coloured by superordinate category."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.6), dpi=100)
  sup = pca["superordinate"]
  for ax, role in zip(axes, ("base", "aligned"), strict=True):
    xy = pca[role]
    for c in np.unique(sup):
      sel = sup == c
      ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=f"C{int(c) % 10}", label=f"super {int(c)}")
    var = pca[f"{role}_variance"]
    ax.set_title(f"{role}: {pca[f'{role}_name']}")
    ax.set_xlabel(f"PC 1 ({100 * var[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * var[1]:.0f}%)")
    ax.set_xticks([])
    ax.set_yticks([])
  axes[1].legend(fontsize=7, loc="best", markerscale=2)
  fig.tight_layout()
  _save(fig, fileobj)


def plot_hierarchy(h: dict[str, Any], fileobj: Any) -> None:
  """Mean z-scored distance change per relation with its 95% CI (below 0: closer after alignment)."""
  plt = _pyplot()
  rels = list(h["distance_change"])
  vals = np.array([h["distance_change"][r]["value"] for r in rels])
  ci = np.array([h["distance_change"][r]["ci"] for r in rels])
  fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
  ax.bar(np.arange(len(rels)), vals, yerr=[vals - ci[:, 0], ci[:, 1] - vals], capsize=3,
         color=["C2" if v < 0 else "C3" for v in vals])
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(np.arange(len(rels)), [r.replace("_", "\n") for r in rels], fontsize=8)
  ax.set_ylabel("change in z-scored distance")
  ax.set_title(f"{h['base']} -> {h['aligned']}", fontsize=9)
  fig.tight_layout()
  _save(fig, fileobj)
