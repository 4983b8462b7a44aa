"""A candidate setting against the defaults, seed by seed, from ``benchmarks/finetune.py`` results.

Reads the defaults' results files and the candidate's (each any number of files, one row per set
and seeds run: runs split across processes are joined here) and applies one of the two rules of
``benchmarks/finetune-notes.md``, each written there before its runs:

``--rule keep`` (a cheaper setting that must keep the accuracy): on each set the candidate's mean
of seeds is at least the defaults' mean - 0.5 points, and its cifar10 seeds lie within 1.5 points.

``--rule adopt`` (a new default, as ``choose_defaults.py`` picks one): eligible when on each set
its mean is at least the frozen README pipeline - 0.5; adopted when, on top, its mean gain over
frozen across the sets is higher than the defaults' (a tie keeps the defaults) and its cifar10
seeds lie within 1.5 points.

``--rule report`` (a set kept for confirming a decision made elsewhere, or columns shown beside one): the
table, no verdict.

A name may end in ``:<column>`` to read another column of the same runs: ``tta_cifar10_s0:tta_none``
reads ``finetune_tta_none``, which ``finetune.py`` writes for ``--param tta=auto`` (the same fits
scored without mirrors), so a setting that changes only the prediction compares with no
difference of training between the two sides.

``--same-when-kept``: on the CPU a fit is deterministic for its seed, so where the defaults' run
kept one of these epochs and the candidate cannot differ there (say, a candidate that changes only
a refit the probe or the last epoch makes anyway), the candidate is not fitted: its score is the
defaults' and the table says "=". ``--refit-only``: the candidate changes only what happens after
the validation split has chosen, so every candidate fit is checked to keep the defaults' epoch.

Fit times compare only where both ran on the same kind of machine with the same threads (the
footer names the machines).

    python benchmarks/compare_runs.py --rule adopt --refit-only --same-when-kept 0 8
        --defaults finetune_ema_cifar10 finetune_ema_others --label 'refit_epochs="all"'
        --candidate finetune_refit_all_cifar10_s0 ... --results refit_length
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from _results import RESULTS, write_results


def per_seed(names: list[str]) -> tuple[dict, dict, set]:
    """{(set, seed): (score, kept epoch, seconds)}, {set: frozen score}, {machine}."""
    runs, frozen, machines = {}, {}, set()
    for name in names:
        name, _, column = name.partition(":")
        record = json.loads((RESULTS / f"{name}.json").read_text())
        machines.add(record["machine"])
        for row in record["sets"]:
            frozen[row["set"]] = row["frozen"]
            scores = row[f"finetune_{column}" if column else "finetune"]
            for seed, score, kept, seconds in zip(row["seeds"], scores, row["kept_epoch"],
                                                  row["fit_seconds"]):
                runs[row["set"], seed] = (score, kept, seconds)
    return runs, frozen, machines


def paired(set_name: str, seeds: list[int], base: dict, ours: dict, same_when_kept: set, refit_only: bool) -> list:
    """The candidate's (score, kept, seconds, fitted) per seed; see --same-when-kept and --refit-only."""
    pairs = []
    for seed in seeds:
        if (set_name, seed) in ours:
            row = ours[set_name, seed]
            if refit_only and row[1] != base[set_name, seed][1]:
                raise SystemExit(f"{set_name} seed {seed}: kept epoch {row[1]} against the defaults' "
                                 f"{base[set_name, seed][1]}: not the same split run")
            pairs.append((*row, True))
        elif base[set_name, seed][1] in same_when_kept:
            pairs.append((*base[set_name, seed], False))
        else:
            raise SystemExit(f"{set_name} seed {seed}: no candidate run (the defaults kept epoch "
                             f"{base[set_name, seed][1]})")
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defaults", nargs="+", required=True, help="results names of the defaults' runs")
    parser.add_argument("--candidate", nargs="+", required=True, help="results names of the candidate's runs")
    parser.add_argument("--label", required=True, help="the candidate's setting, as the table names it")
    parser.add_argument("--rule", choices=["keep", "adopt", "report"], required=True)
    parser.add_argument("--refit-only", action="store_true", help="the candidate changes only the refit")
    parser.add_argument("--same-when-kept", nargs="+", type=int, default=[],
                        help="kept epochs (of the defaults' runs) where the candidate is the same fit")
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    base, frozen, machines = per_seed(args.defaults)
    ours, _, their_machines = per_seed(args.candidate)
    same = set(args.same_when_kept)
    sets = sorted({s for s, _ in ours}, key=lambda s: list(frozen).index(s))
    check = {"keep": "kept (>= defaults - 0.5)", "adopt": "eligible (>= frozen - 0.5)",
             "report": ">= frozen - 0.5"}[args.rule]
    lines = [f"| set | frozen README pipeline | defaults, each seed: score (kept epoch) | `{args.label}`, each seed "
             f"| mean: defaults / candidate | fit time, mean: defaults / candidate | {check} |",
             "|---|---|---|---|---|---|---|"]
    figures: dict = {"label": args.label, "rule": args.rule, "sets": {}}
    for set_name in sets:
        seeds = sorted(seed for s, seed in (base if same else ours) if s == set_name)
        missing = [seed for seed in seeds if (set_name, seed) not in base]
        if missing:
            raise SystemExit(f"{set_name}: no defaults' run for seeds {missing}")
        a = [base[set_name, seed] for seed in seeds]
        b = paired(set_name, seeds, base, ours, same, args.refit_only)
        mean_a, mean_b = float(np.mean([r[0] for r in a])), float(np.mean([r[0] for r in b]))
        ok = mean_b >= (mean_a if args.rule == "keep" else frozen[set_name]) - 0.005
        figures["sets"][set_name] = {"seeds": seeds, "frozen": frozen[set_name], "defaults": [r[0] for r in a],
                                     "candidate": [r[0] for r in b], "kept_epoch": [r[1] for r in a],
                                     "candidate_kept_epoch": [r[1] for r in b], "fitted": [r[3] for r in b],
                                     "defaults_seconds": [r[2] for r in a], "candidate_seconds": [r[2] for r in b],
                                     "passes": ok}
        lines.append(
            f"| {set_name} | {frozen[set_name]:.1%} | {' / '.join(f'{r[0]:.1%} ({r[1]})' for r in a)} | "
            f"{' / '.join(f'{r[0]:.1%} ({r[1]})' if r[3] else '=' for r in b)} | {mean_a:.1%} / {mean_b:.1%} | "
            f"{np.mean([r[2] for r in a]):.0f} s / {np.mean([r[2] for r in b]):.0f} s | "
            f"{'yes' if ok else '**no**'} |")
    cifar = figures["sets"].get("cifar10")
    spread = None if cifar is None else float(max(cifar["candidate"]) - min(cifar["candidate"]))
    steady = spread is None or spread <= 0.015
    passes = all(v["passes"] for v in figures["sets"].values())
    failed = [f"{name} below the {'defaults' if args.rule == 'keep' else 'frozen pipeline'} - 0.5"
              for name, v in figures["sets"].items() if not v["passes"]]
    if not steady:
        failed.append(f"its cifar10 seeds lie {spread * 100:.1f} points apart")
    notes = []
    if same:
        notes.append("\"=\": the same fit as the defaults' (their split kept epoch "
                     f"{' or '.join(str(k) for k in sorted(same))}, where the candidate cannot differ).")
    if args.rule == "keep":
        verdict = passes and steady
        notes.append(f"By the rule (each set's mean at least the defaults' - 0.5 points"
                     f"{', the cifar10 seeds within 1.5 points' if spread is not None else ''}), `{args.label}` "
                     f"{'keeps' if verdict else 'does not keep'} the defaults' accuracy"
                     f"{': ' + '; '.join(failed) if failed else ''}.")
    elif args.rule == "report":
        verdict = None
        notes.append("Reported only: no decision rests on this table.")
    else:
        gain = {who: float(np.mean([np.mean(v[who]) - v["frozen"] for v in figures["sets"].values()]))
                for who in ("defaults", "candidate")}
        verdict = passes and steady and gain["candidate"] > gain["defaults"]
        if gain["candidate"] <= gain["defaults"]:
            failed.append("its mean gain is not higher")
        figures["mean_gain_over_frozen"] = gain
        notes.append(f"Mean gain over frozen across the sets: defaults {gain['defaults'] * 100:+.2f}, "
                     f"candidate {gain['candidate'] * 100:+.2f} points. By the rule (eligible on every set, a higher "
                     f"mean gain, the cifar10 seeds within 1.5 points), `{args.label}` "
                     f"{'becomes' if verdict else 'does not become'} the default"
                     f"{': ' + '; '.join(failed) if failed else ''}.")
    figures.update(cifar10_spread=spread, rule_met=verdict)
    lines += [""] + notes
    write_results(args.results, figures, "\n".join(lines),
                  measured_on=" and ".join(sorted(machines | their_machines)))


if __name__ == "__main__":
    main()
