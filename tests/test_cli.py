"""The `alignet` command line: help everywhere, clear errors."""
import pytest

from pipelines import cli, presets, stages


@pytest.mark.parametrize("command", ["run", *stages.STAGES])
def test_every_command_has_help(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([command, "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "usage: alignet" in out
  # Every command says where its outputs go: --out, or its own flag (train: --workdir; publish: --to).
  own_flow = command != "run" and hasattr(stages.module(command), "command")
  assert "--out" in out or own_flow


def test_top_level_help_lists_every_stage(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  out = capsys.readouterr().out
  for stage in ["run", *stages.STAGES]:
    assert stage in out


def test_non_beam_stage_rejects_unknown_flags(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["world", "--out", str(tmp_path / "w"), "--bogus=1"])
  assert exit_info.value.code == 2
  assert "unrecognized arguments: --bogus=1" in capsys.readouterr().err


@pytest.mark.parametrize("preset", presets.names())
def test_presets_only_set_known_config_keys(preset, tmp_path):
  configs = presets.configs(preset, str(tmp_path))
  assert list(configs) == list(stages.STAGES)


def test_world_stage_from_the_command_line(tmp_path, capsys):
  out = tmp_path / "w"
  assert cli.main(["world", "--out", str(out), "--images-per-class", "5", "--things-train", "300",
                   "--things-test", "100", "--levels-per-level", "10"]) == 0
  assert (out / "manifest.json").exists()
  assert f"outputs in {out}" in capsys.readouterr().out
