"""What attention guidance buys, over seeds, on the embedded default (docs/training.md).

Each setting (``weights.mode``, its weights or shares, ``attention.cross_loss``) trains
``attnpatch train``'s default config once per seed; every trained patch is then scored

* white-box: success on ``tiny`` (the run's summary.json) and transfer to ``tiny-b`` and
  ``tiny-c`` (``attnpatch evaluate``'s table: the same placements and EOT draws for all);
* on 100 held-out scenes with object masks, fixed for every run (one placement and EOT draw
  per image from a fixed generator): the label map's spatial variance, the label word's
  attention mass on the patch, and the self-attention MSE between the patched and the clean
  image (the measures the attention terms act on).

Every measure is reported as the mean over seeds with a 95 % t-interval, and as the change
against the classifier-only run of the same seed (attention terms off, same mode). The report
draws ``guidance.png`` (success vs each attention measure; transfer vs white-box; one point
per setting with its intervals) and prints a markdown table.

    python benchmarks/eval_attention_guidance.py --out runs/guidance [--seeds 0 1 2]
        (--only REGEX | --all) [--workers 2]
    python benchmarks/eval_attention_guidance.py --list [--only REGEX]
    python benchmarks/eval_attention_guidance.py --out runs/guidance --report docs/figures

Runs already scored (``<out>/<setting>/seed<k>/result.json``) are skipped: the sweep resumes.
Each run is a child process on one thread. ``torchjd`` settings need ``pip install
'torchjd[quadprog-projector]'`` (an evaluation of its UPGrad aggregator against share mode).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODES = ("variance", "repel", "attract")
#: share mode: (classifier, cross, self) shares; l2 keeps its default share
SHARES = [
    (0.6, 0.2, 0.2),
    (0.5, 0.25, 0.25),
    (0.4, 0.3, 0.3),
    (0.3, 0.35, 0.35),
    (0.2, 0.4, 0.4),
    (0.1, 0.45, 0.45),
    (0.05, 0.475, 0.475),
]
#: the setting the library's defaults equal (attnpatch.training: share mode, exact cheap)
DEFAULT = "hybrid 0.4/0.3/0.3 repel"
#: legend names of the kinds ("hybrid" is the default mode: share with exact cheap)
LEGEND = {"hybrid": "share, exact cheap (the default)", "share": "share, exact none"}
#: CW margins tried with the hybrid mode
KAPPAS = (5.0, 10.0, 20.0)
#: sum mode: (cross, self) weights next to the default classifier weight 10
SUMS = [(1e3, 1e4), (1e4, 1e5), (1e5, 1e6), (1e6, 1e7)]


def settings() -> dict[str, dict[str, Any]]:
    """Setting name -> ``{"overrides": {...}, "mode": cross mode or None, "kind": ...}``."""
    out: dict[str, dict[str, Any]] = {}

    def add(name, kind, cross_mode, **weights):
        o = {f"weights.{k}": v for k, v in weights.items()}
        if cross_mode:
            o["attention.cross_loss"] = cross_mode
        out[name] = {"overrides": o, "mode": cross_mode, "kind": kind}

    add(
        "classifier only",
        "base",
        None,
        mode="share",
        classifier=0.5,  # the default share when these were run
        exact="none",
        cross_attention=0.0,
        self_attention=0.0,
    )
    add(
        "classifier only (hybrid)",  # the default config with the attention terms off
        "base-hybrid",
        None,
        mode="share",
        exact="cheap",
        classifier=0.4,
        cross_attention=0.0,
        self_attention=0.0,
    )
    add(
        "classifier only (iter)",
        "base-iter",
        None,
        mode="share",
        classifier=0.5,  # the default share when these were run
        measure_every=1,
        momentum=0.0,
        cross_attention=0.0,
        self_attention=0.0,
    )
    add(
        "classifier only (signal)",
        "base-signal",
        None,
        mode="share",
        classifier=0.5,  # the default share when these were run
        momentum=0.95,
        cross_attention=0.0,
        self_attention=0.0,
    )
    add(
        "classifier only (sum)",
        "base-sum",
        None,
        mode="sum",
        cross_attention=0.0,
        self_attention=0.0,
    )
    for m in MODES:
        for c, x, s in SHARES:
            add(
                f"share {c:g}/{x:g}/{s:g} {m}",
                "share",
                m,
                mode="share",
                exact="none",
                classifier=c,
                cross_attention=x,
                self_attention=s,
            )
        for c, x, s in SHARES:  # the classifier (and l2) normalised at every iteration
            add(
                f"hybrid {c:g}/{x:g}/{s:g} {m}",
                "hybrid",
                m,
                mode="share",
                exact="cheap",
                classifier=c,
                cross_attention=x,
                self_attention=s,
            )
        for c, x, s in SHARES:  # every iteration normalised by its own gradient norms
            add(
                f"share-iter {c:g}/{x:g}/{s:g} {m}",
                "share-iter",
                m,
                mode="share",
                measure_every=1,
                momentum=0.0,
                classifier=c,
                cross_attention=x,
                self_attention=s,
            )
        for c, x, s in SHARES:  # normalised by the running mean gradient's norm
            add(
                f"share-signal {c:g}/{x:g}/{s:g} {m}",
                "share-signal",
                m,
                mode="share",
                momentum=0.95,
                classifier=c,
                cross_attention=x,
                self_attention=s,
            )
        for x, s in SUMS:
            add(f"sum {x:g}/{s:g} {m}", "sum", m, mode="sum", cross_attention=x, self_attention=s)
        add(
            f"attention only {m}",
            "attention-only",
            m,
            mode="share",
            classifier=0.0,
            cross_attention=0.5,
            self_attention=0.5,
        )
        add(
            f"cross only {m}",
            "attention-only",
            m,
            mode="share",
            classifier=0.0,
            cross_attention=1.0,
            self_attention=0.0,
        )
    add(
        "self only",
        "attention-only",
        "variance",
        mode="share",
        classifier=0.0,
        cross_attention=0.0,
        self_attention=1.0,
    )
    for kappa in KAPPAS:  # a CW margin: no classifier gradient once an image is fooled by kappa
        add(
            f"classifier only (hybrid, cw {kappa:g})",
            f"base-cw{kappa:g}",
            None,
            mode="share",
            classifier=0.5,
            cross_attention=0.0,
            self_attention=0.0,
        )
        out[f"classifier only (hybrid, cw {kappa:g})"]["overrides"].update(
            {"attack.loss": "cw", "attack.kappa": kappa}
        )
        for c, x, s in ((0.5, 0.25, 0.25), (0.3, 0.35, 0.35), (0.2, 0.4, 0.4)):
            name = f"hybrid cw {kappa:g} {c:g}/{x:g}/{s:g} variance"
            add(
                name,
                f"cw{kappa:g}",
                "variance",
                mode="share",
                classifier=c,
                cross_attention=x,
                self_attention=s,
            )
            out[name]["overrides"].update({"attack.loss": "cw", "attack.kappa": kappa})
    for c, x, s in (
        (0.45, 0.2, 0.35),
        (0.4, 0.2, 0.4),
        (0.35, 0.3, 0.35),
        (0.35, 0.25, 0.4),
        (0.3, 0.3, 0.4),
        (0.35, 0.2, 0.45),
        (0.4, 0.25, 0.35),
    ):  # repel, more self
        add(
            f"hybrid {c:g}/{x:g}/{s:g} repel",
            "hybrid",
            "repel",
            mode="share",
            exact="cheap",
            classifier=c,
            cross_attention=x,
            self_attention=s,
        )
    for c, x, s in ((0.5, 0.25, 0.25), (0.3, 0.35, 0.35)):
        add(
            f"upgrad {c:g}/{x:g}/{s:g} variance",
            "torchjd",
            "variance",
            mode="share",
            classifier=c,
            cross_attention=x,
            self_attention=s,
        )
    return out


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


# -- one run (a child process) --------------------------------------------------------------------


def _use_upgrad() -> None:
    """Replace share mode's combination by torchjd's UPGrad on the raw per-term gradients, with
    the shares as its preference vector (one backward per term on every iteration)."""
    import torch
    from torchjd.aggregation import UPGrad

    from attnpatch.losses import term_gradients
    from attnpatch.training import weights as w

    def backward(self, terms, param, iteration):
        grads = term_gradients(terms, param)
        names = list(grads)
        pref = torch.tensor([self.weights[n] for n in names])
        jacobian = self.reduce(torch.stack([grads[n].flatten() for n in names]))
        combined = UPGrad(pref_vector=pref / pref.sum())(jacobian).reshape(param.shape)
        param.grad = combined if param.grad is None else param.grad + combined
        return terms, None

    w.Update.backward = backward


def _use_signal_norms() -> None:
    """Experimental: normalise each term by the norm of its running MEAN gradient (the part of
    it that is consistent over iterations) instead of the running mean of its norms."""
    import torch

    from attnpatch.losses import shares as S

    def backward(self, terms, param, *, measure=None):
        values = terms.values()
        terms.total()
        if measure is None:
            measure = self.calls % self.every == 0
        measure = measure or not self.norms
        self.calls += 1
        if not measure:
            w = self.weights()
            loss = sum(w[n] * v.reshape(()) for n, v in values.items() if w[n] > 0)
            if isinstance(loss, torch.Tensor):
                loss.backward()
            return None
        grads = S.term_gradients(values, param)
        names = list(grads)
        stacked = torch.stack([grads[n] for n in names])
        if self.reduce is not None:
            stacked = self.reduce(stacked)
        if not hasattr(self, "means"):
            self.means, self.t = {}, 0
        self.t += 1
        for n, g in zip(names, stacked.unbind(0)):
            m = self.means.get(n)
            self.means[n] = g.clone() if m is None else self.momentum * m + (1 - self.momentum) * g
            corr = 1 - self.momentum**self.t if m is not None else 1.0
            self.norms[n] = float((self.means[n] / corr).double().norm())
        w = self.weights()
        combined = torch.stack([w[n] * grads[n] for n in names]).sum(0)
        param.grad = combined if param.grad is None else param.grad + combined
        return S.update_shares({n: w[n] * g for n, g in zip(names, stacked.unbind(0))})

    S.GradientShares.backward = backward


def measure(trainer, scenes, patch) -> dict[str, float]:
    """Attention measures of ``patch`` on the held-out ``scenes`` (``None``: clean images)."""
    import torch

    from attnpatch.losses import (
        cross_attention_region,
        cross_attention_variance,
        self_attention_structure,
    )
    from attnpatch.training.trainer import attention_pipeline

    images, labels = scenes["images"], scenes["labels"]
    pipe = attention_pipeline(trainer.config, trainer.parts)
    embeds = pipe.encode_prompts(trainer.prompts).take(labels)
    tokens = [trainer.tokens[int(y)] for y in labels]
    with torch.no_grad():
        clean = pipe(images, embeds)
        g = torch.Generator().manual_seed(0)
        params = patch.sample_params(len(images), tuple(images.shape[-2:]), eot=True, generator=g)
        patched, pmask = patch(images, params=params)
        result = pipe(patched, embeds)
        maps = result.cross_maps(pipe.cross_resolution)
        var = cross_attention_variance(maps, tokens, reduction="none")
        mass = cross_attention_region(
            maps, pipe.resize_mask(pmask), tokens, mode="repel", reduction="none"
        )
        mse = self_attention_structure(result.self_maps(), clean.self_maps(), reduction="none")
    return {
        "label_variance": float(var.mean()),
        "mass_on_patch": float(mass.mean()),
        "self_mse": float(mse.mean()),
    }


def run_one(name: str, seed: int, out: Path, iterations: int) -> dict[str, Any]:
    import torch

    from attnpatch._util import num_threads
    from attnpatch.models.shapes_eval import heldout_scenes
    from attnpatch.training import load_config, run_training
    from attnpatch.training.transfer import evaluate_transfer_file

    spec = settings()[name]
    if spec["kind"] == "torchjd":
        _use_upgrad()
    if spec["kind"] == "share-signal":
        _use_signal_norms()
    folder = out / slug(name) / f"seed{seed}"
    overrides = dict(spec["overrides"])
    overrides.update(
        {
            "train.seed": seed,
            "train.iterations": iterations,
            "train.out_dir": str(folder),
            "train.progress": False,
        }
    )
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    res = run_training(cfg, overwrite=True, log=lambda *a: None)
    train_s = time.perf_counter() - t0
    summary = json.loads((folder / "summary.json").read_text())
    table = evaluate_transfer_file(folder / "patch.safetensors", ["tiny", "tiny-b", "tiny-c"])
    transfer = {r.victim: r.success_rate for r in table.rows}
    with num_threads(1):
        scenes = heldout_scenes(100, seed=3)
        measures = measure(res.trainer, scenes, res.trainer.patch)
    shares = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    logged = {}
    for key in {k for r in shares for k in r if k.startswith("share.")}:
        vals = [r[key] for r in shares if key in r]
        logged[key] = sum(vals) / len(vals)
    result = {
        "setting": name,
        "seed": seed,
        "success": summary["success_rate"],
        "control": summary["control_success_rate"],
        "clean_accuracy": summary["clean_accuracy"],
        "transfer": transfer,
        **measures,
        "mean_logged_shares": logged,
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


# -- the sweep ------------------------------------------------------------------------------------


def sweep(args) -> None:
    todo = []
    for name in settings():
        if args.only and not re.search(args.only, name):
            continue
        for seed in args.seeds:
            if not (args.out / slug(name) / f"seed{seed}" / "result.json").exists():
                todo.append((name, seed))
    print(f"{len(todo)} runs to do", flush=True)

    def child(job):
        name, seed = job
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", name, "--seed", str(seed), "--out", str(args.out)]
        cmd += ["--iterations", str(args.iterations)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        status = "ok" if p.returncode == 0 else f"FAILED\n{p.stderr[-2000:]}"
        print(f"{name} seed {seed}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(child, todo))


# -- the report -----------------------------------------------------------------------------------

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for one value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, _T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def own_measure(mode: str | None) -> str:
    return "label_variance" if mode in (None, "variance") else "mass_on_patch"


def load(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for f in out.glob("*/seed*/result.json"):
        r = json.loads(f.read_text())
        runs.setdefault(r["setting"], {})[r["seed"]] = r
    return runs


def summarise(runs) -> list[dict[str, Any]]:
    """One row per setting: means, intervals and changes against the same seed's baseline."""
    rows = []
    spec = settings()
    for name, by_seed in runs.items():
        kind = spec[name]["kind"] if name in spec else "?"
        mode = spec.get(name, {}).get("mode")
        base_name = {
            "sum": "classifier only (sum)",
            "base-sum": "classifier only (sum)",
            "share-iter": "classifier only (iter)",
            "base-iter": "classifier only (iter)",
            "share-signal": "classifier only (signal)",
            "base-signal": "classifier only (signal)",
            "hybrid": "classifier only (hybrid)",
            "base-hybrid": "classifier only (hybrid)",
        }.get(kind, "classifier only")
        if kind.startswith(("cw", "base-cw")):
            base_name = f"classifier only (hybrid, cw {kind.split('cw')[1]})"
        base = runs.get(base_name, {})
        seeds = sorted(s for s in by_seed if s in base)
        if not seeds:
            continue
        own = own_measure(mode)

        def rel(key, s):
            b = base[s][key]
            return 100 * (by_seed[s][key] - b) / b

        row = {
            "setting": name,
            "kind": kind,
            "mode": mode,
            "seeds": seeds,
            "success": mean_ci([100 * by_seed[s]["success"] for s in seeds]),
            "d_success": mean_ci(
                [100 * (by_seed[s]["success"] - base[s]["success"]) for s in seeds]
            ),
            "tiny-b": mean_ci([100 * by_seed[s]["transfer"]["tiny-b"] for s in seeds]),
            "tiny-c": mean_ci([100 * by_seed[s]["transfer"]["tiny-c"] for s in seeds]),
            "d_tiny-b": mean_ci(
                [
                    100 * (by_seed[s]["transfer"]["tiny-b"] - base[s]["transfer"]["tiny-b"])
                    for s in seeds
                ]
            ),
            "d_tiny-c": mean_ci(
                [
                    100 * (by_seed[s]["transfer"]["tiny-c"] - base[s]["transfer"]["tiny-c"])
                    for s in seeds
                ]
            ),
            "d_cross": mean_ci([rel(own, s) for s in seeds]),
            "d_variance": mean_ci([rel("label_variance", s) for s in seeds]),
            "d_mass": mean_ci([rel("mass_on_patch", s) for s in seeds]),
            "d_self": mean_ci([rel("self_mse", s) for s in seeds]),
            "seconds": mean_ci([by_seed[s]["train_seconds"] for s in seeds]),
        }
        rows.append(row)
    order = {k: i for i, k in enumerate(spec)}
    return sorted(rows, key=lambda r: order.get(r["setting"], 1e9))


