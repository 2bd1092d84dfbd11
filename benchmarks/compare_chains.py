"""Two runs of benchmarks/chain.py side by side: each step's mean ± std over seeds and the paired change.

Used to judge a speed-for-quality trade (results/speed_trades.md): the same methods and seeds under the
default and under the trade.

    python benchmarks/compare_chains.py results/chain.csv OTHER.csv --label-a default --label-b trade
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Rows (method, step): mean and std of each (in %), paired mean change b - a and its std; seeds in both."""
    keep = ["method", "seed", "step", "miou"]
    a, b = (df[keep].dropna(subset=["miou"]) for df in (a, b))
    both = a.merge(b, on=["method", "seed", "step"], suffixes=("_a", "_b"))
    rows = []
    for (method, step), g in both.groupby(["method", "step"], sort=False):
        diff = 100 * (g["miou_b"] - g["miou_a"])
        rows.append({"method": method, "step": step, "seeds": len(g),
                     "a": f"{100 * g['miou_a'].mean():.1f} ± {100 * g['miou_a'].std(ddof=1):.1f}",
                     "b": f"{100 * g['miou_b'].mean():.1f} ± {100 * g['miou_b'].std(ddof=1):.1f}",
                     "change": f"{diff.mean():+.1f} ± {diff.std(ddof=1):.1f}",
                     "per seed": ", ".join(f"{d:+.1f}" for d in diff)})
    return pd.DataFrame(rows)


def median_stage_seconds(df: pd.DataFrame) -> pd.Series:
    """Median seconds per stage over every (method, seed) that timed it."""
    t = df[df["step"].str.startswith("time:")]
    return t.groupby(t["step"].str[5:])["seconds"].median()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--label-a", default="a")
    p.add_argument("--label-b", default="b")
    args = p.parse_args(argv)
    a, b = pd.read_csv(args.a), pd.read_csv(args.b)
    table = compare(a, b).rename(columns={"a": args.label_a, "b": args.label_b})
    print(table.to_markdown(index=False))
    times = pd.DataFrame({args.label_a: median_stage_seconds(a), args.label_b: median_stage_seconds(b)})
    print()
    print(times.to_markdown(floatfmt=".0f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
