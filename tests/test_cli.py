"""Every command documents itself with an example."""
from click.testing import CliRunner

from cli import cli


def test_every_command_has_help_ending_with_an_example():
    for name, command in cli.commands.items():
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert command.help.strip().splitlines()[-1].strip().startswith("Example: "), name
        assert "Example: " in result.output, name


def test_submit_without_a_broker_points_to_run(tmp_path, monkeypatch):
    monkeypatch.delenv("BROKER_URL", raising=False)
    monkeypatch.setenv("BRAINSCAN_VAR", str(tmp_path))
    result = CliRunner().invoke(cli, ["submit", str(tmp_path)])

    assert result.exit_code == 1
    assert result.output == "Error: BROKER_URL is not set: use `python cli.py run FOLDER` to process locally\n"