def fmt(mc: tuple[float, float], digits: int = 1, sign: bool = False) -> str:
    m, h = mc
    s = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return f"{s} ± {h:.{digits}f}"


def table(rows) -> str:
    lines = [
        "| setting | white-box % | Δ white-box (pts) | tiny-b % | tiny-c % | Δ own cross measure % "
        "| Δ self-attn MSE % | s/run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {fmt(r['success'])} | {fmt(r['d_success'], sign=True)} | "
            f"{fmt(r['tiny-b'])} | {fmt(r['tiny-c'])} | {fmt(r['d_cross'], 0, True)} | "
            f"{fmt(r['d_self'], 0, True)} | {r['seconds'][0]:.0f} |"
        )
    return "\n".join(lines)


def figure(rows, path: Path) -> None:
    from matplotlib.figure import Figure

    colours = {
        "hybrid": "C6",  # share mode, exact cheap: the default mode
        "share": "C0",
        "share variants": "C4",
        "sum": "C1",
        "cw margin": "C5",
        "attention-only": "C2",
        "torchjd": "C3",
        "classifier only": "k",
    }

    def colour(kind: str) -> str:
        if kind.startswith("base"):
            return colours["classifier only"]
        if kind.startswith("cw"):
            return colours["cw margin"]
        if kind.startswith("share-"):
            return colours["share variants"]
        return colours.get(kind, "C7")

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or ["variance"]
    fig = Figure(figsize=(4.4 * len(modes), 11), layout="constrained")
    axes = fig.subplots(3, len(modes), squeeze=False)
    for col, mode in enumerate(modes):
        mine = [r for r in rows if r["mode"] in (mode,) or r["kind"].startswith("base")]
        what = {
            "variance": "label-map variance",
            "repel": "label mass on patch",
            "attract": "label mass on patch",
        }[mode]
        panels = [
            (axes[0, col], "d_cross", "d_success", f"Δ {what} (%)", "Δ white-box success (pts)"),
            (
                axes[1, col],
                "d_self",
                "d_success",
                "Δ self-attention MSE to clean (%)",
                "Δ white-box success (pts)",
            ),
        ]
        for ax, xk, yk, xl, yl in panels:
            for r in mine:
                ax.errorbar(
                    r[xk][0],
                    r[yk][0],
                    xerr=r[xk][1],
                    yerr=r[yk][1],
                    fmt="o",
                    color=colour(r["kind"]),
                    ms=4,
                    lw=0.8,
                    capsize=2,
                )
            ax.axhline(-3, color="0.6", ls=":", lw=0.8)
            ax.axvline(
                -15 if not (xk == "d_cross" and mode == "attract") else 15,
                color="0.6",
                ls=":",
                lw=0.8,
            )
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_title(f"cross_loss = {mode}" if xk == "d_cross" else "", fontsize=10)
        ax = axes[2, col]
        for r in mine:
            for victim, marker in (("tiny-b", "o"), ("tiny-c", "s")):
                ax.errorbar(
                    r["success"][0],
                    r[victim][0],
                    xerr=r["success"][1],
                    yerr=r[victim][1],
                    fmt=marker,
                    color=colour(r["kind"]),
                    ms=4,
                    lw=0.8,
                    capsize=2,
                )
        ax.set_xlabel("white-box success on tiny (%)")
        ax.set_ylabel("transfer success (%): o tiny-b, s tiny-c")
        for ax, xk, yk in (
            (axes[0, col], "d_cross", "d_success"),
            (axes[1, col], "d_self", "d_success"),
        ):
            for r in mine:
                if r["setting"] == DEFAULT:  # the library's default, ringed
                    ax.plot(r[xk][0], r[yk][0], "o", ms=11, mfc="none", mec="k", mew=1.2)
                    ax.annotate(
                        "default",
                        (r[xk][0], r[yk][0]),
                        xytext=(6, 6),
                        textcoords="offset points",
                        fontsize=8,
                    )
    present = {"classifier only" if r["kind"].startswith("base") else r["kind"] for r in rows}
    present = {
        ("cw margin" if k.startswith("cw") else "share variants" if k.startswith("share-") else k)
        for k in present
    }
    handles = [
        axes[0, 0].plot([], [], "o", color=c, label=LEGEND.get(k, k))[0]
        for k, c in colours.items()
        if k in present
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4))
    fig.suptitle("Attention guidance on the embedded default: mean and 95 % interval over seeds")
    fig.savefig(path, dpi=110)


def report(args) -> None:
    rows = summarise(load(args.out))
    print(table(rows))
    args.report.mkdir(parents=True, exist_ok=True)
    figure(rows, args.report / "guidance.png")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(f"figure: {args.report / 'guidance.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/guidance"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--only", default="", help="regex on setting names")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--list", action="store_true", help="the settings (--only filters them)")
    ap.add_argument("--all", action="store_true", help="sweep every setting (~130 x seeds runs)")
    ap.add_argument("--report", type=Path, default=None, help="folder for guidance.png")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.list:
        print("\n".join(n for n in settings() if re.search(args.only, n)))
    elif args.one:
        print(json.dumps(run_one(args.one, args.seed, args.out, args.iterations)))
    elif args.report:
        report(args)
    elif args.only or args.all:
        sweep(args)
    else:
        ap.error("say what to run: --only REGEX (see --list), --all, or --report FOLDER")


if __name__ == "__main__":
    main()
