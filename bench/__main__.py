"""`python -m bench [--quick] [--only SECTION ...] [--report-only]`: run the benchmarks, write
docs/benchmarks.md and its plots.

Sections: parse (with the parsing-context case), context (Airflow's parsing context, checked
under `dags test` and under the scheduler), fanout, overhead, validate. Raw results are kept in
bench/.work/results-<plan>.json; --report-only renders the docs from them again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime

from bench import environment
from bench.environment import PYCACHE, PYTHON, WORK

SECTIONS = ("parse", "context", "fanout", "overhead", "validate")

PLANS = {
    "full": {
        "parse_sizes": [10, 100, 1000, 5000],
        "parse_repeats": {10: 5, 100: 5, 1000: 5, 5000: 2},
        "context_sizes": [1000],
        "profile_size": 1000,
        "fanout_sizes": [100, 1000, 10000],
        "fanout_repeats": {100: 3, 1000: 3, 10000: 2},
        "mapped_repeats": {100: 3, 1000: 2, 10000: 1},
        "raised_limit": [],
        "bootstrap_cold": 3,
        "bootstrap_warm": 5,
        "cluster_repeats": 5,
        "worker_counts": [1, 2, 4],
        "first_line_repeats": 5,
        "validate_sizes": [1000, 5000],
        "validate_repeats": 5,
        "scheduler": True,
    },
    "quick": {
        "parse_sizes": [10, 100],
        "parse_repeats": {10: 2, 100: 2},
        "context_sizes": [100],
        "profile_size": 100,
        "fanout_sizes": [100],
        "fanout_repeats": {100: 1},
        "mapped_repeats": {100: 1},
        "raised_limit": [],
        "bootstrap_cold": 1,
        "bootstrap_warm": 2,
        "cluster_repeats": 2,
        "worker_counts": [1, 2],
        "first_line_repeats": 2,
        "validate_sizes": [100],
        "validate_repeats": 2,
        "scheduler": False,
    },
}


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--report-only", action="store_true", help="render docs/ from the last results"
    )
    parser.add_argument(
        "--out", default=None, help="report file (default: docs/benchmarks.md; quick: under .work)"
    )
    args = parser.parse_args(argv)
    plan_name = "quick" if args.quick else "full"
    plan = PLANS[plan_name]
    results_file = WORK / f"results-{plan_name}.json"
    WORK.mkdir(parents=True, exist_ok=True)
    # Children inherit this: bytecode is cached (under bench/.work), as on any real host.
    for name in environment.BYTECODE_VARIABLES:
        os.environ.pop(name, None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(PYCACHE)

    from bench import report

    if args.report_only:
        results = json.loads(results_file.read_text())
    else:
        earlier = args.only and results_file.exists()  # --only adds to the last full results
        results = json.loads(results_file.read_text()) if earlier else {}
        results = run(plan_name, plan, args.only or list(SECTIONS), results, results_file)
    out = report.write(results, args.out, quick=args.quick)
    log(f"wrote {out}")
    return 0


def run(plan_name: str, plan: dict, sections: list[str], results: dict, results_file) -> dict:
    started = time.perf_counter()
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rerun = "started" in results
    if rerun:
        results.setdefault("reruns", []).append({"sections": sections, "at": now})
    else:
        results["plan"] = plan_name
        results["command"] = "./bench/run" + (" --quick" if plan_name == "quick" else "")
        results["started"] = now
        results["machine"] = environment.machine_info()
        results["load_before"] = os.getloadavg()
    pythons = {
        "ours": PYTHON,
        "floor": PYTHON,
        "dag-factory": str(environment.dag_factory_python(log)),
    }
    results["versions"] = {
        "ours": environment.package_versions(PYTHON, "apache-airflow", "apache-airflow-task-sdk"),
        "dag-factory": environment.package_versions(
            pythons["dag-factory"], "apache-airflow", "apache-airflow-task-sdk", "dag-factory"
        ),
    }

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=1, default=str))

    if "parse" in sections:
        from bench import parse

        # One unrecorded parse per contender fills the bytecode cache.
        loaders = parse.generate(plan["parse_sizes"][0])
        for contender in parse.CONTENDERS:
            parse.parse_once(pythons[contender], loaders[contender])
        results["parse"] = parse.run(
            plan["parse_sizes"], plan["parse_repeats"], pythons, plan["context_sizes"], log
        )
        results["parse"]["profiles"] = profiles(parse, plan["profile_size"], pythons)
        save()
    if "context" in sections:
        from bench import parsing_context

        results["context"] = parsing_context.run(plan["scheduler"], log)
        save()
    if "fanout" in sections:
        from bench import fanout

        results["fanout"] = fanout.run(
            plan["fanout_sizes"],
            plan["fanout_repeats"],
            plan["mapped_repeats"],
            plan["raised_limit"],
            log,
        )
        save()
    if "overhead" in sections:
        from bench import overhead

        results["overhead"] = overhead.run(
            plan["bootstrap_cold"],
            plan["bootstrap_warm"],
            plan["cluster_repeats"],
            plan["worker_counts"],
            plan["first_line_repeats"],
            log,
        )
        save()
    if "validate" in sections:
        from bench import validate

        sizes = plan["validate_sizes"]
        results["validate"] = validate.run(sizes, plan["validate_repeats"], log)
        save()
    if not rerun:
        results["elapsed_s"] = time.perf_counter() - started
        results["load_after"] = os.getloadavg()
    save()
    return results


def profiles(parse, n: int, pythons: dict) -> dict:
    """cProfile listings of our parse at size n: full (processor) and with a parsing context."""
    import io
    import pstats

    listings = {}
    cases = {
        "ours-processor": ("ours", "processor", None),
        "dag-factory-processor": ("dag-factory", "processor", None),
        "ours-task-context": ("ours", "task", (parse.dag_id(max(1, n // 2)), "pipeline.run")),
    }
    for name, (contender, mode, context) in cases.items():
        log(f"profiling {name} at N={n}")
        path = parse.profile(n, contender, pythons[contender], mode, context)
        listing = {}
        for order, limit in (("cumulative", 30), ("tottime", 20)):
            buffer = io.StringIO()
            stats = pstats.Stats(str(path), stream=buffer)
            stats.sort_stats(order).print_stats(limit)
            listing[order] = _shorten(buffer.getvalue())
        listing["key"] = key_entries(path)
        listings[name] = listing
    return listings


KEY_FUNCTIONS = {
    ("dagfactory/dag/build.py", "build_dags"): "build_dags",
    ("dagfactory/dag/build.py", "build_dag"): "build_dag",
    ("dagfactory/spec/load.py", "load_files"): "load_files",
    ("dagfactory/spec/yamlfile.py", "read_yaml"): "read_yaml",
    ("dagfactory/spec/load.py", "_schema_findings"): "schema",
    ("dacite/core.py", "from_dict"): "dacite",
    ("dagfactory/spec/checks.py", "check_spec"): "check_spec",
    ("airflow/dag_processing/dagbag.py", "collect_dags"): "import",
    ("airflow/dag_processing/processor.py", "_serialize_dags"): "serialize",
    ("airflow/sdk/definitions/param.py", "resolve"): "param_resolve",
    ("jsonschema/validators.py", "check_schema"): "check_schema",
    ("airflow/sdk/definitions/dag.py", "_validate_params"): "dag_validate_params",
    ("airflow/sdk/bases/operator.py", "get_merged_defaults"): "merge_defaults",
}


def key_entries(path) -> dict:
    """Calls and cumulative seconds of the functions the report discusses, from a .prof file."""
    import pstats

    found = {}
    for (file, _line, name), (_cc, calls, _tt, cum, _callers) in pstats.Stats(
        str(path)
    ).stats.items():
        for (suffix, function), key in KEY_FUNCTIONS.items():
            if name == function and file.endswith(suffix) and key not in found:
                found[key] = {"calls": calls, "cum_s": cum}
    return found


def _shorten(text: str) -> str:
    """Site-packages and home paths out of a pstats listing, the header lines dropped."""
    import re

    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    body = "\n".join(line.rstrip() for line in lines[start:] if line.strip())
    body = re.sub(r"/\S*?/site-packages/", "", body)
    body = re.sub(r"/\S*?/lib/python3\.\d+/", "", body)
    return body.replace(str(environment.ROOT) + "/", "")


if __name__ == "__main__":
    sys.exit(main())
