"""Choosing FineTuneClassifier's defaults on some data sets, confirming them on others.

Candidates (parameter sets) x *deciding* sets x seeds, each fit scored once on its set's test
split, next to the frozen README pipeline on the same set. The rule that picks, fixed here
before any result came in:

1. **eligible**: on every deciding set, the mean over seeds is at least the frozen README
   pipeline - 0.5 points (the guarantee users rely on);
2. **pick**: the eligible candidate with the highest mean, over the deciding sets, of (its mean
   - frozen); a tie goes to the candidate listed first (the simpler one).

**Leave one set out**: for each deciding set, the rule applied to the *other* deciding sets
alone, and what its pick scores on the set left out: how the choice generalises to a set it
did not see. **Confirm**: the pick and today's defaults on ``cifar10-confirm``, a set no choice
looked at, run only after the pick is made. **Input size** (for images far smaller than the
input): the pick at smaller ``input_size`` on the deciding sets of small images (cifar10,
digits); the smallest size whose mean on both is within 0.5 points of the full size is
reported as the one that keeps the accuracy, and confirmed the same way.

    python benchmarks/choose_defaults.py [--data ../shared/data] [--device auto] [--jobs 1]
        [--seeds 0 1 2] [--candidates NAME ...] [--deadline SECONDS] [--out benchmarks/results]

Every fit uses batch 32 and float32 (the CPU defaults), also on a GPU, where TF32 is switched
off, so a GPU run decides for the CPU defaults; numbers from a GPU and a CPU run still differ
by training's own noise. ``--jobs`` fits run at once (one process each); ``--deadline``: past
this many seconds no new deciding fit starts, and candidates with a missing fit are left out.
On a GPU keep ``--num-workers 0``: on an NVIDIA H200 machine (16 cores), one fit alone trained
at several times the speed it reached with decoding workers, which start anew for every pass
and every call; and 8 fits at once there left each one CPU-bound, so a handful of jobs is
the most that pays. Even so, with 5 jobs and no workers there, a CIFAR-10 fit took 110-200 s and
a digits fit 270-300 s (the frozen pipeline alone: 30-100 s): one 600 s call holds about one
candidate on the four sets, so run a few candidates a call, each call with ``--results`` of its
own, and table the logs together with ``--from-log`` (rows carry the machine they ran on).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DECIDING = ["hymenoptera", "flowers5", "cifar10", "digits"]
CONFIRMING = "cifar10-confirm"
SMALL_IMAGES = ["cifar10", "digits"]
SIZES = [160, 128]
#: Every fit: the CPU defaults' batch and precision, wherever it runs.
COMMON = {"batch_size": 32, "precision": "float32"}
#: In the order of the tie rule: simpler first.
CANDIDATES = {
    "defaults": {},
    "refit=False": {"refit": False},
    "refit_epochs=all": {"refit_epochs": "all"},
    "refit_epochs=all, learning_rate=5e-5": {"refit_epochs": "all", "learning_rate": 5e-5},
    "refit_epochs=all, ema_epochs=2": {"refit_epochs": "all", "ema_epochs": 2.0},
}


# -- one fit per process ---------------------------------------------------------------


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _job(kind: str, set_name: str, candidate: str, params: dict, seed: int, data: str, device: str,
         num_workers: int, common: dict) -> dict:
    """One fit and its test score: ``kind`` "frozen" (the README pipeline) or "finetune"."""
    from finetune import load_set
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from skltransfer import FineTuneClassifier, PretrainedFeatures

    with tempfile.TemporaryDirectory() as tmp:
        train, test, y_train, y_test = load_set(set_name, Path(data), Path(tmp))
        start = time.perf_counter()
        if kind == "frozen":
            model = make_pipeline(PretrainedFeatures(device=device, precision="float32", num_workers=num_workers),
                                  LogisticRegression(max_iter=1000))
        else:
            model = FineTuneClassifier(random_state=seed, device=device, num_workers=num_workers,
                                       **{**common, **params})
        model.fit(train, y_train)
        seconds = time.perf_counter() - start
        score = float(model.score(test, y_test))
    import torch

    from _results import machine

    row = {"machine": machine(),
           "gpu": torch.cuda.get_device_name() if device != "cpu" and torch.cuda.is_available() else None,
           "kind": kind, "set": set_name, "candidate": candidate, "params": {k: repr(v) for k, v in params.items()},
           "seed": seed, "score": score, "fit_seconds": seconds}
    if kind == "finetune":
        row["kept_epoch"] = model.best_epoch_
        row["validation"] = [[h["epoch"], h.get("valid_accuracy")] for h in model.history_ if "valid_accuracy" in h]
        row["final"] = next(({k: h[k] for k in ("epoch", "phase", "validated")} for h in model.history_
                             if h.get("final")), None)
    return row


class Runner:
    """Fits in a pool of processes; every finished row is appended to ``log`` as it comes."""

    def __init__(self, args: argparse.Namespace, log: Path, replay: list[dict] | None = None):
        self.args, self.log, self.rows, self.replay = args, log, [], replay
        if replay is not None:  # the rows of an earlier run, none fitted again
            self.pool = ProcessPoolExecutor(1)
            return
        threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        self.pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                        initargs=(threads,))

    def run(self, jobs: list[tuple], deadline: float | None = None) -> list[dict]:
        if self.replay is not None:
            keys = {(kind, s, c, seed) for kind, s, c, _, seed in jobs}
            found = [r for r in self.replay if (r["kind"], r["set"], r["candidate"],
                                                 0 if r["kind"] == "frozen" else r["seed"]) in keys]
            self.rows += found
            return found
        pending = {self.pool.submit(_job, *job, str(self.args.data), self.args.device, self.args.num_workers,
                                    COMMON): job
                   for job in jobs}
        done_rows = []
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            finished, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            if not finished:  # past the deadline: drop what has not started, wait for what has
                for future in list(pending):
                    if future.cancel():
                        del pending[future]
                deadline = None
                continue
            for future in finished:
                job = pending.pop(future)
                row = future.result()
                done_rows.append(row)
                self.rows.append(row)
                with self.log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                label = "frozen README pipeline" if row["kind"] == "frozen" else f"{row['candidate']} seed {job[4]}"
                print(f"{time.strftime('%H:%M:%S')} {row['set']:<16} {label:<40} {row['score']:6.1%} "
                      f"({row['fit_seconds']:.0f} s)", flush=True)
        return done_rows


# -- the rule ----------------------------------------------------------------------------


def means(rows: list[dict], seeds: list[int], sets: list[str]) -> tuple[dict, dict]:
    """``frozen[set]`` and ``tuned[candidate][set]`` (mean over seeds; only complete cells)."""
    frozen = {r["set"]: r["score"] for r in rows if r["kind"] == "frozen"}
    cells: dict = {}
    for r in rows:
        if r["kind"] == "finetune":
            cells.setdefault(r["candidate"], {}).setdefault(r["set"], {})[r["seed"]] = r["score"]
    tuned = {c: {s: float(np.mean([by_seed[k] for k in seeds])) for s, by_seed in per_set.items()
                 if s in sets and all(k in by_seed for k in seeds)} for c, per_set in cells.items()}
    return frozen, tuned


def pick(frozen: dict, tuned: dict, sets: list[str], order: list[str]) -> tuple[str | None, dict]:
    """The rule: eligible on every set of ``sets``, then the highest mean gain over frozen."""
    verdicts = {}
    if not sets:  # leaving the only deciding set out leaves nothing to decide on
        return None, verdicts
    for name in order:
        cells = tuned.get(name, {})
        if not all(s in cells and s in frozen for s in sets):
            continue
        gains = [cells[s] - frozen[s] for s in sets]
        verdicts[name] = {"eligible": min(gains) >= -0.005, "mean_gain": float(np.mean(gains))}
    eligible = [n for n in order if verdicts.get(n, {}).get("eligible")]
    best = max(eligible, key=lambda n: (verdicts[n]["mean_gain"], -order.index(n)), default=None)
    return best, verdicts


# -- the run ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--sets", nargs="*", default=DECIDING)
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--deadline", type=float, default=0, help="seconds; 0: none")
    parser.add_argument("--skip", nargs="*", default=[], help="confirm, size")
    parser.add_argument("--param", nargs="*", default=[], help="key=value for every fit (a quick trial: epochs=1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--results", default="choose_defaults")
    parser.add_argument("--from-log", type=Path, help="a run's .jsonl: the results again, without fitting")
    args = parser.parse_args()
    from finetune import parse_params

    COMMON.update(parse_params(args.param))
    import torch

    from _results import write_results

    gpu = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else None
    print(f"torch {torch.__version__}; GPU: {gpu}; {args.jobs} fits at once", flush=True)
    start = time.monotonic()
    deadline = start + args.deadline if args.deadline else None
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"{args.results}.jsonl"
    replay, measured_on = None, None
    if args.from_log:
        replay = [json.loads(line) for line in args.from_log.read_text().splitlines() if line.strip()]
        gpu = replay[0].get("gpu", gpu)
        # the log's machine (rows written before rows named it: the GPU's machine, cores unknown here)
        measured_on = replay[0].get("machine", "a machine with an " + gpu if gpu else None)
        if measured_on and gpu and gpu not in measured_on:
            measured_on += f", {gpu}"
    elif log.exists():
        log.unlink()
    runner = Runner(args, log, replay)
    order = [c for c in CANDIDATES if c in args.candidates]

    # 1. decide: frozen first (it also fills the feature cache the probes read), then candidates in order
    runner.run([("frozen", s, "frozen", {}, 0) for s in args.sets])
    decide_jobs = [("finetune", s, c, CANDIDATES[c], seed) for c in order
                   for s in sorted(args.sets, key=lambda s: s != "cifar10") for seed in args.seeds]
    runner.run(decide_jobs, deadline)
    frozen, tuned = means(runner.rows, args.seeds, args.sets)
    chosen, verdicts = pick(frozen, tuned, args.sets, order)
    loso = {}
    for left_out in args.sets:
        others = [s for s in args.sets if s != left_out]
        name, _ = pick(frozen, tuned, others, order)
        loso[left_out] = {"pick": name, "score": tuned.get(name, {}).get(left_out), "frozen": frozen.get(left_out)}
    print(f"pick: {chosen}; leave one set out: {loso}", flush=True)

    # 2. confirm: only now does cifar10-confirm run, for the pick and today's defaults
    confirm = {}
    if "confirm" not in args.skip and chosen is not None:
        names = list(dict.fromkeys(["defaults", chosen]))
        runner.run([("frozen", CONFIRMING, "frozen", {}, 0)]
                   + [("finetune", CONFIRMING, n, CANDIDATES[n], seed) for n in names for seed in args.seeds])
        f2, t2 = means(runner.rows, args.seeds, [CONFIRMING])
        confirm = {"frozen": f2.get(CONFIRMING), **{n: t2.get(n, {}).get(CONFIRMING) for n in names}}
        print(f"confirm: {confirm}", flush=True)

    # 3. input size for small images: the pick at smaller sizes, decided on cifar10 and digits, then confirmed
    size = {}
    if "size" not in args.skip and chosen is not None:
        small = [s for s in SMALL_IMAGES if s in args.sets]
        sized = {f"{chosen}, input_size={n}": {**CANDIDATES[chosen], "input_size": n} for n in SIZES}
        CANDIDATES.update(sized)
        runner.run([("finetune", s, name, params, seed) for name, params in sized.items() for s in small
                    for seed in args.seeds])
        _, t3 = means(runner.rows, args.seeds, small)
        keeps = [n for n, name in zip(SIZES, sized) if all(
            s in t3.get(name, {}) and t3[name][s] >= tuned[chosen][s] - 0.005 for s in small)]
        smallest = min(keeps, default=None)
        size = {"keeps_accuracy": keeps, "smallest": smallest,
                **{name: t3.get(name, {}) for name in sized}}
        if smallest is not None and "confirm" not in args.skip:
            name = f"{chosen}, input_size={smallest}"
            runner.run([("finetune", CONFIRMING, name, sized[name], seed) for seed in args.seeds])
            _, t4 = means(runner.rows, args.seeds, [CONFIRMING])
            size["confirm"] = t4.get(name, {}).get(CONFIRMING)
        print(f"input size: {size}", flush=True)

    runner.pool.shutdown()
    figures = {"common": {k: repr(v) for k, v in COMMON.items()}, "data": str(args.data), "seeds": args.seeds, "deciding_sets": args.sets, "frozen": frozen, "tuned": tuned,
               "verdicts": verdicts, "pick": chosen, "leave_one_set_out": loso, "confirm": confirm,
               "input_size": size, "rows": runner.rows, "seconds": time.monotonic() - start}
    write_results(args.results, figures, table(runner.rows, args.seeds, args.sets, frozen, verdicts, chosen, loso),
                  directory=args.out, gpu=gpu, measured_on=measured_on)


def table(rows, seeds, sets, frozen, verdicts, chosen, loso) -> str:
    """Candidates x sets (mean of seeds, each seed), the rule's verdict, leave-one-set-out, confirm."""
    every = list(dict.fromkeys([*sets, CONFIRMING]))
    every = [s for s in every if any(r["set"] == s for r in rows)]
    cells: dict = {}
    for r in rows:
        if r["kind"] == "finetune":
            cells.setdefault(r["candidate"], {}).setdefault(r["set"], {})[r["seed"]] = r
    head = "| candidate | " + " | ".join(every) + " | eligible | mean gain over frozen (deciding sets) |"
    lines = [head, "|" + "---|" * (len(every) + 3)]
    lines.append("| frozen README pipeline | " + " | ".join(
        f"{frozen[s]:.1%}" if s in frozen else "" for s in every) + " | | |")
    for name, per_set in cells.items():
        out = []
        for s in every:
            by_seed = per_set.get(s, {})
            if not by_seed:
                out.append("")
                continue
            scores = [by_seed[k]["score"] for k in seeds if k in by_seed]
            secs = np.mean([by_seed[k]["fit_seconds"] for k in seeds if k in by_seed])
            mean = f"{np.mean(scores):.1%}" if len(scores) == len(seeds) else "incomplete"
            out.append(f"{mean} ({' / '.join(f'{x:.1%}' for x in scores)}; {secs:.0f} s)")
        v = verdicts.get(name)
        mark = "**pick**" if name == chosen else ("yes" if v and v["eligible"] else ("no" if v else ""))
        gain = f"{100 * v['mean_gain']:+.2f}" if v else ""
        lines.append(f"| {name} | " + " | ".join(out) + f" | {mark} | {gain} |")
    lines += ["", "Leave one set out (the rule on the other deciding sets; its pick on the set left out):", "",
              "| set left out | pick from the others | its mean there | frozen there |", "|---|---|---|---|"]
    for s, v in loso.items():
        score = "" if v["score"] is None else f"{v['score']:.1%}"
        lines.append(f"| {s} | {v['pick']} | {score} | {'' if v['frozen'] is None else format(v['frozen'], '.1%')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
