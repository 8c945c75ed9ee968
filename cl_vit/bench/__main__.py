"""``python -m cl_vit.bench [NAME ...] [--quick] [--out FILE]``: performance ratios, measured in one process."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cl_vit.bench import available, run_bench
from cl_vit.rundir import atomic_write_json


def format_table(results: list[dict]) -> str:
    lines = [f"{'bench':<10} {'case':<34} {'metric':<22} {'value':>11} {'baseline':>11} {'ratio':>7}  aim"]
    for res in results:
        for r in res["rows"]:
            ok = {True: "ok", False: "MISSED", None: ""}[r.get("meets_aim")]
            spread = f" (quartiles {r['quartiles'][0]:.3f}-{r['quartiles'][1]:.3f} of {r['pairs']} pairs)" \
                if r.get("quartiles") else ""
            lines.append(
                f"{res['name']:<10} {r['case'][:34]:<34} {r['metric'][:22]:<22} {r['value']:>11.4g} "
                f"{r['baseline']:>11.4g} {r['ratio']:>7.3f}  {r.get('aim') or ''} {ok}{spread}".rstrip()
            )
        for note in res.get("notes", []):
            lines.append(f"{'':<10} note: {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    names = available()
    p = argparse.ArgumentParser(prog="python -m cl_vit.bench", description=__doc__)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {names})")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller inputs (smoke test)")
    p.add_argument("--out", default="bench_results/bench.json", help="where to write the JSON (default: %(default)s)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        print(f"error: unknown benchmark {unknown[0]!r}: choose from {names}", file=sys.stderr)
        return 2
    results = []
    out = Path(args.out)
    for name in args.names or names:
        print(f"running bench {name} ...", flush=True)
        results.append(run_bench(name, quick=args.quick))
        print(format_table(results[-1:]), flush=True)
        atomic_write_json(out, {"results": results})  # what is measured survives a later bench's failure
    print(format_table(results))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
