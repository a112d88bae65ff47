"""Job forms generated from the jobs' parameter models: the same source of truth as the CLI.

Each field of a job's pydantic model becomes one form field with the model's default,
description (units and help) and ``Literal`` choices; fields are grouped in tabs. A
submitted form is turned into the model (pydantic validates it: errors come back per
field, before anything runs) and into the exact ``subtomo <job> ...`` argument list the CLI
would accept for the same values (:func:`command_arguments`); nothing the browser sends is
ever run through a shell.
"""

from __future__ import annotations

import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from subtomo.jobs.base import JobParams, JobSpec
from subtomo.jobs.contracts import InputSpec
from subtomo.jobs.pipeline import STATUS_SUCCEEDED, Pipeline

RUNNING_FIELDS = ("output", "continue_job", "device", "threads", "seed", "cluster", "cluster_config")
TABS = ("I/O", "Parameters", "Running")


@dataclass
class FormField:
    """One field of a job form."""

    name: str
    option: str  # "--particle-diameter", or the argument name for positional fields
    kind: str  # bool | int | float | text | list | choice
    default: str  # shown in the field ("" when None)
    help: str
    tab: str
    required: bool = False
    positional: bool = False
    choices: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)  # earlier jobs' outputs of the right node type, newest first
    node_type: str = ""


def _base_type(annotation: Any) -> Any:
    """The inner type of ``X | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _kind(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "choice"
    if typing.get_origin(tp) in (list, tuple):
        return "list"
    return {bool: "bool", int: "int", float: "float"}.get(tp, "text")


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def input_candidates(project: Path, spec: InputSpec) -> list[str]:
    """Outputs of finished jobs with the input's node type (or named by its sources), newest first."""
    found: list[str] = []
    names = {f for s in spec.sources for f in s.filenames}
    for proc in reversed(Pipeline(project).processes):
        if proc.status != STATUS_SUCCEEDED:
            continue
        for node, node_type in proc.outputs:
            if (node_type == spec.node_type.value or Path(node).name in names) and node not in found:
                found.append(node)
    return found


def form_fields(spec: JobSpec, project: Path) -> list[FormField]:
    """The form of ``spec``: one field per parameter, in the model's order."""
    inputs = {i.param: i for i in spec.inputs}
    fields = []
    for name, info in spec.params.model_fields.items():
        tp = _base_type(info.annotation)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        declared = inputs.get(name)
        tab = "Running" if name in RUNNING_FIELDS else "I/O" if declared or extra.get("positional") else "Parameters"
        fields.append(FormField(
            name=name, option=name if extra.get("positional") else "--" + name.replace("_", "-"), kind=_kind(tp),
            default="" if info.is_required() else _shown(info.default), help=info.description or "", tab=tab,
            required=info.is_required(), positional=bool(extra.get("positional")),
            choices=[str(c) for c in typing.get_args(tp)] if _kind(tp) == "choice" else [],
            candidates=input_candidates(project, declared) if declared else [],
            node_type=declared.node_type.value if declared else ""))
    return fields


def _converted(spec: JobSpec, name: str, raw: Any) -> Any:
    """A submitted value in the type the model expects (strings from text fields)."""
    tp = _base_type(spec.params.model_fields[name].annotation)
    kind = _kind(tp)
    if kind == "bool":
        return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "on", "yes")
    if kind == "list":
        return [v.strip() for v in str(raw).split(",") if v.strip()]
    if kind == "choice":
        for choice in typing.get_args(tp):
            if str(choice) == str(raw):
                return choice
    return raw


def parse_form(spec: JobSpec, submitted: dict[str, Any]) -> tuple[JobParams | None, dict[str, str]]:
    """Validate a submitted form: (parameters, {}) or (None, {field: message}).

    Empty text fields mean "the default"; unknown field names are errors (the model refuses
    unknown keys, as the CLI does).
    """
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, raw in submitted.items():
        if name not in spec.params.model_fields:
            errors[name] = f"{spec.command} has no parameter {name!r}"
            continue
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            continue
        if not isinstance(raw, (str, bool, int, float)):
            errors[name] = "expected a single value"
            continue
        values[name] = _converted(spec, name, raw.strip() if isinstance(raw, str) else raw)
    if errors:
        return None, errors
    try:
        return spec.params(**values), {}
    except ValidationError as exc:
        for err in exc.errors():
            where = str(err["loc"][0]) if err["loc"] else "form"
            errors.setdefault(where, err["msg"].removeprefix("Value error, "))
        return None, errors


def command_arguments(spec: JobSpec, params: JobParams) -> list[str]:
    """The ``subtomo`` arguments (after the program name) for the values the user set.

    Only fields set explicitly (``model_fields_set``) are written, so defaults stay the
    model's; booleans become ``--flag``/``--no-flag``, lists comma-separated, and a value
    that starts with ``-`` is attached as ``--flag=value`` so it is never read as an option.
    """
    args = [spec.command]
    positional: list[str] = []
    dumped = params.model_dump()
    for name, info in spec.params.model_fields.items():
        if name not in params.model_fields_set or dumped[name] is None:
            continue
        value = dumped[name]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flag = "--" + name.replace("_", "-")
        if extra.get("positional"):
            positional.append(_shown(value))
        elif isinstance(value, bool):
            args.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            text = _shown(value)
            args.extend([f"{flag}={text}"] if text.startswith("-") else [flag, text])
    if positional:
        args.extend(["--", *positional] if any(p.startswith("-") for p in positional) else positional)
    return args


def printed_command(arguments: list[str]) -> str:
    """The command line a user would type: ``subtomo <job> ...`` quoted for a POSIX shell."""
    return shlex.join(["subtomo", *arguments])
