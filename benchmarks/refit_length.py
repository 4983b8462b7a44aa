"""How long the refit trains: ``refit_epochs="all"`` against the defaults (``"kept"``), seed by seed.

On the CPU a fit is deterministic for a given seed, and the two settings differ only after the
validation split has chosen: the split's run, its probe and the state it keeps are the same. So
``"all"`` is fitted only for the seeds where the refit can differ (a fine-tuned state kept before
the last epoch); where the split kept the probe (epoch 0, refitted as the frozen pipeline) or the
last epoch, the ``"all"`` fit *is* the defaults' fit, and the table says so with "=". Each
``"all"`` fit checks the pairing: its kept epoch must be the defaults'.

Reads the defaults' results (``benchmarks/finetune.py`` with ``--param ema_epochs=1.0``) and the
``"all"`` ones (``--param refit_epochs=all``, one file per set and seeds run), applies the rule of
``benchmarks/finetune-notes.md`` (each set's mean at least the frozen README pipeline - 0.5; the
cifar10 seeds within 1.5 points) and writes ``results/refit_length.{json,md}``.

    python benchmarks/refit_length.py --defaults finetune_ema_cifar10 finetune_ema_others
        --candidate finetune_refit_all_cifar10_s0 finetune_refit_all_cifar10_s1 ...
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from _results import RESULTS, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defaults", nargs="+", required=True, help="results names of the defaults' runs")
    parser.add_argument("--candidate", nargs="+", required=True, help="results names of the refit_epochs=all runs")
    parser.add_argument("--epochs", type=int, default=8, help="the schedule's length (the defaults' epochs)")
    args = parser.parse_args()
    base = {row["set"]: row for name in args.defaults for row in json.loads((RESULTS / f"{name}.json").read_text())["sets"]}
    machines = {json.loads((RESULTS / f"{name}.json").read_text())["machine"] for name in args.defaults + args.candidate}
    fitted: dict = {}
    for name in args.candidate:
        for row in json.loads((RESULTS / f"{name}.json").read_text())["sets"]:
            for seed, score, kept in zip(row["seeds"], row["finetune"], row["kept_epoch"]):
                fitted[row["set"], seed] = (score, kept)
    lines = ["| set | frozen README pipeline | defaults (`refit_epochs=\"kept\"`), each seed: score (kept epoch) "
             "| `refit_epochs=\"all\"`, each seed | mean: defaults / all | all eligible (>= frozen - 0.5) |",
             "|---|---|---|---|---|---|"]
    figures = {"machines": sorted(machines), "sets": {}}
    for set_name, row in base.items():
        ours, cells, theirs = [], [], []
        for seed, score, kept in zip(row["seeds"], row["finetune"], row["kept_epoch"]):
            theirs.append(f"{score:.1%} ({kept})")
            if (set_name, seed) in fitted:
                other, other_kept = fitted[set_name, seed]
                if other_kept != kept:
                    raise SystemExit(f"{set_name} seed {seed}: kept epoch {other_kept} against {kept}: not the same split run")
                ours.append(other)
                cells.append(f"{other:.1%}")
            elif kept in (0, args.epochs):
                ours.append(score)
                cells.append("=")
            else:
                raise SystemExit(f"{set_name} seed {seed}: kept epoch {kept}, the refit differs, and no run of it")
        mean_base, mean_all = float(np.mean(row["finetune"])), float(np.mean(ours))
        eligible = mean_all >= row["frozen"] - 0.005
        figures["sets"][set_name] = {"frozen": row["frozen"], "defaults": row["finetune"], "all": ours,
                                     "kept_epoch": row["kept_epoch"], "eligible": eligible}
        lines.append(f"| {set_name} | {row['frozen']:.1%} | {' / '.join(theirs)} | {' / '.join(cells)} | "
                     f"{mean_base:.1%} / {mean_all:.1%} | {'yes' if eligible else '**no**'} |")
    cifar = figures["sets"].get("cifar10")
    spread = None if cifar is None else float(max(cifar["all"]) - min(cifar["all"]))
    verdict = all(v["eligible"] for v in figures["sets"].values()) and spread is not None and spread <= 0.015
    figures.update(cifar10_spread=spread, adopted=verdict)
    lines += ["", f"\"=\": the same fit as the defaults' (the split kept the probe or the last epoch). "
              f"By the rule, `refit_epochs=\"all\"` {'becomes' if verdict else 'does not become'} the default."]
    write_results("refit_length", figures, "\n".join(lines), measured_on=" and ".join(sorted(machines)))


if __name__ == "__main__":
    main()
