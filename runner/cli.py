"""Command-line interface: parse flags into Settings, dispatch, and turn the errors that
reach it into exit codes (one line each). Each RunnerError carries its own code
(runner/errors.py); a run's own outcome is mapped by the guard, and the flow stage's by
runner/stage.py, from the same table."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from runner import __version__, logs, redaction
from runner.errors import ExitCode, RunnerError, internal_error_line
from runner.settings import Settings, env_var, load_settings

log = logging.getLogger("runner")

# Subcommands by name; anything else on the command line means `run` (so that
# `python -m runner --flow-run-id ID` works as Prefect workers call it).
COMMANDS = ("run", "bundle", "env", "doctor", "launch")
# The settings `env build` reads (it builds into the workdir's cache, as a run would).
_ENV_BUILD_SETTINGS = ("workdir", "index_url", "extra_index_url", "env_cache_bytes", "log_level")
# The settings `doctor` reads: where runs work, how often they beat, which cloud this is.
_DOCTOR_SETTINGS = (
    "workdir",
    "heartbeat_seconds",
    "cloud",
    "metadata_url",
    "hourly_cost",
    "price_table",
    "log_level",
)


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] not in (*COMMANDS, "--version"):
        args_in.insert(0, "run")
    args = _parser().parse_args(args_in)
    try:
        return int(args.handler(args))
    except RunnerError as exc:
        logs.configure("INFO")
        log.error("%s", exc)
        return int(exc.exit_code)
    except Exception as exc:  # a bug: still one line and a documented code
        logs.configure("INFO")
        log.debug("internal error", exc_info=True)
        log.error("%s", internal_error_line(exc))
        return int(ExitCode.BOOTSTRAP_ERROR)


def _run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in Settings.model_fields}
    settings = load_settings(**overrides)
    redaction.watch(settings.secret_env)
    logs.configure(settings.log_level)
    # Imported here so that `--help` and config errors stay instant.
    from runner import guard

    return int(guard.run(settings))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runner",
        description="Claim one Prefect flow run, run it in-process, report, tear the VM down.",
    )
    parser.add_argument("--version", action="version", version=f"prefect-vm-runner {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="execute one flow run (the default command)",
        description="Execute one flow run: claim it, load its code, run it in-process, "
        "report the final state, tear down. Every flag can also be set with the environment "
        "variable shown; flags win. Prefect itself is configured as usual with PREFECT_API_URL "
        "and PREFECT_API_KEY.",
        epilog=_exit_code_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_settings_flags(run)
    run.set_defaults(handler=_run)
    _add_bundle_commands(commands)
    _add_env_commands(commands)
    _add_doctor_command(commands)
    _add_launch_command(commands)
    return parser


def _add_bundle_commands(commands: argparse._SubParsersAction) -> None:
    bundle = commands.add_parser("bundle", help="build, push and pull code bundles")
    actions = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    push = actions.add_parser(
        "push",
        help="build a deterministic bundle of PATH and upload it as <URL>/<sha256>.tar.gz",
        description="Build a reproducible tar.gz of PATH (honouring .gitignore and "
        ".prefectignore), name it by its sha256, upload it under --to unless it is already "
        "there, and print its URL on stdout.",
    )
    push.add_argument("path", metavar="PATH", help="the project directory to bundle")
    push.add_argument(
        "--capture",
        action="store_true",
        help="also record the current Python environment in the bundle (senv.json), which "
        "the runner installs before the flow runs (like Coiled's package sync)",
    )
    push.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="where bundles go: s3://bucket/prefix, gs://..., az://..., file://...",
    )
    push.set_defaults(handler=_bundle_push)
    pull = actions.add_parser(
        "pull",
        help="fetch a bundle into the cache (image builds), optionally extracting it",
        description="Download and verify the bundle at URL into <workdir>/cache/bundles, so "
        "that a runner using the same workdir starts without downloading it.",
    )
    pull.add_argument("url", metavar="URL", help="a bundle URL as `bundle push` prints it")
    pull.add_argument("--into", metavar="DIR", help="also extract the bundle into DIR")
    pull.add_argument(
        "--workdir",
        metavar="DIR",
        default=None,
        help=f"{Settings.model_fields['workdir'].description} [env RUNNER_WORKDIR]",
    )
    pull.set_defaults(handler=_bundle_pull)


def _bundle_push(args: argparse.Namespace) -> int:
    logs.configure("INFO")
    from runner.steps import push_bundle

    print(push_bundle(args.to, args.path, capture=args.capture)["url"])
    return ExitCode.COMPLETED


def _add_env_commands(commands: argparse._SubParsersAction) -> None:
    env = commands.add_parser("env", help="push and pre-build software environments")
    actions = env.add_subparsers(dest="env_command", metavar="ACTION", required=True)
    push = actions.add_parser(
        "push",
        help="upload an environment spec as <URL>/<sha256>.json",
        description="Upload SPEC (a Coiled SoftwareEnvSpec JSON, requirements.txt, "
        "pylock.toml, or a pyproject.toml with its uv.lock) in canonical form, named by its "
        "sha256, unless it is already there; print its URL for --senv-url or the senv job "
        "variable.",
    )
    push.add_argument("spec", metavar="SPEC", nargs="?", help="the spec file")
    push.add_argument(
        "--capture", action="store_true", help="push the current Python environment instead"
    )
    push.add_argument("--to", required=True, metavar="URL", help="s3://bucket/prefix, ...")
    push.set_defaults(handler=_env_push)
    build = actions.add_parser(
        "build",
        help="build the environment for SPEC into the cache (image builds)",
        description="Build SPEC's environment into <workdir>/cache/envs, so that a runner "
        "using the same workdir and interpreter starts without installing anything.",
    )
    build.add_argument("spec", metavar="SPEC", help="a spec file, or a URL as `env push` prints")
    _add_settings_flags(build, only=_ENV_BUILD_SETTINGS)
    build.add_argument("--json", action="store_true", help="print the result as one JSON line")
    build.set_defaults(handler=_env_build)


def _add_doctor_command(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check this machine can run flow runs; install the zombie automation",
        description="One line per check (Prefect API, workdir, uv, podman/docker, cloud "
        "metadata, zombie automation); exit 0, or 2 when a check failed.",
    )
    doctor.add_argument(
        "--install-automation",
        action="store_true",
        help="create (or update) the Prefect automation that marks a flow run Crashed when "
        "its VM stops sending heartbeats without tearing down",
    )
    doctor.add_argument(
        "--missed-heartbeats",
        type=int,
        default=3,
        metavar="N",
        help="heartbeats a run may miss before the automation crashes it [default: 3]",
    )
    doctor.add_argument(
        "--automation-json",
        action="store_true",
        help="print the automation as JSON (for `prefect automation create -f`) and exit",
    )
    _add_settings_flags(doctor, only=_DOCTOR_SETTINGS)
    doctor.set_defaults(handler=_doctor)


def _add_launch_command(commands: argparse._SubParsersAction) -> None:
    launch = commands.add_parser("launch", help="the `vm` worker's tools (VMs it started)")
    actions = launch.add_subparsers(dest="launch_command", metavar="ACTION", required=True)
    sweep = actions.add_parser(
        "sweep",
        help="delete a vm pool's VMs that nothing will delete any more",
        description="Delete the VMs tagged with the work pool whose flow run is final or gone "
        "(past --grace), that are powered off, or that outlived their max runtime by 10 "
        "minutes: what a dead worker left. The worker also sweeps every minute. The pool's "
        "provider and region come from its base job template.",
    )
    sweep.add_argument("--pool", required=True, help="the vm work pool's name")
    sweep.add_argument(
        "--grace",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long after its run ended a VM is left to its own worker [default: 300]",
    )
    sweep.set_defaults(handler=_launch_sweep)
    catalog = actions.add_parser(
        "catalog",
        help="refresh a cloud's instance-type catalog from the cloud",
        description="Re-read each instance type of the cloud's catalog (the one this package "
        "ships, or --out) from the cloud: vCPUs, memory, GPUs and architecture from its "
        "compute API, the on-demand Linux price from its price list. The worker picks the "
        "cheapest types that meet cpu, memory, gpu and arm from this catalog. Credentials "
        "as the cloud's provider reads them.",
    )
    catalog.add_argument("cloud", choices=("aws", "gcp", "azure"))
    catalog.add_argument(
        "--region", help="the region to read [aws: us-east-1, gcp: us-central1, azure: eastus]"
    )
    catalog.add_argument("--project", help="the GCP project or Azure subscription id to read with")
    catalog.add_argument(
        "--add", action="append", default=[], metavar="TYPE", help="add this type (repeatable)"
    )
    catalog.add_argument(
        "--drop", action="append", default=[], metavar="TYPE", help="drop this type (repeatable)"
    )
    catalog.add_argument(
        "--out",
        type=Path,
        help="the catalog file to refresh; a new one starts from the packaged types "
        "[default: the packaged one]",
    )
    catalog.set_defaults(handler=_launch_catalog)


def _launch_sweep(args: argparse.Namespace) -> int:
    logs.configure("INFO")
    from runner.launch.sweep import sweep_command

    return sweep_command(args.pool, grace=args.grace, say=print)


def _launch_catalog(args: argparse.Namespace) -> int:
    logs.configure("INFO")
    from runner.launch.catalog.refresh import refresh

    return refresh(
        args.cloud,
        region=args.region,
        project=args.project,
        add=args.add,
        drop=args.drop,
        out=args.out,
        say=print,
    )


def _doctor(args: argparse.Namespace) -> int:
    from runner import doctor

    settings = load_settings(**{name: getattr(args, name) for name in _DOCTOR_SETTINGS})
    logs.configure(settings.log_level)
    if args.automation_json:
        print(doctor.automation_json(settings, args.missed_heartbeats))
        return ExitCode.COMPLETED
    return doctor.run(
        settings,
        install_automation=args.install_automation,
        missed=args.missed_heartbeats,
        say=print,
    )


def _env_push(args: argparse.Namespace) -> int:
    logs.configure("INFO")
    from runner.steps import push_senv

    print(push_senv(args.to, args.spec, capture=args.capture)["url"])
    return ExitCode.COMPLETED


def _env_build(args: argparse.Namespace) -> int:
    settings = load_settings(**{name: getattr(args, name) for name in _ENV_BUILD_SETTINGS})
    logs.configure(settings.log_level)
    import json
    from pathlib import Path

    from runner.environment.materialize import materialize
    from runner.environment.source import fetch_spec
    from runner.environment.spec import load

    if Path(args.spec).exists():
        spec = load(Path(args.spec))
    else:
        spec = fetch_spec(args.spec, settings=settings, say=log.info)
    ready = materialize(spec, settings=settings, say=log.info)
    if args.json:
        result = {
            "key": ready.key,
            "path": str(ready.python.parent.parent),
            "cache_hit": ready.cache_hit,
            "seconds": round(ready.seconds, 4),
        }
        print(json.dumps(result))
    else:
        print(ready.python.parent.parent)
    return ExitCode.COMPLETED


def _bundle_pull(args: argparse.Namespace) -> int:
    settings = load_settings(workdir=args.workdir)
    logs.configure(settings.log_level)
    from pathlib import Path

    from runner.code import fetch, pull

    if args.into:
        pull(args.url, Path(args.into), settings=settings, say=log.info)
    else:
        print(fetch(args.url, settings=settings, say=log.info).archive)
    return ExitCode.COMPLETED


def _add_settings_flags(
    parser: argparse.ArgumentParser, *, only: Sequence[str] | None = None
) -> None:
    """One flag per Settings field (or per field in ``only``), so that --help always
    lists every setting a command reads."""
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        kwargs: dict[str, typing.Any] = {"dest": name, "default": None}
        if typing.get_origin(field.annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(field.annotation)
        elif field.annotation is bool:  # a switch: --keep-workdir / --no-keep-workdir
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = name.split("_")[-1].upper()
        default = field.default if field.default is not None else "unset"
        kwargs["help"] = f"{field.description} [env {env_var(name)}; default: {default}]"
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _exit_code_table() -> str:
    meanings: dict[ExitCode, str] = {
        ExitCode.COMPLETED: "the flow run Completed, or was preempted and rescheduled",
        ExitCode.FLOW_FAILED: "the flow ran and ended Failed, or the run was cancelled",
        ExitCode.CONFIG_ERROR: "usage or configuration error (bad flag, id, missing run)",
        ExitCode.BOOTSTRAP_ERROR: "infrastructure error before the flow ran (API, code)",
        ExitCode.NOT_EXECUTED: "not executed: run already claimed, running or final",
        ExitCode.CRASHED: "crashed: the worker died, max runtime, or the run ended Crashed",
    }
    rows = "\n".join(f"  {int(code)}  {text}" for code, text in meanings.items())
    return f"exit codes:\n{rows}"
