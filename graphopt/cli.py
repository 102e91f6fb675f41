"""The `graphopt` command line.

    graphopt compile pkg.module:factory --target arm --out build/ [--verify]
    graphopt optimize pkg.module:factory --data fashion-mnist --recipe recipe.toml --target arm --out build/
    graphopt tune pkg.module:factory --target host --trials 500 --db tuning/host/   # Ctrl-C, rerun resumes
    graphopt compile pkg.module:factory --target host --db tuning/host/ --out build/   # with the tuned kernels
    graphopt targets [--json] [--ops TARGET]
    graphopt setup-runtime            # fetch the aarch64 TVM runtime and build the QEMU plugin
    graphopt rpc-device --target arm-a53 --tracker 127.0.0.1:9190 --key emulated-a53   # emulated board

A factory is a callable returning ``(model, example_inputs)``; ``path/to/file.py:factory`` works
too. graphopt errors print one message (exit code 2); so does an error in the factory's file (a
syntax error, an exception at import or in the factory), naming file and line instead of a
traceback. Nothing is written on failure.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from graphopt.config import OptimizeFor
from graphopt.errors import ConfigError, GraphoptError, first_line


def _user_code_error(what: str, exc: Exception) -> ConfigError:
    """One line for an error in the user's own code: what raised, the message, and file:line."""
    if isinstance(exc, SyntaxError):
        return ConfigError(f"{what}: SyntaxError: {exc.msg} at {exc.filename}:{exc.lineno}: "
                           f"{(exc.text or '').strip()}; fix the file and run again")
    from graphopt.passes.capture import user_frame

    return ConfigError(f"{what} raised {first_line(exc)} at {user_frame(exc)}; fix it and run again")


