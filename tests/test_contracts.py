"""Job contracts: declared inputs/outputs are data, consistent with each other, and drive input defaults."""

from __future__ import annotations

import fnmatch
import json
import re

import pytest
from click.testing import CliRunner

from subtomo.cli.main import build_cli
from subtomo.errors import SubtomoError
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec, Source
from subtomo.jobs.pipeline import STATUS_FAILED, STATUS_SUCCEEDED, Pipeline, Process
from subtomo.jobs.registry import all_specs


def _matches(filename: str, pattern: str) -> bool:
    """Whether a Source file name (a whole name, or a suffix such as ``_data.star``) fits an OutputSpec pattern."""
    glob = re.sub(r"\{[^}]*\}", "*", pattern)
    return fnmatch.fnmatch(filename, glob) or (filename.startswith("_") and glob.endswith(filename))


def test_every_contract_is_data_and_names_real_parameters():
    specs = all_specs()
    contracts = json.loads(json.dumps([s.contract() for s in specs]))
    assert [c["command"] for c in contracts] == [s.command for s in specs]
    for spec in specs:
        assert spec.outputs, f"{spec.command} declares no outputs"
        for inp in spec.inputs:
            assert inp.param in spec.params.model_fields, f"{spec.command}: input {inp.param} is not a parameter"
            assert isinstance(inp.node_type, NodeType)


def test_every_input_source_is_a_declared_output_of_that_job_type():
    by_type = {s.job_type: s for s in all_specs()}
    for spec in all_specs():
        for inp in spec.inputs:
            for source in inp.sources:
                assert source.job_type in by_type, f"{spec.command} --{inp.param}: unknown job type {source.job_type}"
                outs = by_type[source.job_type].outputs
                for filename in source.filenames:
                    produced = [o for o in outs if _matches(filename, o.filename)]
                    assert produced, f"{spec.command} --{inp.param}: {source.job_type} declares no {filename}"
                    assert all(o.node_type in (inp.node_type, NodeType.POSTPROCESS) for o in produced), (
                        f"{spec.command} --{inp.param} takes {inp.node_type}, {source.job_type} makes "
                        f"{[o.node_type for o in produced]}")


def test_input_resolution_prefers_given_then_newest_succeeded(tmp_path):
    spec = InputSpec("i", NodeType.PARTICLES, (Source("Select", ("particles_selected.star",)),
                                               Source("Extract", ("particles_subtomo.star",))), "Run extract.")
    with pytest.raises(SubtomoError, match="no --i given.*Run extract"):
        spec.resolve(tmp_path, None)
    for name, job_type, status in (("Extract/job002/", "Extract", STATUS_SUCCEEDED),
                                   ("Extract/job003/", "Extract", STATUS_SUCCEEDED),
                                   ("Select/job004/", "Select", STATUS_FAILED)):
        node = name + ("particles_subtomo.star" if job_type == "Extract" else "particles_selected.star")
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / node).write_text("data_\n")
        pipeline = Pipeline(tmp_path)
        pipeline.add(Process(name, job_type, status, outputs=[(node, NodeType.PARTICLES.value)]))
        pipeline.save()
    # the failed Select job is skipped; the newest succeeded Extract wins
    assert spec.resolve(tmp_path, None) == tmp_path / "Extract/job003/particles_subtomo.star"
    assert spec.resolve(tmp_path, "Extract/job002/particles_subtomo.star") == tmp_path / "Extract/job002/particles_subtomo.star"
    with pytest.raises(SubtomoError, match="--i nothere.star: file not found"):
        spec.resolve(tmp_path, "nothere.star")
    optional = InputSpec("ref", NodeType.DENSITY_MAP, required=False)
    assert optional.resolve(tmp_path, None) is None and optional.option == "--ref"


def test_output_patterns_expand_per_iteration_and_class():
    out = OutputSpec("run_it{it:03d}_class{k:03d}.mrc", NodeType.DENSITY_MAP)
    assert out.expand(7, 2) == ["run_it007_class001.mrc", "run_it007_class002.mrc"]
    assert OutputSpec("run_it{it:03d}_data.star", NodeType.PARTICLES).expand(25) == ["run_it025_data.star"]
    assert OutputSpec("*_ctffind.star", NodeType.CTF_RESULTS).expand() == ["*_ctffind.star"]


def test_contracts_command_prints_json():
    result = CliRunner().invoke(build_cli(), ["contracts", "refine3d"])
    assert result.exit_code == 0, result.output
    (contract,) = json.loads(result.output)
    assert contract["job_type"] == "Refine3D"
    assert {"param": "i", "node_type": "ParticlesData"}.items() <= contract["inputs"][0].items()
    assert "run_data.star" in [o["filename"] for o in contract["outputs"]]
    assert "particle_diameter" in contract["parameters"]["properties"]
    bad = CliRunner().invoke(build_cli(), ["contracts", "nosuchjob"])
    assert bad.exit_code != 0 and "no job 'nosuchjob'" in bad.output
