"""``subtomo`` command line, generated from the jobs' parameter models.

Each field of a job's pydantic model becomes an option ``--field-name`` whose help text
is the field's description plus its default; fields marked ``positional`` become
arguments. List fields take comma-separated values. Errors the user can fix
(:class:`SubtomoError`) are printed without a traceback and exit with status 1.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from subtomo import __version__
from subtomo.errors import SubtomoError
from subtomo.jobs import pipeline as pipeline_file
from subtomo.jobs.base import JobSpec, JobTerminated, execute
from subtomo.jobs.registry import all_specs
from subtomo.web.command import gui_command


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of an annotation such as ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return annotation, False


def _click_type(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(tp)])
    return {int: int, float: float, str: str, Path: str}.get(tp, str)


def _options_for(spec: JobSpec) -> list[click.Parameter]:
    params: list[click.Parameter] = []
    for name, field in spec.params.model_fields.items():
        tp, _ = _base_type(field.annotation)
        extra = field.json_schema_extra or {}
        default = None if field.is_required() else field.default
        help_text = field.description or ""
        if isinstance(extra, dict) and extra.get("positional"):
            params.append(click.Argument([name], required=field.is_required(), default=default))
            continue
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            params.append(click.Option([f"{flag}/--no-{name.replace('_', '-')}", name], default=default,
                                       show_default=True, help=help_text))
        elif typing.get_origin(tp) in (list, tuple):
            shown = ",".join(str(v) for v in default) if default else None
            params.append(click.Option([flag, name], type=str, default=shown, show_default=shown is not None,
                                       help=help_text + " (comma-separated)"))
        else:
            continuable = "continue_job" in spec.params.model_fields  # saved values fill required options
            params.append(click.Option([flag, name], type=_click_type(tp), default=default,
                                       show_default=default is not None,
                                       required=field.is_required() and not continuable,
                                       help=help_text + (" [required]" if field.is_required() and continuable else "")))
    return params


def _with_saved_parameters(spec: JobSpec, given: dict[str, Any]) -> dict[str, Any]:
    """For ``--continue-job``: the job's saved parameters, overridden by the options typed now."""
    record_path = Path(given["continue_job"]) / "job.json"
    if not record_path.parent.is_dir():
        raise click.UsageError(f"--continue-job {given['continue_job']}: no such job directory (a job killed before it "
                               "made its directory has nothing to continue: run it again without --continue-job).")
    try:
        saved = json.loads(record_path.read_text()).get("parameters", {})
    except (OSError, ValueError):
        return given  # the job runner reports a missing or damaged job.json
    merged = {k: v for k, v in saved.items() if k in spec.params.model_fields and k != "output"}
    merged.update(given)
    return merged


def _make_command(spec: JobSpec) -> click.Command:
    def callback(**kwargs: Any) -> None:
        values: dict[str, Any] = {}
        click_ctx = click.get_current_context()
        for name, value in kwargs.items():
            if click_ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
                continue  # defaults come from the model, so model_fields_set holds what the user gave
            field = spec.params.model_fields[name]
            tp, _ = _base_type(field.annotation)
            if value is not None and typing.get_origin(tp) in (list, tuple) and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            values[name] = value
        if values.get("continue_job"):
            values = _with_saved_parameters(spec, values)
        try:
            params = spec.params(**values)
        except ValidationError as exc:
            msgs = [(f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: " if e["loc"] else "")
                    + e["msg"].removeprefix("Value error, ") for e in exc.errors()]
            raise click.UsageError("; ".join(msgs)) from None
        try:
            execute(spec, params, Path.cwd(), argv=["subtomo", *sys.argv[1:]])
        except SubtomoError as exc:
            click.secho(f"ERROR: {exc}", fg="red", err=True)
            sys.exit(1)
        except Exception as exc:  # a bug, not bad input: short message, traceback kept in run.err
            job = getattr(exc, "subtomo_job", None)
            where = f"; the traceback is in {job}run.err" if job else ""
            click.secho(f"ERROR: internal error in subtomo {spec.command}: {type(exc).__name__}: {exc}{where}. "
                        f"Please report it with that file.", fg="red", err=True)
            sys.exit(2)
        except (KeyboardInterrupt, JobTerminated) as exc:
            job = getattr(exc, "subtomo_job", None)
            again = (f"; continue it with: subtomo {spec.command} --continue-job {job}"
                     if job and "continue_job" in spec.params.model_fields else "")
            click.secho(f"{'terminated' if isinstance(exc, JobTerminated) else 'interrupted'}: the job is marked as "
                        f"failed{again}", err=True)
            sys.exit(143 if isinstance(exc, JobTerminated) else 130)

    return click.Command(spec.command, callback=callback, params=_options_for(spec), help=spec.summary)


class _OrderedGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def _contracts_command() -> click.Command:
    def callback(job: str | None) -> None:
        specs = [s for s in all_specs() if job in (None, s.command)]
        if not specs:
            raise click.UsageError(f"no job {job!r}; jobs: {', '.join(s.command for s in all_specs())}")
        click.echo(json.dumps([s.contract() for s in specs], indent=2, default=str))

    return click.Command(
        "contracts", callback=callback, params=[click.Argument(["job"], required=False)],
        help="Print the jobs' contracts as JSON (inputs with their node types and default sources, outputs, "
             "parameter schema): what a GUI or a scheduler reads without running a job.")


def _pipeline_command() -> click.Command:
    def callback(rebuild: bool) -> None:
        project = Path.cwd()
        if rebuild:
            pipeline = pipeline_file.rebuild(project)
            click.echo(f"rebuilt {pipeline_file.PIPELINE_FILE} from {len(pipeline.processes)} job directories")
            return
        try:
            pipeline = pipeline_file.Pipeline(project)
        except SubtomoError as exc:
            click.secho(f"ERROR: {exc}", fg="red", err=True)
            sys.exit(1)
        for proc in pipeline.processes:
            click.echo(f"{proc.name:<24} {proc.status:<10} {len(proc.inputs)} in, {len(proc.outputs)} out")

    return click.Command(
        "pipeline", callback=callback,
        params=[click.Option(["--rebuild"], is_flag=True, help="Rebuild default_pipeline.star from the job "
                             "directories (each job.json records its type, status, inputs and outputs).")],
        help="List the project's jobs and their state, or rebuild a damaged pipeline file.")


def build_cli() -> click.Group:
    group = _OrderedGroup(
        name="subtomo",
        help="Subtomogram averaging for cryo-ET, following Bharat & Scheres (Nat. Protoc. 2016). "
             "Run the jobs from the project directory, in the order listed.",
    )
    for spec in all_specs():
        group.add_command(_make_command(spec))
    group.add_command(_contracts_command())
    group.add_command(_pipeline_command())
    group.add_command(gui_command)
    return click.version_option(__version__, prog_name="subtomo")(group)


def main() -> None:
    build_cli()(prog_name="subtomo")


if __name__ == "__main__":
    main()
