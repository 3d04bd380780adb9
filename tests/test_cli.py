"""Every command documents itself with an example."""
import pytest
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


@pytest.mark.parametrize("url, message", [
    ("postgresql://brainscan:s3cret@db:port/brainscan",
     "Error: DATABASE_URL is not a database URL: its port is not a number "
     "(expected e.g. postgresql://user:password@host:5432/brainscan)\n"),
    ("not a url",
     "Error: DATABASE_URL is not a database URL: it does not parse "
     "(expected e.g. postgresql://user:password@host:5432/brainscan)\n"),
    ("mongodb://db/brainscan",
     "Error: DATABASE_URL names database driver 'mongodb', which is not installed "
     "(brainscan runs on postgresql:// and sqlite:///)\n"),
])
def test_a_malformed_database_url_is_a_one_line_error(tmp_path, monkeypatch, url, message):
    monkeypatch.setenv("DATABASE_URL", url)
    result = CliRunner().invoke(cli, ["jobs"])

    assert (result.exit_code, result.output) == (1, message)


def test_a_non_integer_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("BRAINSCAN_BATCH_SIZE", "lots")
    result = CliRunner().invoke(cli, ["jobs"])

    assert (result.exit_code, result.output) == (1, "Error: BRAINSCAN_BATCH_SIZE must be an integer, got 'lots'\n")


def test_train_refuses_conv_counts_that_are_not_numbers(tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--convs", "1,two,2,2"])

    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        "Error: Invalid value for '--convs': '1,two,2,2' is not comma-separated whole numbers such as 1,1,2,2")


def test_train_refuses_conv_counts_for_another_number_of_stages(tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--convs", "1,2,2"])

    assert (result.exit_code, result.output) == (1, "Error: --convs needs 4 counts of 1 or more, got (1, 2, 2)\n")


def test_train_refuses_cutmix_with_a_teacher(tmp_path):
    teacher = tmp_path / "teacher.keras"
    teacher.write_bytes(b"")
    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--cutmix", "0.5", "--teacher", str(teacher)])

    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        "Error: --cutmix mixes labels, not the teacher's logits: use one or the other")
