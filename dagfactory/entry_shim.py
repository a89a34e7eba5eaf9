"""Runs inside the pipeline's virtualenv: connect to Dask, call the entry point, save its result.

This file is executed as a script by the pipeline's own interpreter, where neither Airflow nor
dagfactory is installed, so it imports only the standard library and Dask.
"""

import argparse
import hashlib
import importlib
import json
import pathlib
import sys
import tempfile
import traceback
import zipfile


def _ship_code(client, code_dir: str) -> None:
    """Upload the repository's Python packages and modules to the scheduler and every worker.

    Dask pickles functions by reference and, since 2024, the scheduler unpickles task graphs:
    both need to import the pipeline's code. A cluster that never saw the repository (an
    existing one, or one in the cloud) gets it this way, and so does every worker that joins
    later.
    """
    root = pathlib.Path(code_dir)
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    archive = pathlib.Path(tempfile.gettempdir()) / f"dagfactory_code_{digest}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.iterdir()):
            if path.name.startswith(".") or path.name == "__pycache__":
                continue
            if path.suffix == ".py" and path.is_file():
                zf.write(path, path.name)
            elif path.is_dir() and (path / "__init__.py").is_file():
                for item in sorted(path.rglob("*")):
                    if item.is_file() and "__pycache__" not in item.parts:
                        zf.write(item, item.relative_to(root).as_posix())
    try:
        client.upload_file(str(archive), load=True)
    finally:
        archive.unlink(missing_ok=True)


def _call(args: argparse.Namespace) -> object:
    from distributed import Client

    module_name, _, function_name = args.entrypoint.partition(":")
    module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AttributeError(f"module {module_name!r} has no function {function_name!r}")
    with open(args.params) as f:
        params = json.load(f)
    with Client(args.scheduler, timeout=60) as client:
        _ship_code(client, args.code_dir)
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
