"""The guides stay true: every relative link in README.md, CHANGELOG.md and docs/*.md reaches a file (and a heading,
for ``#anchors``), and every ``regproxy ...`` command they show names a real command and only options it has.

Commands are checked against the Typer app's own parameters (``typer.main.get_command``), not its rendered help, so
terminal width and Rich's formatting cannot hide an option."""

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import typer

from regproxy_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def _anchors(page: Path) -> frozenset[str]:
    return frozenset(_slug(h) for h in re.findall(r"^#+ (.+)$", _prose(page.read_text(encoding="utf-8")), re.MULTILINE))


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with that anchor in {_name(file)}")
    assert not broken, broken


def test_the_guides_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if f"](docs/{p.name}" not in readme]
    assert not unlinked, unlinked


@cache
def _root_command():
    return typer.main.get_command(app)


def _options(command) -> set[str]:
    return {"--help", *(o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))
                        if o.startswith("-"))}


def _check(argv: list[str]) -> list[str]:
    """What is wrong with ``regproxy ARGV``: an unknown command, or options the command does not list."""
    command, path = _root_command(), ["regproxy"]
    words = iter(argv)
    for word in words:
        subcommands = getattr(command, "commands", None)
        if not subcommands or word.startswith("-"):
            rest = [word, *words]
            break
        if word not in subcommands:
            if re.fullmatch(r"[A-Z][A-Z_]*", word):  # a placeholder (`regproxy COMMAND --help`): any command
                return []
            return [f"{' '.join(path)}: no command {word!r}"]
        command, path = subcommands[word], [*path, word]
    else:
        rest = []
    known = _options(command)
    return [f"{' '.join(path)}: no option {option}" for option in
            (w.split("=", 1)[0] for w in rest if re.match(r"-[A-Za-z-]", w)) if option not in known]


def _block_commands(text: str) -> list[list[str]]:
    """``regproxy`` argv lists in the fenced code blocks (chains split at && ; |, comments dropped; also
    ``python -m regproxy_cli ...`` and ``torchrun ... -m regproxy_cli ...``)."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:  # not shell (a Python or YAML block)
                continue
            command: list[str] | None = None
            starts = True  # at the start of a shell command: the line's, or after && ; |
            for previous, token in zip(["", *tokens], [*tokens, "&&"]):
                if token in ("&&", ";", "|", "||"):
                    if command is not None:
                        found.append(command)
                    command, starts = None, True
                    continue
                if command is not None:
                    command.append(token)
                elif (starts and token == "regproxy") or (previous == "-m" and token == "regproxy_cli"):
                    command = []
                starts = False
    return found


def _inline_commands(text: str) -> list[list[str]]:
    """``regproxy ...`` code spans in the prose (tables, sentences): placeholders and ``[optional]`` brackets left
    in, so only the command names and the option tokens are checked."""
    spans = [s.replace("\\|", "|") for s in INLINE_CODE.findall(_prose(text)) if s.startswith("regproxy ")]
    return [[w.strip("[]") for w in span.split()[1:] if w.strip("[]")] for span in spans]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_command_shown_exists_with_its_options(page):
    text = page.read_text(encoding="utf-8")
    commands = _block_commands(text) + _inline_commands(text)
    problems = [p for argv in commands for p in _check(argv)]
    assert not problems, problems


def test_every_command_in_the_help_examples_exists_with_its_options():
    def walk(command):
        yield command
        for sub in getattr(command, "commands", {}).values():
            yield from walk(sub)

    examples = [line.strip() for command in walk(_root_command()) for line in (command.epilog or "").splitlines()
                if line.strip().startswith("regproxy ")]
    assert examples
    problems = [p for line in examples for p in _check(shlex.split(line, comments=True)[1:])]
    assert not problems, problems


def test_the_checker_catches_a_wrong_command_and_a_wrong_option():
    assert _check(["predict", "x.jpg", "--model", "s16-ade", "--opacity", "0.3"]) == []
    assert _check(["data", "import", "--from", "coco", "a", "b"]) == []
    assert _check(["predikt", "x.jpg"]) == ["regproxy: no command 'predikt'"]
    assert _check(["predict", "x.jpg", "--colour"]) == ["regproxy predict: no option --colour"]
    assert _block_commands("```bash\nregproxy flops -b s16 --json  # a comment\n```\n") == [["flops", "-b", "s16",
                                                                                             "--json"]]
    assert _block_commands("```bash\ntorchrun --nproc-per-node 8 -m regproxy_cli eval --model x && ls\n```\n") == [
        ["eval", "--model", "x"]]
    assert _slug("FLOPs: two conventions") == "flops-two-conventions"


def test_the_readmes_python_example_runs(model, tmp_path, monkeypatch, capsys):
    """The README's Python equivalent of `regproxy predict photo.jpg --model s16-ade`, with a tiny model for the zoo's
    (nothing downloaded) and a generated photo."""
    import numpy as np
    from PIL import Image

    import regproxy_cli

    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.DOTALL | re.MULTILINE)]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(regproxy_cli, "load_model", lambda name: model if name == "s16-ade" else None)
    exec(compile(block, "README.md", "exec"), {})
    found = eval(capsys.readouterr().out)
    assert found and set(found) <= set(model.config.classes)
