"""A candidate setting against the defaults, seed by seed, from ``benchmarks/finetune.py`` results.

Reads the defaults' results files and the candidate's (each any number of files, one row per
set and seeds run: runs split across processes are joined here), and applies the rule of
``benchmarks/finetune-notes.md`` for settings that must keep the defaults' accuracy: on each set
the candidate's mean of seeds at least the defaults' mean - 0.5 points, and its cifar10 seeds
within 1.5 points. Fit times are compared only where both ran on the same kind of machine with
the same threads (the footer names the machines; a ratio across machines means nothing).

    python benchmarks/compare_runs.py --defaults finetune_ema_cifar10 finetune_ema_others
        --candidate ftr128_cifar10_s01 ftr128_cifar10_s2 ftr128_digits --label "train_input_size=128"
        --results finetune_train_input_size
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
        record = json.loads((RESULTS / f"{name}.json").read_text())
        machines.add(record["machine"])
        for row in record["sets"]:
            frozen[row["set"]] = row["frozen"]
            for seed, score, kept, seconds in zip(row["seeds"], row["finetune"], row["kept_epoch"],
                                                  row["fit_seconds"]):
                runs[row["set"], seed] = (score, kept, seconds)
    return runs, frozen, machines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defaults", nargs="+", required=True, help="results names of the defaults' runs")
    parser.add_argument("--candidate", nargs="+", required=True, help="results names of the candidate's runs")
    parser.add_argument("--label", required=True, help="the candidate's setting, as the table names it")
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    base, frozen, machines = per_seed(args.defaults)
    ours, _, their_machines = per_seed(args.candidate)
    lines = [f"| set | frozen README pipeline | defaults, each seed: score (kept epoch) | `{args.label}`, each seed "
             "| mean: defaults / candidate | fit time, mean: defaults / candidate | kept (>= defaults - 0.5) |",
             "|---|---|---|---|---|---|---|"]
    figures: dict = {"label": args.label, "sets": {}}
    for set_name in sorted({s for s, _ in ours}, key=lambda s: list(frozen).index(s)):
        seeds = sorted(seed for s, seed in ours if s == set_name)
        missing = [seed for seed in seeds if (set_name, seed) not in base]
        if missing:
            raise SystemExit(f"{set_name}: no defaults' run for seeds {missing}")
        a = [base[set_name, seed] for seed in seeds]
        b = [ours[set_name, seed] for seed in seeds]
        mean_a, mean_b = float(np.mean([r[0] for r in a])), float(np.mean([r[0] for r in b]))
        kept = mean_b >= mean_a - 0.005
        figures["sets"][set_name] = {"seeds": seeds, "frozen": frozen[set_name], "defaults": [r[0] for r in a],
                                     "candidate": [r[0] for r in b], "defaults_kept_epoch": [r[1] for r in a],
                                     "candidate_kept_epoch": [r[1] for r in b],
                                     "defaults_seconds": [r[2] for r in a], "candidate_seconds": [r[2] for r in b],
                                     "kept_accuracy": kept}
        lines.append(
            f"| {set_name} | {frozen[set_name]:.1%} | {' / '.join(f'{r[0]:.1%} ({r[1]})' for r in a)} | "
            f"{' / '.join(f'{r[0]:.1%} ({r[1]})' for r in b)} | {mean_a:.1%} / {mean_b:.1%} | "
            f"{np.mean([r[2] for r in a]):.0f} s / {np.mean([r[2] for r in b]):.0f} s | "
            f"{'yes' if kept else '**no**'} |")
    cifar = figures["sets"].get("cifar10")
    spread = None if cifar is None else float(max(cifar["candidate"]) - min(cifar["candidate"]))
    verdict = all(v["kept_accuracy"] for v in figures["sets"].values()) and (spread is None or spread <= 0.015)
    figures.update(cifar10_spread=spread, rule_met=verdict)
    lines += ["", f"By the rule (each set's mean at least the defaults' - 0.5 points"
              f"{', the cifar10 seeds within 1.5 points' if spread is not None else ''}), `{args.label}` "
              f"{'keeps' if verdict else 'does not keep'} the defaults' accuracy."]
    write_results(args.results, figures, "\n".join(lines),
                  measured_on=" and ".join(sorted(machines | their_machines)))


if __name__ == "__main__":
    main()
