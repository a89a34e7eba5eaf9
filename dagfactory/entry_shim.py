"""Runs inside the pipeline's virtualenv: connect to Dask, call the entry point, save its result.

This file is executed as a script by the pipeline's own interpreter, where neither Airflow nor
dagfactory is installed, so it imports only the standard library and Dask.
"""

import argparse
import importlib
import json
import sys
import traceback


def _call(args: argparse.Namespace) -> object:
    import cloudpickle
    from distributed import Client

    module_name, _, function_name = args.entrypoint.partition(":")
    module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AttributeError(f"module {module_name!r} has no function {function_name!r}")
    # Ship the pipeline's own code to the workers by value, so that a cluster that never saw
    # the repository (an existing one, or one in the cloud) can run it all the same.
    cloudpickle.register_pickle_by_value(importlib.import_module(module_name.split(".")[0]))
    with open(args.params) as f:
        params = json.load(f)
    with Client(args.scheduler, timeout=60) as client:
        return function(client, **params)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--entrypoint", required=True)
    parser.add_argument("--code-dir", required=True)
    parser.add_argument("--params", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--error", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.code_dir)
    try:
        result = _call(args)
    except BaseException as exc:
        traceback.print_exc()
        with open(args.error, "w") as f:
            json.dump(
                {
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "traceback": traceback.format_exc(),
                },
                f,
            )
        return 1
    try:
        text = json.dumps(result)
    except (TypeError, ValueError) as exc:
        with open(args.error, "w") as f:
            json.dump(
                {
                    "type": "TypeError",
                    "message": f"the entry point returned a {type(result).__name__}, which is "
                    f"not JSON ({exc}); return a dict, list, string, number or None",
                    "traceback": "",
                },
                f,
            )
        return 1
    with open(args.result, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
