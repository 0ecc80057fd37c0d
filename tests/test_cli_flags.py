"""One address vocabulary: every subcommand that talks to a server parses the same way."""

import pytest

from serving.cli import build_parser

SUBCOMMANDS = {
    "extract": ["extract", "--schema", "s.json", "text"],
    "summarize": ["summarize", "doc.txt"],
    "translate": ["translate", "--to", "en", "in.jsonl"],
    "bench": ["bench"],
}


def parse(argv, monkeypatch, env=None):
    from serving.client.flags import URL_ENV, resolve_url

    monkeypatch.delenv(URL_ENV, raising=False)
    if env:
        monkeypatch.setenv(URL_ENV, env)
    return resolve_url(build_parser().parse_args(argv))


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
@pytest.mark.parametrize("flag", ["--url", "--base-url"])
def test_every_subcommand_takes_url_and_its_alias(name, flag, monkeypatch):
    argv = SUBCOMMANDS[name] + [flag, "http://10.0.0.9:8000"]
    assert parse(argv, monkeypatch) == "http://10.0.0.9:8000"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_one_environment_variable_sets_it_for_all(name, monkeypatch):
    assert parse(SUBCOMMANDS[name], monkeypatch, env="http://stack:9000") == "http://stack:9000"
    # The flag still wins over the variable.
    argv = SUBCOMMANDS[name] + ["--url", "http://other:1"]
    assert parse(argv, monkeypatch, env="http://stack:9000") == "http://other:1"


def test_default_is_the_local_stack(monkeypatch):
    assert parse(SUBCOMMANDS["extract"], monkeypatch) == "http://127.0.0.1:8000"