def load_factory(spec: str):
    """Resolve ``module:attr`` or ``file.py:attr`` to the factory callable; errors in the module
    (syntax, import-time exceptions) become one `ConfigError` line naming file and line."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ConfigError(f"model spec {spec!r} must look like pkg.module:factory or path/to/file.py:factory")
    path = Path(mod_name).resolve() if mod_name.endswith(".py") else None
    if path is not None and not path.is_file():
        raise ConfigError(f"no such file: {path}; give the path of the Python file that defines {attr!r}")
    try:
        if path is not None:
            s = importlib.util.spec_from_file_location(path.stem, path)
            if s is None or s.loader is None:
                raise ConfigError(f"{path} cannot be imported as a Python module")
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if path is None and exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise ConfigError(f"cannot import {mod_name!r}: there is no module {exc.name!r}. Run from the folder "
                              "that holds it, add that folder to PYTHONPATH, or give path/to/file.py:factory") from exc
        raise _user_code_error(f"importing {mod_name}", exc) from exc
    except Exception as exc:  # the user's module failed while loading: say where, not a traceback
        raise _user_code_error(f"importing {mod_name}", exc) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        defines = f"; it defines {', '.join(found)}" if found else ""
        raise ConfigError(f"{mod_name} has no callable {attr!r}{defines}")
    return factory


def build_model(spec: str, *, inputs_required: bool = True):
    """Call the factory ``spec`` names: ``(model, example_inputs)``, or (``inputs_required=False``)
    a model alone as ``(model, None)``. An exception in the factory becomes one `ConfigError` line."""
    factory = load_factory(spec)
    try:
        built = factory()
    except GraphoptError:
        raise
    except Exception as exc:
        raise _user_code_error(f"the factory {spec}", exc) from exc
    if isinstance(built, tuple) and len(built) == 2:
        return built
    if inputs_required:
        raise ConfigError(f"{spec} must return (model, example_inputs), got {type(built).__name__}")
    return built, None


def _cmd_compile(a) -> int:
    from graphopt.api import compile
    from graphopt.artifact import check_destination
    from graphopt.targets import get_target

    spec = get_target(a.target)
    out = check_destination(a.out, overwrite=a.overwrite)
    model, inputs = build_model(a.model)
    cm = compile(model, inputs, spec, verify=a.verify, progress=not a.quiet,
                 count_instructions=not a.no_count_instructions, optimize_for=a.optimize_for, cache=a.cache,
                 database=a.db)
    path = cm.save(out, overwrite=a.overwrite)
    report = cm.report
    assert report is not None  # compile always reports
    print(report.to_json() if a.json else report.to_markdown())
    print(f"artifact written to {path}", file=sys.stderr)
    return 0


def _cmd_optimize(a) -> int:
    import tomllib

    from graphopt.artifact import check_destination
    from graphopt.datasets import fashion_mnist
    from graphopt.distillation import loader
    from graphopt.recipe import Recipe, optimize

    out = Path(a.out)
    check_destination(out / "artifact", overwrite=a.overwrite)
    try:
        recipe = Recipe.from_dict(tomllib.loads(Path(a.recipe).read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {a.recipe}: {exc}") from None
    datasets = {"fashion-mnist": fashion_mnist}
    if a.data not in datasets:
        raise ConfigError(f"--data {a.data!r}: known datasets are {sorted(datasets)}")
    train = loader(datasets[a.data]("train", limit=a.limit), batch_size=a.batch_size)
    val = loader(datasets[a.data]("test", limit=a.limit), batch_size=512, shuffle=False)
    model, _ = build_model(a.model, inputs_required=False)
    result = optimize(model, train, val, a.target, recipe=recipe, out_dir=out / "optimize", progress=not a.quiet)
    result.compiled.save(out / "artifact", overwrite=a.overwrite)
    print(result.report.to_markdown())
    print(f"artifact and plots written to {out}", file=sys.stderr)
    return 0


def _cmd_tune(a) -> int:
    from graphopt.tuning import RPCRunner, tune

    model, inputs = build_model(a.model)
    runner = RPCRunner(tracker=a.rpc_tracker, key=a.rpc_key) if a.rpc_tracker else a.runner
    try:
        summary = tune(model, inputs, a.target, trials=a.trials, trials_per_task=a.trials_per_task,
                       database=a.db, runner=runner, progress=True)
    except KeyboardInterrupt:
        print(f"graphopt: tuning interrupted; every record measured so far is kept in {a.db or 'tuning/' + a.target}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    print(summary.to_markdown())
    return 0


def _cmd_targets(a) -> int:
    from graphopt.targets import aliases_of, get_target, list_targets

    if a.ops:
        ops = get_target(a.ops).ops
        print(json.dumps(ops.to_dict(), indent=2) if a.json else ops.describe())
        return 0
    specs = list_targets()
    if a.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return 0
    for s in specs:
        alias = f" (alias: {', '.join(aliases_of(s.name))})" if aliases_of(s.name) else ""
        features = ", ".join(sorted(f.value for f in s.features)) or "-"
        print(f"{s.name}{alias}\n    {s.description}\n    features: {features}"
              f"; vector {s.vector_bits} bit; runtime {s.runtime.value}"
              + (f"; qemu {s.qemu_binary} -cpu {s.qemu_cpu}" if s.qemu_binary else "")
              + f"; ops {s.ops.name}")
    return 0


def _cmd_setup_runtime(a) -> int:
    from graphopt.progress import shown
    from graphopt.targets.backends.toolchain import ensure_qemu_plugin, ensure_runtime

    with shown(True):
        print(f"aarch64 TVM runtime: {ensure_runtime()}")
        print(f"QEMU instruction-count plugin: {ensure_qemu_plugin()}")
    return 0


def _cmd_rpc_device(a) -> int:
    from graphopt.targets import get_target
    from graphopt.targets.tuning.rpc import EMULATED_NOTE, serve

    spec = get_target(a.target)
    serve(spec, a.tracker, a.key, host=a.host, ready=lambda port: print(
        f"emulated {spec.name} device (qemu -cpu {spec.qemu_cpu}) on port {port}, registered with {a.tracker} "
        f"as {a.key!r}; {EMULATED_NOTE}", flush=True))
    return 0


OVERWRITE_HELP = ("replace an existing graphopt artifact at --out (folders that are not artifacts are never "
                  "replaced)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphopt", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model for a target and write the artifact")
    c.add_argument("model", help="pkg.module:factory or file.py:factory returning (model, example_inputs)")
    c.add_argument("--target", default="arm", help="target name (see `graphopt targets`)")
    c.add_argument("--out", required=True, help="artifact folder (written atomically)")
    c.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True, help=OVERWRITE_HELP)
    c.add_argument("--verify", action="store_true", help="run the artifact (emulated for ARM) and compare to PyTorch")
    c.add_argument("--no-count-instructions", action="store_true", help="skip the QEMU instruction count")
    c.add_argument("--optimize-for", type=OptimizeFor, choices=list(OptimizeFor), default=OptimizeFor.BALANCED,
                   metavar="{" + ",".join(m.value for m in OptimizeFor) + "}",
                   help="where the target offers a choice (Cortex-M: int16 or int8 weights per layer), favour speed, "
                        "size, or a balance (default) — always within the board's flash")
    c.add_argument("--db", default=None, help="a `graphopt tune` database folder: its tuned kernels where they beat "
                                               "the default schedules (report: lowering.from_database)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    c.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the artifact of an identical earlier build ($GRAPHOPT_BUILD_CACHE, default "
                        "$GRAPHOPT_HOME/builds)")
    c.set_defaults(func=_cmd_compile)
    o = sub.add_parser("optimize", help="prune / quantize / distill with a recipe, then compile")
    o.add_argument("model", help="pkg.module:factory or file.py:factory returning a model or (model, inputs)")
    o.add_argument("--data", required=True, help="training/validation data (fashion-mnist)")
    o.add_argument("--recipe", required=True, help="recipe.toml with [prune], [quantize], [stop], [train]")
    o.add_argument("--target", default="arm")
    o.add_argument("--out", required=True, help="folder for the artifact, table and plot")
    o.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True, help=OVERWRITE_HELP)
    o.add_argument("--limit", type=int, default=None, help="use only the first N samples of each split")
    o.add_argument("--batch-size", type=int, default=128)
    o.add_argument("--quiet", action="store_true")
    o.set_defaults(func=_cmd_optimize)
    u = sub.add_parser("tune", help="MetaSchedule-tune a model's kernels into a database folder (resumable)")
    u.add_argument("model", help="pkg.module:factory or file.py:factory returning (model, example_inputs)")
    u.add_argument("--target", default="host")
    u.add_argument("--trials", type=int, default=200, help="trial budget for the model (records already in --db count)")
    u.add_argument("--trials-per-task", type=int, default=None, help="per-kernel cap (default: trials / kernels)")
    u.add_argument("--db", default=None, help="database folder (default: tuning/<target>/)")
    u.add_argument("--runner", default="local", choices=["local", "emulated-icount"],
                   help="local timing, or instruction counts under QEMU (an ARM PROXY, not a speed)")
    u.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="measure on boards of a TVM RPC tracker")
    u.add_argument("--rpc-key", default=None, help="device key the boards registered with")
    u.set_defaults(func=_cmd_tune)
    t = sub.add_parser("targets", help="list targets and their features")
    t.add_argument("--json", action="store_true")
    t.add_argument("--ops", metavar="TARGET", help="print TARGET's operator set (what graphopt legalizes into)")
    t.set_defaults(func=_cmd_targets)
    s = sub.add_parser("setup-runtime", help="fetch the aarch64 TVM runtime and build the QEMU plugin (idempotent)")
    s.set_defaults(func=_cmd_setup_runtime)
    r = sub.add_parser("rpc-device",
                       help="serve an emulated ARM board to a TVM RPC tracker (timings are not real speeds)")
    r.add_argument("--target", default="arm-a53", help="an aarch64 target; sessions run under its qemu -cpu")
    r.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the TVM RPC tracker to register with")
    r.add_argument("--key", required=True, help="device key (what graphopt.RPCRunner / --rpc-key asks for)")
    r.add_argument("--host", default="127.0.0.1", help="address to serve sessions on (0.0.0.0 for a remote tracker)")
    r.set_defaults(func=_cmd_rpc_device)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphopt: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
